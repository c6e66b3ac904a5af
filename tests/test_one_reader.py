"""One reader for every row (bco_ray/data/reader.py, bco_ray/precompute/read.py): the driver's check and the pass
read {JSON Lines, a JSON array, Parquet, gzip JSON Lines, a UTF-8 BOM, CRLF line ends} the same way, in any mix
across train and eval and inside one directory; `data.on_bad_rows=skip` drops exactly the bad rows and says so;
data larger than the driver checks is checked and counted by the pass's read tasks, before any model loads."""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bco_ray.builtin import BUILTIN_TRAIN, resolve_data
from bco_ray.config.schema import load_config
from bco_ray.data.checks import DataError, check_data, check_source
from bco_ray.data.formats import DataFormatError

SRC = [json.loads(x) for x in open(resolve_data(BUILTIN_TRAIN))][:96]
BAD_JSON = b'{"prompt": "x", "completion": \n'
BAD_LABEL = {"prompt": "What is 1 + 1?", "completion": " 2", "label": "yes"}


def _lines(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def write(path: Path, kind: str, rows: list[dict], bad: bool = False) -> Path:
    """`rows` in one of the six encodings; `bad`: one bad row in the middle (not for Parquet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    half = len(rows) // 2
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    if kind == "json":
        body = rows[:half] + ([BAD_LABEL] if bad else []) + rows[half:]
        path.write_text(json.dumps(body, indent=1))
        return path
    body = _lines(rows[:half]) + (BAD_JSON if bad else b"") + _lines(rows[half:])
    if kind == "bom":
        body = b"\xef\xbb\xbf" + body
    if kind == "crlf":
        body = body.replace(b"\n", b"\r\n")
    if kind == "gzip":
        path.write_bytes(gzip.compress(body))
        return path
    path.write_bytes(body)
    return path


KINDS = {
    "jsonl": "a.jsonl",
    "json": "b.json",
    "parquet": "c.parquet",
    "gzip": "d.jsonl.gz",
    "bom": "e.jsonl",
    "crlf": "f.jsonl",
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_encoding_reads_every_row(tmp_path, kind):
    rows = SRC[:10]
    rep = check_source(str(write(tmp_path / KINDS[kind], kind, rows)), "error")
    assert (rep.rows, rep.labels.desirable, rep.complete) == (10, sum(r["label"] for r in rows), True)
    if kind != "parquet":
        with pytest.raises(DataFormatError, match=r"row 5.*(not valid JSON|label)"):
            check_source(str(write(tmp_path / "bad" / KINDS[kind], kind, rows, bad=True)), "error")
        skipped = check_source(str(tmp_path / "bad" / KINDS[kind]), "skip")
        assert (skipped.rows, skipped.bad_rows) == (10, 1)


def test_a_directory_may_mix_encodings_and_the_driver_check_can_stop_early(tmp_path):
    for i, kind in enumerate(KINDS):
        write(tmp_path / "d" / KINDS[kind], kind, SRC[8 * i : 8 * i + 8])
    rep = check_source(str(tmp_path / "d"), "error")
    assert rep.rows == 48 and len(rep.units) == 6 and rep.complete
    part = check_source(str(tmp_path / "d"), "error", max_rows=20)
    assert 20 <= part.rows < 48 and not part.complete  # the rest is the pass's to check


def test_parquet_train_with_jsonl_eval_is_checked_as_read(tmp_path):
    cfg = load_config(
        overrides={
            "output_dir": str(tmp_path / "o"),
            "data": {
                "train": str(write(tmp_path / "t.parquet", "parquet", SRC[:40])),
                "eval": str(write(tmp_path / "e.jsonl", "jsonl", SRC[40:60])),
            },
            "udm": {"enabled": False},
        }
    )
    rep = check_data(cfg)
    assert (rep.train.rows, rep.eval.rows, rep.complete) == (40, 20, True)


def _matrix(tmp_path: Path) -> tuple[Path, Path, list[dict], list[dict]]:
    """train: one file of each encoding, eval: the same encodings with other rows; a bad row in every text file."""
    train, eval_, chunks = tmp_path / "train", tmp_path / "eval", [SRC[i : i + 12] for i in range(0, 96, 12)]
    kept_train, kept_eval = [], []
    for i, kind in enumerate(KINDS):
        rows = chunks[i] if i < 4 else chunks[i][:6]
        write(train / KINDS[kind], kind, rows, bad=kind != "parquet")
        kept_train += rows
        other = (chunks[i + 4] if i < 4 else chunks[i][6:])[:4]
        write(eval_ / KINDS[kind], kind, other, bad=kind in ("bom", "gzip"))
        kept_eval += other
    return train, eval_, kept_train, kept_eval


@pytest.fixture
def small_blocks(ray_client):
    """This process as a driver on the session's 2-CPU head, with tiny blocks."""
    ctx = ray_client.data.DataContext.get_current()
    old = ctx.target_max_block_size
    ctx.target_max_block_size = 32 * 1024  # force many small blocks: the pass must stream them
    yield ray_client
    ctx.target_max_block_size = old


@pytest.mark.e2e
def test_the_pass_trains_exactly_the_valid_rows_and_reuses_its_cache(tmp_path, small_blocks, caplog, monkeypatch):
    """One real pass over the whole matrix, with the driver checking only its first rows: the read tasks check
    and count the rest; the rows in the cache are exactly the valid rows, tokenized as the pass tokenizes, in
    many blocks, shuffled by Ray Data's all-to-all shuffle (local_shuffle_max_rows=0: the large-data path; every
    other job here takes the seeded local permutation), UDM-weighted; the entry is reused, and not reused when forced
    or when a committed file is damaged."""
    import dataclasses

    import ray

    from bco_ray.data.reader import ReadUnit
    from bco_ray.job.locations import resolve_locations
    from bco_ray.job.run import resolve_paths
    from bco_ray.precompute import pipeline, read, stages
    from bco_ray.precompute.sizing import pass_resources

    train, eval_, kept_train, kept_eval = _matrix(tmp_path)
    data = {"train": str(train), "eval": str(eval_), "on_bad_rows": "skip", "max_length": 64, "max_prompt_length": 48}
    over = {
        "output_dir": str(tmp_path / "out"),
        "udm": {"prompt_sample_size": 64},
        "precompute": {"batch_size": 16, "local_shuffle_max_rows": 0},
    }
    cfg = resolve_locations(load_config(overrides={**over, "data": {**data, "driver_check_rows": 10}}))
    report = check_data(cfg)
    assert not report.complete
    paths, _ = resolve_paths(cfg)
    first = pipeline.run_precompute(cfg, paths, report, pass_resources(ray.cluster_resources()["CPU"], 1, False))
    assert not first.reused
    full = check_data(load_config(overrides={**over, "data": data}))  # the driver's whole check, for comparison
    kw = pipeline._score_kwargs(cfg, paths, {True: 1, False: 1}, None)["tokenize_kwargs"]
    for name, kept, bad in (("train", kept_train, 5), ("eval", kept_eval, 2)):
        rep, whole = getattr(report, name), getattr(full, name)
        assert rep.complete and (rep.rows, rep.bad_rows) == (len(kept), bad) == (whole.rows, whole.bad_rows)
        assert rep.labels == whole.labels and rep.fingerprint == whole.fingerprint
        units = [ReadUnit(name, "x", kind="memory", dataset=kept)]
        want = stages.tokenize(read.checked_table(units, "error"), split=name, **kw)
        files = sorted(Path(first.dir).glob(f"split={name}/*.parquet"))
        got = pq.read_table(files)
        assert Counter(map(tuple, got.column("input_ids").to_pylist())) == Counter(
            map(tuple, want.column("input_ids").to_pylist())
        )
    assert len(files) > 1 or pq.ParquetFile(files[0]).metadata.num_row_groups > 1  # many blocks
    table = pq.read_table(sorted(Path(first.dir).glob("split=train/*.parquet")))
    assert {"input_ids", "prompt_len", "label", "ref_logps", "udm_weight", "row_id"} <= set(table.column_names)
    assert not {"prompt_embedding", "prompt_text", "fit_sample"} & set(table.column_names)
    cache = tmp_path / "out" / "cache"
    assert not list(cache.rglob("scored")) and not list(cache.rglob("*.pkl")) and list(cache.rglob("classifier.json"))
    w, lab = table.column("udm_weight").to_numpy(), table.column("label").to_numpy(zero_copy_only=False)
    assert (w[lab] == 1).all() and (w[~lab] >= 0.5).all() and (w[~lab] <= 10).all() and w[~lab].std() > 0
    again = check_data(cfg)  # a hit: the counts of the whole data come back from the cache record
    second = pipeline.run_precompute(cfg, paths, again)
    assert second.reused and second.dir == first.dir and again.complete and again.train.rows == len(kept_train)
    record = json.loads((tmp_path / "out" / "cache" / first.key / "COMPLETE.json").read_text())
    listed = {k: v for k, v in record["files"].items() if k.startswith("split=train/")}
    assert sum(v["rows"] for v in listed.values()) == len(table) and len(listed) == len(files)  # what reuse checks
    # Not reused when forced, nor when a committed file of this pass's output was cut short (a killed upload, a
    # full disk): the run names the file and runs a new pass (stubbed here: the pass itself ran above, and the
    # repair of a damaged entry, new pass and reuse included, is tests/test_cache_integrity.py's).
    passes = []
    monkeypatch.setattr(pipeline, "_run_pass", lambda *a: passes.append(a[2].key) or "a new pass")
    train_files = sorted(Path(first.dir).glob("split=train/*.parquet"))
    with open(train_files[0], "r+b") as f:
        f.truncate(train_files[0].stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="bco_ray.precompute.cache"):
        assert pipeline.run_precompute(cfg, paths, report) == "a new pass" and passes == [first.key]
    assert any(str(train_files[0]) in r.getMessage() and "recomputing" in r.getMessage() for r in caplog.records)
    forced = dataclasses.replace(cfg, precompute=dataclasses.replace(cfg.precompute, force=True))
    assert pipeline.run_precompute(forced, paths, report) == "a new pass" and passes == [first.key, first.key]


@pytest.mark.e2e
def test_a_bad_row_past_the_driver_check_stops_the_pass_before_any_model_loads(tmp_path, ray_client):
    """The driver checked only the first rows; the read tasks find the bad row and the job gets its file/row
    error (exit status 2), not Ray's wrapper, before the scoring actors start."""
    import ray

    from bco_ray.job.locations import resolve_locations
    from bco_ray.job.run import resolve_paths
    from bco_ray.precompute import pipeline
    from bco_ray.precompute.sizing import pass_resources

    write(tmp_path / "d" / "a.jsonl", "jsonl", SRC[:40])
    write(tmp_path / "d" / "b.jsonl", "crlf", SRC[40:60], bad=True)
    over = {"output_dir": str(tmp_path / "o"), "udm": {"enabled": False}, "train": {"num_workers": 1}}
    cfg = resolve_locations(
        load_config(overrides={**over, "data": {"train": str(tmp_path / "d"), "eval": None, "driver_check_rows": 10}})
    )
    report = check_data(cfg)
    assert not report.complete and report.train.rows == 10
    paths, _ = resolve_paths(cfg)
    with pytest.raises(DataFormatError, match=r"b\.jsonl row 10: line 11 is not valid JSON") as e:
        pipeline.run_precompute(cfg, paths, report, pass_resources(ray.cluster_resources()["CPU"], 1, False))
    assert e.value.exit_code == 2 and not list((tmp_path / "o").rglob("*.parquet"))


def test_trainable_checks_run_on_the_full_counts(tmp_path):
    write(tmp_path / "t.jsonl", "jsonl", [r for r in SRC if r["label"]][:10])
    cfg = load_config(
        overrides={"output_dir": str(tmp_path / "o"), "data": {"train": str(tmp_path / "t.jsonl"), "eval": None}}
    )
    with pytest.raises(DataError, match="only desirable rows"):
        check_data(cfg)
