"""The precompute cache checks what it reuses, and jobs sharing a key compute it once (fast tier: no Ray).

`run_precompute` gets its entry only through `reuse_or_compute` (the real pass is its `compute`), so the fake
passes here exercise the same coordination a real job goes through; tests/test_precompute.py runs the real pass
once over a damaged entry. The logic is the same on a local disk and on object stores except for how the lease
is taken: the object-store way (write, settle, read back) is tested here on a local directory through fsspec."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bco_ray.precompute.cache import Cache, CacheWaitTimeout, reuse_or_compute
from bco_ray.precompute.lease import Timing, read_lease, try_acquire

FAST = Timing(heartbeat_s=0.05, stale_s=5.0, settle_s=0.1, poll_s=0.02, wait_s=20.0, log_every_s=0.5)


def fake_pass(cache: Cache, calls: list, rows: int = 10, delay: float = 0.0):
    """What `_run_pass` does to the cache: a new attempt, Parquet files, summary.json, commit."""

    def compute():
        attempt = cache.new_attempt()
        calls.append(attempt)
        train = Path(cache.key_dir) / attempt / "split=train"
        train.mkdir(parents=True)
        pq.write_table(pa.table({"x": list(range(rows))}), train / "part-0.parquet")
        pq.write_table(pa.table({"x": list(range(3))}), train / "part-1.parquet")
        time.sleep(delay)
        cache.write_json(f"{cache.key_dir}/{attempt}/summary.json", {"rows": rows + 3})
        cache.commit(attempt, {"train": str(train)})
        return "computed", attempt

    return compute


def reuse(record: dict):
    return "reused", record["attempt"]


def committed(tmp_path: Path, key: str = "k") -> tuple[Cache, dict]:
    cache = Cache(str(tmp_path), key, FAST)
    reuse_or_compute(cache, fake_pass(cache, []), reuse)
    return cache, cache.complete()


# ------------------------------------------------------------------ what the commit records, what reuse checks
def test_commit_records_each_files_size_and_row_count(tmp_path):
    cache, record = committed(tmp_path)
    train = tmp_path / "k" / record["attempt"] / "split=train"
    files = record["files"]
    assert files["split=train/part-0.parquet"] == {"size": (train / "part-0.parquet").stat().st_size, "rows": 10}
    assert files["split=train/part-1.parquet"]["rows"] == 3
    assert files["summary.json"]["size"] == (train.parent / "summary.json").stat().st_size
    assert cache.verify(record) is None
    assert reuse_or_compute(cache, fake_pass(cache, calls := []), reuse) == ("reused", record["attempt"])
    assert calls == []


def test_a_truncated_parquet_file_is_named_and_the_entry_recomputed(tmp_path, caplog):
    cache, record = committed(tmp_path)
    bad = tmp_path / "k" / record["attempt"] / "split=train" / "part-0.parquet"
    size = bad.stat().st_size
    with open(bad, "r+b") as f:
        f.truncate(size // 2)  # what a killed upload or a full disk leaves
    problem = cache.verify(record)
    assert str(bad) in problem and f"{size // 2} bytes, {size} were committed" in problem
    calls: list = []
    with caplog.at_level(logging.WARNING, logger="bco_ray.precompute.cache"):
        got = reuse_or_compute(Cache(str(tmp_path), "k", FAST), fake_pass(cache, calls), reuse)
    assert got == ("computed", calls[0]) and calls[0] != record["attempt"]
    assert any(str(bad) in r.getMessage() and "recomputing" in r.getMessage() for r in caplog.records)
    again = Cache(str(tmp_path), "k", FAST)
    assert again.verify(again.complete()) is None  # the new entry is whole
    assert (bad.parent.parent / "SUPERSEDED.json").exists()  # the damaged one waits a day, then goes


def test_damage_a_size_check_cannot_see_is_caught_by_the_footer_or_the_listing(tmp_path):
    cache, record = committed(tmp_path)
    adir = tmp_path / "k" / record["attempt"]
    part1 = adir / "split=train" / "part-1.parquet"
    data = bytearray(part1.read_bytes())
    data[-12:-8] = b"\xff\xff\xff\x7f"  # same size, footer length garbled
    part1.write_bytes(bytes(data))
    assert str(part1) in cache.verify(record)
    (adir / "split=train" / "part-1.parquet").unlink()
    (adir / "split=train" / "part-9.parquet").write_bytes(b"stray")
    problem = cache.verify(record)
    assert f"{part1} is missing" in problem and "part-9.parquet was not part of the commit" in problem


def test_an_entry_that_lists_no_files_is_recomputed(tmp_path):
    cache, record = committed(tmp_path)
    del record["files"]  # as an older bco-ray wrote it
    (tmp_path / "k" / "COMPLETE.json").write_text(json.dumps(record))
    assert "lists no files" in cache.verify(cache.complete())
    calls: list = []
    assert reuse_or_compute(cache, fake_pass(cache, calls), reuse)[0] == "computed"


def test_force_recomputes_and_a_failed_pass_leaves_no_lease(tmp_path):
    cache, record = committed(tmp_path)
    calls: list = []
    assert reuse_or_compute(cache, fake_pass(cache, calls), reuse, force=True) == ("computed", calls[0])

    def failing():
        cache.new_attempt()
        raise RuntimeError("the pass failed")

    with pytest.raises(RuntimeError):
        reuse_or_compute(cache, failing, reuse, force=True)
    assert not (tmp_path / "k" / "LEASE.json").exists()
    assert reuse_or_compute(cache, fake_pass(cache, calls), reuse)[0] == "computed"  # nothing waits for it


# ------------------------------------------------------------------ jobs sharing one key
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # a job that crashed
@pytest.mark.parametrize("local", [True, False], ids=["local-link", "object-store-write-read-back"])
def test_concurrent_jobs_on_one_key_compute_once(tmp_path, local, caplog):
    calls: list = []
    results: list = []

    def job():
        # Object stores: a job stalled for longer than settle_s between seeing no lease and writing its own could
        # overwrite a held one (the documented residual race); 0.5 s covers this 2-core machine's scheduling.
        cache = Cache(str(tmp_path), "k", dataclasses.replace(FAST, settle_s=0.5))
        cache.local = local  # False: the object stores' protocol, here through fsspec on a local directory
        results.append(reuse_or_compute(cache, fake_pass(cache, calls, delay=0.5), reuse))

    with caplog.at_level(logging.INFO, logger="bco_ray.precompute.cache"):
        threads = [threading.Thread(target=job) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert len(calls) == 1, calls  # exactly one job computed the pass
    assert sorted(results) == [("computed", calls[0])] + [("reused", calls[0])] * 3
    assert any("waiting for another job" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "k" / "LEASE.json").exists()
    assert [p.name for p in (tmp_path / "k").glob("attempt-*")] == [calls[0]]  # no orphaned attempt


def test_the_owner_heartbeats_and_removes_its_lease(tmp_path):
    cache = Cache(str(tmp_path), "k", FAST)
    with cache.try_lease() as lease:
        first = read_lease(cache.fs, f"{cache.key_dir}/LEASE.json")
        attempt = cache.new_attempt()
        time.sleep(0.5)
        later = read_lease(cache.fs, f"{cache.key_dir}/LEASE.json")
        assert later["token"] == first["token"] == lease.state["token"]
        assert later["heartbeat"] > first["heartbeat"] and later["attempt"] == attempt
        assert try_acquire(cache.fs, f"{cache.key_dir}/LEASE.json", True, FAST) is None  # held: nobody else
    assert not (tmp_path / "k" / "LEASE.json").exists()


def write_lease(tmp_path: Path, heartbeat: float, attempt: str | None = None) -> None:
    (tmp_path / "k").mkdir(exist_ok=True)
    state = {"token": "dead", "host": "gone-host", "pid": 1, "heartbeat": heartbeat, "attempt": attempt}
    (tmp_path / "k" / "LEASE.json").write_text(json.dumps(state))


def test_a_stale_lease_is_taken_over(tmp_path, caplog):
    write_lease(tmp_path, time.time() - 3600)  # its owner died an hour ago
    cache = Cache(str(tmp_path), "k", FAST)
    calls: list = []
    with caplog.at_level(logging.WARNING, logger="bco_ray.precompute.lease"):
        assert reuse_or_compute(cache, fake_pass(cache, calls), reuse)[0] == "computed"
    assert any("taking over the stale" in r.getMessage() for r in caplog.records)
    assert not list((tmp_path / "k").glob("LEASE.json*"))  # lease and takeover marker gone


def test_a_waiter_takes_over_when_the_owner_stops_heartbeating(tmp_path, caplog):
    write_lease(tmp_path, time.time())  # live now, never refreshed: the owner dies while the waiter waits
    timing = Timing(heartbeat_s=0.05, stale_s=0.5, settle_s=0.1, poll_s=0.02, wait_s=20.0)
    cache = Cache(str(tmp_path), "k", timing)
    calls: list = []
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="bco_ray.precompute"):
        assert reuse_or_compute(cache, fake_pass(cache, calls), reuse)[0] == "computed"
    assert 0.4 < time.monotonic() - t0 < 5
    messages = [r.getMessage() for r in caplog.records]
    assert any("waiting for another job (gone-host pid 1" in m for m in messages)


def test_a_waiter_gives_up_with_an_error_naming_the_lease(tmp_path):
    write_lease(tmp_path, time.time() + 3600)  # a live owner that never commits (within this wait)
    cache = Cache(str(tmp_path), "k", Timing(poll_s=0.02, wait_s=0.2))
    with pytest.raises(CacheWaitTimeout, match=r"gone-host pid 1.*LEASE\.json if that job is gone"):
        reuse_or_compute(cache, fake_pass(cache, []), reuse)


# ------------------------------------------------------------------ attempts nobody will commit
def test_old_uncommitted_attempts_are_removed_recent_committed_and_leased_ones_kept(tmp_path):
    cache, record = committed(tmp_path)
    key_dir = tmp_path / "k"
    day_ago = time.time() - 2 * 24 * 3600
    names = {}
    for what in ("crashed", "recent", "leased"):
        names[what] = cache.new_attempt()
        (key_dir / names[what] / "part-0.parquet").write_bytes(b"half a file")
    for what in ("crashed", "leased"):
        os.utime(key_dir / names[what] / "part-0.parquet", (day_ago, day_ago))
    for f in (key_dir / record["attempt"]).rglob("*"):
        os.utime(f, (day_ago, day_ago))  # committed long ago: still the entry
    write_lease(tmp_path, time.time(), attempt=names["leased"])  # a job is still writing it
    assert cache.remove_abandoned() == [names["crashed"]]
    left = {p.name for p in key_dir.glob("attempt-*")}
    assert left == {record["attempt"], names["recent"], names["leased"]}
    write_lease(tmp_path, day_ago, attempt=names["leased"])  # that job died
    assert cache.remove_abandoned() == [names["leased"]]
    reuse_or_compute(cache, fake_pass(cache, []), reuse, force=True)  # supersedes the old entry: kept a day
    assert (key_dir / record["attempt"]).exists()
