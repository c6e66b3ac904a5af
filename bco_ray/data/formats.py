"""Input row formats for BCO: detection, validation and conversion to unpaired rows, and the rows of a JSON
Lines or Parquet file (a whole file's check: `check_unit` in bco_ray/data/reader.py).

Supported row formats (extra columns are ignored):

* ``unpaired``: ``prompt``, ``completion``, ``label`` (bool, or 0/1)
* ``paired``:   ``prompt``, ``chosen``, ``rejected``  -> two unpaired rows
* ``implicit``: ``chosen``, ``rejected`` sharing a prefix -> prompt = that prefix

Text fields are plain strings, or conversations: lists of ``{"role", "content"}`` messages
(kept as lists here; rendering with the chat template happens in ``tokenize.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq

from bco_ray.errors import InputError

FORMATS = ("unpaired", "paired", "implicit")
REQUIRED = {
    "unpaired": ("prompt", "completion", "label"),
    "paired": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
}
SKIP_HINT = "Fix the row or pass --data.on_bad_rows=skip."


class DataFormatError(InputError, ValueError):
    """A bad input row or file. The message reads "<source> row <index>, field '<field>':
    <problem>. <hint>"; ``reason`` is a short key used to count bad rows in skip mode.
    ``DataFormatError("full message")`` (no problem) uses the message as given."""

    def __init__(
        self,
        source: str,
        problem: str | None = None,
        *,
        index: int | None = None,
        field: str | None = None,
        reason: str = "invalid",
        hint: str = SKIP_HINT,
    ):
        self.source, self.index, self.field, self.reason = source, index, field, reason
        if problem is None:
            super().__init__(str(source))
            return
        where = str(source) + (f" row {index}" if index is not None else "")
        where += f", field '{field}'" if field is not None else ""
        super().__init__(f"{where}: {problem}. {hint}".strip())


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:60] + '...' if len(text) > 60 else text} ({type(value).__name__})"


def as_label(value: Any) -> bool | None:
    """``value`` as a Python bool if it is a boolean or the integer 0/1, else None."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    return None


def detect_format(row: dict, *, source: str = "<data>", index: int = 0) -> str:
    """Return "unpaired", "paired" or "implicit" from the row's columns."""
    if not isinstance(row, dict):
        raise DataFormatError(
            source, f"expected an object (dict), got {_show(row)}", index=index, reason="not_an_object"
        )
    if "completion" in row and "label" in row:
        return "unpaired"
    if "chosen" in row or "rejected" in row:
        return "paired" if "prompt" in row else "implicit"
    if "completion" in row or "label" in row:
        return "unpaired"
    raise DataFormatError(
        source,
        f"unknown format: columns {sorted(row)[:10]} match none of prompt/completion/label "
        "(unpaired), prompt/chosen/rejected (paired) or chosen/rejected (implicit prompt)",
        index=index,
        reason="unknown_format",
        hint="Rename the columns or pass --data.on_bad_rows=skip.",
    )


def _check_text(value: Any, *, source: str, index: int, field: str) -> str:
    """Validate one text field; return its kind, "str" or "list"."""

    def err(problem: str, reason: str) -> DataFormatError:
        return DataFormatError(source, problem, index=index, field=field, reason=reason)

    def check_unicode(text: str, where: str = "") -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise err(
                f"{where}contains an invalid unicode surrogate {text[e.start]!r} at character {e.start}",
                "invalid_unicode",
            ) from None

    if isinstance(value, str):
        if not value.strip():
            raise err("is empty", f"empty_{field}")
        check_unicode(value)
        return "str"
    if isinstance(value, (list, tuple, np.ndarray)):
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise err(
                    f"message {i} must be an object with string 'role' and 'content', got {_show(m)}", "bad_message"
                )
            check_unicode(m["content"], f"message {i} ")
        if not any(m["content"].strip() for m in value):
            raise err("is empty (no message has content)", f"empty_{field}")
        return "list"
    raise err(f"expected a string or a list of {{role, content}} messages, got {_show(value)}", "wrong_type")


def _messages(value: Any) -> str | list[dict]:
    """Strings unchanged; conversations as plain lists of {"role", "content"} dicts."""
    if isinstance(value, str):
        return value
    return [{"role": m["role"], "content": m["content"]} for m in value]


def split_implicit(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Split chosen/rejected at their longest common prefix: (prompt, chosen_rest, rejected_rest).

    Text: character prefix; like TRL's ``extract_prompt``, a space just before the split is
    left to the completions. Conversations: the common leading messages."""
    chosen, rejected = _messages(chosen), _messages(rejected)
    n = min(len(chosen), len(rejected))
    k = next((i for i in range(n) if chosen[i] != rejected[i]), n)
    if isinstance(chosen, str) and 0 < k < n and chosen[k - 1] == " ":
        k -= 1
    return chosen[:k], chosen[k:], rejected[k:]


def check_row(row: dict, *, source: str, index: int, fmt: str) -> None:
    """Raise DataFormatError if ``row`` is not a valid ``fmt`` row."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if not isinstance(row, dict):
        raise DataFormatError(
            source, f"expected an object (dict), got {_show(row)}", index=index, reason="not_an_object"
        )
    for col in REQUIRED[fmt]:
        if col not in row:
            raise DataFormatError(
                source,
                f"missing column (a {fmt}-format row needs {', '.join(REQUIRED[fmt])})",
                index=index,
                field=col,
                reason=f"missing_{col}",
            )
    fields = [c for c in REQUIRED[fmt] if c != "label"]
    kinds = {f: _check_text(row[f], source=source, index=index, field=f) for f in fields}
    for f in fields[1:]:
        if kinds[f] != kinds[fields[0]]:
            raise DataFormatError(
                source,
                f"is a {'string' if kinds[f] == 'str' else 'list of messages'} but "
                f"'{fields[0]}' is not; a row's text fields must be all strings or all "
                "conversations",
                index=index,
                field=f,
                reason="mixed_text_types",
            )
    if fmt == "unpaired" and as_label(row["label"]) is None:
        raise DataFormatError(
            source,
            "expected a boolean (true/false or 0/1), got " + _show(row["label"]),
            index=index,
            field="label",
            reason="label_not_boolean",
        )
    if fmt == "implicit":
        prompt, chosen, rejected = split_implicit(row["chosen"], row["rejected"])
        if not _has_text(prompt):
            raise DataFormatError(
                source,
                "'chosen' and 'rejected' share no common prefix, so the prompt cannot be "
                "inferred; add a 'prompt' column",
                index=index,
                field="chosen",
                reason="no_common_prefix",
            )
        for field, rest in (("chosen", chosen), ("rejected", rejected)):
            if not _has_text(rest):
                raise DataFormatError(
                    source,
                    "is empty after removing the prefix shared with the other response",
                    index=index,
                    field=field,
                    reason="empty_after_common_prefix",
                )


def _has_text(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return any(m["content"].strip() for m in value)


def to_unpaired(row: dict, fmt: str) -> list[dict]:
    """Convert a checked row to 1 (unpaired) or 2 (paired/implicit) {prompt, completion, label}."""
    if fmt == "unpaired":
        return [
            {
                "prompt": _messages(row["prompt"]),
                "completion": _messages(row["completion"]),
                "label": as_label(row["label"]),
            }
        ]
    if fmt == "paired":
        prompt, chosen, rejected = (_messages(row[c]) for c in ("prompt", "chosen", "rejected"))
    elif fmt == "implicit":
        prompt, chosen, rejected = split_implicit(row["chosen"], row["rejected"])
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    return [
        {"prompt": prompt, "completion": chosen, "label": True},
        {"prompt": prompt, "completion": rejected, "label": False},
    ]


# ----------------------------------------------------------------------------- reading files


def _iter_json(path: str) -> Iterator[tuple[int, Any]]:
    """A .json file: JSON Lines, or one JSON array of objects (as `datasets`' json loader reads both)."""
    with fsspec.open(path, "rb", compression="infer") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if path.lower().removesuffix(".gz").endswith(".json") and head.startswith(b"["):
        return _iter_json_array(path)
    return _iter_jsonl(path)


def _iter_json_array(path: str) -> Iterator[tuple[int, Any]]:
    """One JSON array (read whole: JSON Lines stream, an array does not)."""
    with fsspec.open(path, "rb", compression="infer") as f:
        raw = f.read()
    try:
        rows = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataFormatError(
            path,
            f"is not a valid JSON array ({e})",
            reason="invalid_json",
            hint="Fix the file or convert it to JSON Lines.",
        ) from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            row = DataFormatError(path, "is not a JSON object, got " + _show(row), index=i, reason="not_an_object")
        yield i, row


def _iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    """(index, row or DataFormatError) per non-blank line; the error is yielded, not raised. A UTF-8 byte order
    mark and CRLF line ends are read as plain UTF-8 and LF."""
    with fsspec.open(path, "rb", compression="infer") as f:
        index = 0
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
                raw = raw[3:]
            if not raw.strip():
                continue
            i, index = index, index + 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield (
                    i,
                    DataFormatError(
                        path,
                        f"line {lineno} is not valid UTF-8 (byte {raw[e.start : e.start + 1]!r} "
                        f"at byte offset {e.start})",
                        index=i,
                        reason="invalid_utf8",
                        hint="Re-encode the file as UTF-8 or pass --data.on_bad_rows=skip.",
                    ),
                )
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                tip = (
                    " (the file looks like one JSON array; convert it to JSON Lines: one object per line)"
                    if i == 0 and text.lstrip().startswith("[")
                    else ""
                )
                yield (
                    i,
                    DataFormatError(
                        path,
                        f"line {lineno} is not valid JSON ({e.msg} at column {e.colno}){tip}",
                        index=i,
                        reason="invalid_json",
                    ),
                )
                continue
            if not isinstance(row, dict):
                yield (
                    i,
                    DataFormatError(
                        path, f"line {lineno} is not a JSON object, got " + _show(row), index=i, reason="not_an_object"
                    ),
                )
                continue
            yield i, row


def _iter_parquet(path: str, batch_size: int = 1024) -> Iterator[tuple[int, Any]]:
    with fsspec.open(path, "rb") as f:
        try:
            batches = pq.ParquetFile(f).iter_batches(batch_size=batch_size)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataFormatError(
                path,
                f"cannot be read as Parquet ({e})",
                reason="invalid_parquet",
                hint="Check the file or convert it to JSON Lines.",
            ) from e
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield index, row
                index += 1


def iter_raw(path: str) -> Iterator[tuple[int, Any]]:
    """(index, raw row) of one .parquet or JSON (lines) file, unchecked."""
    name = path.lower()
    if name.endswith(".parquet"):
        return _iter_parquet(path)
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return _iter_json(path)
    raise DataFormatError(
        path, "unsupported file type", reason="unsupported_file", hint="Use .jsonl/.json (JSON Lines) or .parquet."
    )


def iter_rows(path: str) -> Iterator[tuple[int, dict]]:
    """Stream (0-based row index, row dict) from a local or fsspec-URI JSONL/Parquet file."""
    for index, row in iter_raw(path):
        if isinstance(row, DataFormatError):
            raise row
        yield index, row
