"""The precompute cache: a key derived from everything that changes the enriched dataset, an all-or-nothing
commit that works on a local disk and on object stores (s3://, gs://) alike, a check of what is reused, and a
lease so that of several jobs wanting the same key one computes and the others reuse its result.

Layout: <root>/<key>/attempt-<id>/{split=train,split=eval}/*.parquet, summary.json, classifier.json
        <root>/<key>/COMPLETE.json   ← written last, names the attempt and lists its files; nothing else is trusted.
        <root>/<key>/LEASE.json      ← while a job computes the pass (bco_ray/precompute/lease.py).
A crashed pass leaves an attempt directory without COMPLETE.json, which no later run reads; a job opening the
key removes attempts that are neither committed nor under a live lease and have not been written for a day.

What is checked on reuse, and why that: COMPLETE.json records each file's size, each Parquet file's row count
(from its footer) and, where the store lists one (S3), its ETag. Reuse lists the attempt once (one LIST call
per 1000 objects on S3) and compares names, sizes and ETags, then reads every Parquet footer (on S3 a HEAD and one
64 KiB ranged GET per file, 16 files at a time) and compares row counts. That catches a truncated or missing file, a stray one and
a file rewritten since the commit (on S3 any rewrite, by its ETag; elsewhere one that changes the file's size or
row count), at a cost that grows with the number of files, not their bytes; a content checksum of
every byte on every reuse would read the whole cache (100 GB) each time, which is what the cache exists to avoid. A check
that fails makes the job recompute, with a warning naming the file and what is wrong: the entry is a cache,
recomputing is always correct, and a job failing on a damaged entry would only make the user pass
`--precompute.force`, which does the same thing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import fsspec
import pyarrow.parquet as pq

from bco_ray.errors import ResourcesError
from bco_ray.precompute.lease import Lease, Timing, describe, is_live, read_lease, try_acquire

PASS_VERSION = 2  # 2: fused scoring actors, seeded local shuffle, reference in the training dtype
FOOTER_THREADS = 16  # Parquet footers read at once (small ranged reads: latency-bound on object stores)

log = logging.getLogger(__name__)
T = TypeVar("T")


class CacheWaitTimeout(ResourcesError):
    """Another job held the cache key's lease for longer than this job waits."""


def cache_key(parts: dict) -> str:
    blob = json.dumps({"pass_version": PASS_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class Cache:
    def __init__(self, root: str, key: str, timing: Timing | None = None):
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.protocol = root.split("://")[0] if "://" in root else None
        self.local = self.protocol in (None, "file", "local")
        self.key = key
        self.key_dir = f"{self.root}/{key}"
        self.timing = timing or Timing()
        self.lease: Lease | None = None  # held while this job computes the pass

    def uri(self, path: str) -> str:
        return f"{self.protocol}://{path}" if self.protocol else path

    def complete(self) -> dict | None:
        """The committed attempt's record, or None when there is no complete cache under this key (not yet
        verified: `verify`)."""
        self.refresh()
        marker = f"{self.key_dir}/COMPLETE.json"
        try:  # one GET: the marker may be replaced by another job's commit at any time
            record = json.loads(self.fs.cat_file(marker))
        except FileNotFoundError:
            return None
        except ValueError:  # being written where writes are not atomic, or damaged: no entry (yet)
            log.warning("the precompute cache marker %s does not parse; not reusing it", self.uri(marker))
            return None
        if not self.fs.exists(f"{self.key_dir}/{record['attempt']}/summary.json"):
            return None
        return record

    def refresh(self) -> None:
        """Forget the listings fsspec cached under this key: s3fs keeps each listing for the life of the process,
        and other jobs write here (a commit would stay invisible to a job that listed the key before it)."""
        self.fs.invalidate_cache(self.key_dir)
        for path in [p for p in list(self.fs.dircache) if p.startswith(f"{self.key_dir}/")]:
            self.fs.dircache.pop(path, None)

    def new_attempt(self) -> str:
        attempt = f"attempt-{uuid.uuid4().hex[:12]}"
        self.fs.makedirs(f"{self.key_dir}/{attempt}", exist_ok=True)
        if self.lease is not None and self.lease.held:
            self.lease.note_attempt(attempt)
        return attempt

    def write_json(self, path: str, obj: dict) -> None:
        with self.fs.open(path, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)

    def commit(self, attempt: str, record: dict) -> None:
        """Publish the attempt with the list of its files (size, Parquet row count, ETag): one atomic write
        (rename on a local disk, a single PUT on object stores). The attempt it replaces is marked superseded,
        which starts its day before removal."""
        marker = f"{self.key_dir}/COMPLETE.json"
        previous = self._committed_attempt()
        record = {**record, "attempt": attempt, "files": self.manifest(attempt)}
        body = json.dumps(record, indent=2, sort_keys=True, default=str)
        if self.local:
            tmp = Path(f"{marker}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.write_text(body)
            os.replace(tmp, marker)
        else:
            with self.fs.open(marker, "w") as f:
                f.write(body)
        if previous not in (None, attempt):
            self._mark_superseded(previous)

    def invalidate(self) -> None:
        self.refresh()
        previous = self._committed_attempt()
        marker = f"{self.key_dir}/COMPLETE.json"
        if self.fs.exists(marker):
            self.fs.rm(marker)
        if previous is not None:
            self._mark_superseded(previous)

    # ------------------------------------------------------------------ what was committed, and is it still there
    def _files(self, attempt: str) -> dict[str, dict]:
        """relative path → fsspec info of every file of the attempt (one recursive listing)."""
        base = f"{self.key_dir}/{attempt}"
        self.refresh()
        found = self.fs.find(base, detail=True) if self.fs.exists(base) else {}
        return {p[len(base) + 1 :]: info for p, info in found.items() if info.get("type") != "directory"}

    def _rows(self, paths: list[str]) -> list[int | str]:
        """Each Parquet file's row count from its footer (the file's last bytes only), or why it cannot be read."""

        def rows(path: str) -> int | str:
            try:
                with self.fs.open(path, "rb") as f:
                    return pq.read_metadata(f).num_rows
            except Exception as e:  # any unreadable footer is a damaged file, whatever pyarrow calls it
                return f"{type(e).__name__}: {e}"

        with ThreadPoolExecutor(FOOTER_THREADS) as pool:
            return list(pool.map(rows, paths))

    def manifest(self, attempt: str) -> dict[str, dict]:
        files = self._files(attempt)
        base = f"{self.key_dir}/{attempt}"
        entries = {name: {"size": int(info["size"])} for name, info in files.items()}
        for name, info in files.items():
            if etag := _etag(info):
                entries[name]["etag"] = etag
        parquet = sorted(n for n in files if n.endswith(".parquet"))
        for name, rows in zip(parquet, self._rows([f"{base}/{n}" for n in parquet])):
            if isinstance(rows, str):
                raise OSError(f"{self.uri(f'{base}/{name}')} was just written and its Parquet footer fails: {rows}")
            entries[name]["rows"] = rows
        return entries

    def verify(self, record: dict) -> str | None:
        """None when the committed attempt's files are those of the commit, else what is wrong (naming files)."""
        if "files" not in record:
            return "its record lists no files (written by an older bco-ray, which did not record them)"
        base = f"{self.key_dir}/{record['attempt']}"
        want, have = record["files"], self._files(record["attempt"])
        problems = []
        for name, w in sorted(want.items()):
            uri = self.uri(f"{base}/{name}")
            h = have.get(name)
            if h is None:
                problems.append(f"{uri} is missing")
            elif int(h["size"]) != w["size"]:
                problems.append(f"{uri} is {h['size']} bytes, {w['size']} were committed (truncated or rewritten)")
            elif "etag" in w and _etag(h) not in (None, w["etag"]):
                problems.append(f"{uri} was rewritten after the commit (ETag {_etag(h)}, committed {w['etag']})")
        problems += [f"{self.uri(f'{base}/{n}')} was not part of the commit" for n in sorted(set(have) - set(want))]
        if not problems:
            counted = sorted(n for n in want if "rows" in want[n])
            for name, rows in zip(counted, self._rows([f"{base}/{n}" for n in counted])):
                if rows != want[name]["rows"]:
                    got = rows if isinstance(rows, str) else f"{rows} rows, {want[name]['rows']} were committed"
                    problems.append(f"{self.uri(f'{base}/{name}')}: {got}")
        if not problems:
            return None
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        return "; ".join(problems[:3]) + more

    # ------------------------------------------------------------------ attempts nobody will commit
    def _committed_attempt(self) -> str | None:
        try:
            return json.loads(self.fs.cat_file(f"{self.key_dir}/COMPLETE.json"))["attempt"]
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def _mark_superseded(self, attempt: str) -> None:
        """A file written into an attempt that stops being the committed one: a job may still be reading it, so
        its day before removal starts now."""
        if self.fs.exists(f"{self.key_dir}/{attempt}"):
            self.fs.pipe_file(f"{self.key_dir}/{attempt}/SUPERSEDED.json", json.dumps({"at": time.time()}).encode())

    def _last_written(self, attempt: str) -> float:
        infos = self._files(attempt)
        if not infos:
            return _mtime(self.fs.info(f"{self.key_dir}/{attempt}")) or time.time()
        return max((_mtime(i) or time.time()) for i in infos.values())

    def remove_abandoned(self) -> list[str]:
        """Remove the attempts that are neither committed nor under a live lease and were last written more than
        `timing.abandoned_s` ago (a crashed pass, or an entry superseded a day ago). Returns their names."""
        self.refresh()
        keep = {self._committed_attempt()}
        lease = read_lease(self.fs, f"{self.key_dir}/LEASE.json")
        if is_live(lease, self.timing):
            keep.add(lease.get("attempt"))
        removed = []
        entries = self.fs.ls(self.key_dir, detail=False) if self.fs.exists(self.key_dir) else []
        for path in entries:
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if not name.startswith("attempt-") or name in keep:
                continue
            if time.time() - self._last_written(name) > self.timing.abandoned_s:
                self.fs.rm(f"{self.key_dir}/{name}", recursive=True)
                removed.append(name)
                log.info("removed the abandoned precompute attempt %s", self.uri(f"{self.key_dir}/{name}"))
        return removed

    # ------------------------------------------------------------------ one job computes, the others wait
    def try_lease(self) -> Lease | None:
        self.fs.makedirs(self.key_dir, exist_ok=True)  # a local directory; nothing on object stores
        self.lease = try_acquire(self.fs, f"{self.key_dir}/LEASE.json", self.local, self.timing)
        return self.lease

    def usable(self, bad: str | None = None) -> tuple[dict | None, str | None]:
        """(the committed record if it passes `verify`, else None; the attempt known to be damaged). An attempt
        already found damaged (`bad`) is not checked again."""
        record = self.complete()
        if record is None or record["attempt"] == bad:
            return None, bad
        problem = self.verify(record)
        if problem is None:
            return record, bad
        log.warning(
            "the precompute cache entry %s is damaged, recomputing it: %s",
            self.uri(f"{self.key_dir}/{record['attempt']}"),
            problem,
        )
        return None, record["attempt"]


def reuse_or_compute(cache: Cache, compute: Callable[[], T], reuse: Callable[[dict], T], force: bool = False) -> T:
    """The one way a job gets a cache entry: reuse a committed one that passes its check; else take the key's
    lease and `compute` (which writes an attempt and commits it); while another job holds the lease, wait for
    its commit, and take over when its heartbeat stops. A compute that fails releases the lease, and a waiting
    job then computes. `force`: drop the committed entry first (a pass another job is running is still
    waited for and reused: it is a fresh one)."""
    if force:
        cache.invalidate()
    cache.remove_abandoned()
    t0 = next_log = time.monotonic()
    bad: str | None = None
    while True:
        record, bad = cache.usable(bad)
        if record is not None:
            return reuse(record)
        lease = cache.try_lease()
        if lease is not None:
            with lease:
                record, bad = cache.usable(bad)  # committed by a job that released the lease just now
                return reuse(record) if record is not None else compute()
        now = time.monotonic()
        holder = read_lease(cache.fs, f"{cache.key_dir}/LEASE.json") or {}
        if now - t0 > cache.timing.wait_s:
            raise CacheWaitTimeout(
                f"waited {now - t0:.0f} s for another job ({describe(holder)}) computing the precompute cache "
                f"entry {cache.uri(cache.key_dir)}; run again when it is done, or remove "
                f"{cache.uri(cache.key_dir)}/LEASE.json if that job is gone"
            )
        if now >= next_log:
            log.info(
                "waiting for another job (%s) to commit the precompute cache entry %s (waited %.0f s of at most %.0f)",
                describe(holder),
                cache.uri(cache.key_dir),
                now - t0,
                cache.timing.wait_s,
            )
            next_log = now + cache.timing.log_every_s
        time.sleep(cache.timing.poll_s)


def _etag(info: dict) -> str | None:
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    return str(etag).strip('"') if etag else None


def _mtime(info: dict) -> float | None:
    """Last modification time from an fsspec listing entry (local: mtime; S3: LastModified; GCS: updated)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified"):
        v = info.get(key)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, datetime):
            return v.timestamp()
        if isinstance(v, str):
            try:
                return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None
