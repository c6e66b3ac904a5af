"""Tests for bco_ray.data.formats and a whole file's check through the one reader (bco_ray/data/reader.py):
format detection, row checks, conversion and file validation."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bco_ray.data.checks import check_source
from bco_ray.data.formats import DataFormatError, check_row, detect_format, iter_rows, to_unpaired
from bco_ray.data.reader import UnitCheck, check_unit, plan_units

SRC = "train.jsonl"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def check_file(path, on_bad_rows="error", max_errors=1) -> UnitCheck:
    """The one reader's check of a whole data file (its only read unit): `.fmt` and `.report`."""
    (unit,) = plan_units(str(path), "train")
    return check_unit(unit, on_bad_rows, max_errors=max_errors)


def bad(row, fmt="unpaired", index=17):
    with pytest.raises(DataFormatError) as e:
        check_row(row, source=SRC, index=index, fmt=fmt)
    return e.value


# ----------------------------------------------------------------------------- rows


def test_detect_format():
    assert detect_format({"prompt": "p", "completion": "c", "label": True, "x": 1}) == "unpaired"
    assert detect_format({"prompt": "p", "chosen": "a", "rejected": "b"}) == "paired"
    assert detect_format({"chosen": "a", "rejected": "b"}) == "implicit"
    with pytest.raises(DataFormatError, match=r"data.json row 3: unknown format"):
        detect_format({"text": "x"}, source="data.json", index=3)


@pytest.mark.parametrize("label", [True, False, 1, 0, np.bool_(True), np.int64(0)])
def test_unpaired_labels_accepted(label):
    row = {"prompt": "p", "completion": "c", "label": label, "extra": None}
    check_row(row, source=SRC, index=0, fmt="unpaired")
    (out,) = to_unpaired(row, "unpaired")
    assert out == {"prompt": "p", "completion": "c", "label": bool(label)}
    assert type(out["label"]) is bool


@pytest.mark.parametrize(
    "label,shown",
    [("yes", "'yes' (str)"), (2, "2 (int)"), (None, "None (NoneType)"), (1.0, "1.0 (float)"), ("true", "'true' (str)")],
)
def test_bad_label_names_row_and_field(label, shown):
    err = bad({"prompt": "p", "completion": "c", "label": label})
    assert str(err) == (
        f"train.jsonl row 17, field 'label': expected a boolean (true/false or "
        f"0/1), got {shown}. Fix the row or pass --data.on_bad_rows=skip."
    )
    assert (err.index, err.field, err.reason) == (17, "label", "label_not_boolean")


def test_paired_gives_two_rows():
    row = {"prompt": "Q?", "chosen": "good", "rejected": "bad"}
    check_row(row, source=SRC, index=0, fmt="paired")
    assert to_unpaired(row, "paired") == [
        {"prompt": "Q?", "completion": "good", "label": True},
        {"prompt": "Q?", "completion": "bad", "label": False},
    ]


def test_implicit_prompt_text():
    row = {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}
    check_row(row, source=SRC, index=0, fmt="implicit")
    # longest common prefix; like TRL, the space before the split goes to the completions
    assert to_unpaired(row, "implicit") == [
        {"prompt": "Q: 2+2? A:", "completion": " 4", "label": True},
        {"prompt": "Q: 2+2? A:", "completion": " 5", "label": False},
    ]
    assert to_unpaired({"chosen": "abcX", "rejected": "abcY"}, "implicit")[1] == {
        "prompt": "abc",
        "completion": "Y",
        "label": False,
    }


def test_implicit_prompt_conversational():
    shared = msgs(("system", "be brief"), ("user", "2+2?"))
    row = {"chosen": shared + msgs(("assistant", "4")), "rejected": shared + msgs(("assistant", "5"))}
    check_row(row, source=SRC, index=0, fmt="implicit")
    assert to_unpaired(row, "implicit") == [
        {"prompt": shared, "completion": msgs(("assistant", "4")), "label": True},
        {"prompt": shared, "completion": msgs(("assistant", "5")), "label": False},
    ]


def test_implicit_errors():
    err = bad({"chosen": "yes", "rejected": "no"}, fmt="implicit")
    assert "row 17, field 'chosen'" in str(err) and "no common prefix" in str(err)
    assert (
        bad({"chosen": msgs(("user", "a")), "rejected": msgs(("user", "b"))}, fmt="implicit").reason
        == "no_common_prefix"
    )
    err = bad({"chosen": "same text", "rejected": "same text"}, fmt="implicit")
    assert err.reason == "empty_after_common_prefix"


def test_conversational_unpaired_stays_lists():
    row = {"prompt": msgs(("user", "hi")), "completion": msgs(("assistant", "hello")), "label": 1}
    check_row(row, source=SRC, index=0, fmt="unpaired")
    assert to_unpaired(row, "unpaired") == [
        {"prompt": msgs(("user", "hi")), "completion": msgs(("assistant", "hello")), "label": True}
    ]


def test_missing_column():
    err = bad({"prompt": "p", "label": True})
    assert str(err).startswith("train.jsonl row 17, field 'completion': missing column")
    err = bad({"prompt": "p", "chosen": "a"}, fmt="paired", index=3)
    assert "row 3, field 'rejected'" in str(err)


@pytest.mark.parametrize(
    "row,field,reason",
    [
        ({"prompt": "  \n", "completion": "c", "label": 1}, "prompt", "empty_prompt"),
        ({"prompt": "p", "completion": "", "label": 1}, "completion", "empty_completion"),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "chosen", "empty_chosen"),
        ({"prompt": 5, "completion": "c", "label": 1}, "prompt", "wrong_type"),
        ({"prompt": None, "completion": "c", "label": 1}, "prompt", "wrong_type"),
        ({"prompt": [{"role": "user"}], "completion": "c", "label": 1}, "prompt", "bad_message"),
        ({"prompt": [], "completion": [], "label": 1}, "prompt", "empty_prompt"),
        ({"prompt": "p", "completion": msgs(("assistant", "c")), "label": 1}, "completion", "mixed_text_types"),
        ({"prompt": "bad \ud800 text", "completion": "c", "label": 1}, "prompt", "invalid_unicode"),
    ],
)
def test_bad_rows(row, field, reason):
    fmt = detect_format(row)
    err = bad(row, fmt=fmt)
    assert (err.field, err.reason) == (field, reason)
    assert f"train.jsonl row 17, field '{field}'" in str(err)
    assert str(err).endswith("pass --data.on_bad_rows=skip.")


# ----------------------------------------------------------------------------- files

GOOD = [{"prompt": "p1", "completion": "c1", "label": True}, {"prompt": "p2", "completion": "c2", "label": 0}]


def test_validate_jsonl_summary(tmp_path):
    rows = GOOD + [GOOD[0], {"prompt": "p1", "completion": "c1", "label": False}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    check = check_file(path)
    assert check.fmt == "unpaired"
    assert check.report.to_dict() == {
        "rows": 4,
        "bad_rows": 0,
        "bad_reasons": {},
        "desirable": 2,
        "undesirable": 2,
        "duplicates": 1,
        "complete": True,
    }
    rep = check_source(path, "error")  # the driver's check of a split: the same counts
    assert (rep.rows, rep.bad_rows, rep.unpaired_rows, rep.duplicates, rep.complete) == (4, 0, 4, 1, True)
    assert rep.labels.by_label() == {True: 2, False: 2}


def test_validate_paired_counts(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2
    rep = check_source(write_jsonl(tmp_path / "d.json", rows), "error")
    assert (rep.rows, rep.unpaired_rows, rep.duplicates) == (2, 4, 2)
    assert rep.labels.by_label() == {True: 2, False: 2}
    assert check_file(tmp_path / "d.json").fmt == "paired"


def test_invalid_json_line_names_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"d.jsonl row 1: line 3 is not valid JSON"):
        list(iter_rows(str(path)))
    with pytest.raises(DataFormatError, match=r"row 1: line 3 is not valid JSON"):
        check_file(path)


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD[0]).encode() + b'\n{"prompt": "\xff", "completion": "c"}\n')
    with pytest.raises(DataFormatError, match=r"d.jsonl row 1: line 2 is not valid UTF-8"):
        check_file(path)


def test_skip_mode_counts_and_max_errors(tmp_path):
    rows = [
        GOOD[0],
        {"prompt": "p", "completion": "c", "label": "yes"},
        {"prompt": "", "completion": "c", "label": 1},
        GOOD[1],
        {"prompt": "p", "completion": "c"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with open(path, "ab") as f:
        f.write(b"[1, 2]\n\xfe\n")
    rep = check_file(path, on_bad_rows="skip").report
    assert (rep.rows, rep.bad_rows, rep.desirable + rep.undesirable) == (2, 5, 2)
    assert rep.bad_reasons == {
        "label_not_boolean": 1,
        "empty_prompt": 1,
        "missing_label": 1,
        "not_an_object": 1,
        "invalid_utf8": 1,
    }
    with pytest.raises(DataFormatError) as e:
        check_file(path)
    assert e.value.index == 1 and "more bad rows" not in str(e.value)
    with pytest.raises(
        DataFormatError,
        match=r"(?s)row 1, field 'label'.*2 more bad rows:.*"
        r"row 2, field 'prompt'.*row 4, field 'label'",
    ):
        check_file(path, max_errors=3)


def test_mixed_formats_raise_even_when_skipping(tmp_path):
    rows = GOOD + [{"prompt": "q", "chosen": "a", "rejected": "b"}]
    with pytest.raises(
        DataFormatError,
        match=r"row 2: is a paired-format row .* unpaired-format "
        r"\(detected from row 0\); mixed formats",
    ):
        check_file(write_jsonl(tmp_path / "d.jsonl", rows), on_bad_rows="skip")


def test_paired_row_missing_prompt_is_bad_row_not_mixed(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"chosen": "x", "rejected": "y"}]
    with pytest.raises(DataFormatError, match=r"row 1, field 'prompt': missing column"):
        check_file(write_jsonl(tmp_path / "d.jsonl", rows))


def test_no_valid_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "", "completion": "c", "label": 1}])
    with pytest.raises(DataFormatError, match="has no valid rows"):
        check_file(path, on_bad_rows="skip")


def test_parquet_input(tmp_path):
    table = pa.Table.from_pylist(
        [
            {
                "prompt": msgs(("user", "hi")),
                "chosen": msgs(("assistant", "hello")),
                "rejected": msgs(("assistant", "go away")),
            },
            {"prompt": msgs(("user", "hi")), "chosen": msgs(("assistant", "hey")), "rejected": msgs(("assistant", ""))},
        ]
    )
    path = str(tmp_path / "d.parquet")
    pq.write_table(table, path, row_group_size=1)
    assert [i for i, _ in iter_rows(path)] == [0, 1]
    check = check_file(path, on_bad_rows="skip")
    rep = check.report
    assert (check.fmt, rep.rows, rep.bad_rows, rep.desirable + rep.undesirable) == ("paired", 1, 1, 2)
    assert rep.bad_reasons == {"empty_rejected": 1}


def test_unreadable_files(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,completion,label\np,c,1\n")
    with pytest.raises(DataFormatError, match="unsupported file type"):
        check_file(tmp_path / "d.csv")
    (tmp_path / "d.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataFormatError, match="d.parquet: cannot be read as Parquet"):
        check_file(tmp_path / "d.parquet")


def test_error_with_a_ready_message():
    err = DataFormatError("ds row 3: custom problem")
    assert str(err) == "ds row 3: custom problem" and isinstance(err, ValueError)
