"""A lease on one precompute cache key, so that of several jobs wanting the same pass one computes it and the
others wait for its commit.

The lease is a small JSON file, `<key dir>/LEASE.json`: the owner's token, host, pid, the attempt it writes and a
heartbeat (the owner's wall clock, rewritten every `heartbeat_s` by a background thread while the pass runs).
A lease whose heartbeat is older than `stale_s` belongs to a job that died or hangs: a waiter takes it over.
Clocks of the nodes need to agree to well within `stale_s` (minutes; NTP gives milliseconds).

Taking it, on a local (or NFS) disk: the lease is written to a private file and hard-linked into place
(`os.link` fails when the name exists: an atomic create-if-absent with the content already there). Taking over a
stale lease: a marker named after the stale heartbeat is created with O_CREAT|O_EXCL, so of several waiters
that saw the same stale lease exactly one goes on; it checks the lease is still that one and replaces it
(`os.replace`).

On an object store (s3://, gs://) there is no create-if-absent that every fsspec version offers, so a job
writes its lease when there is none (or a stale one), waits `settle_s`, and reads it back: it holds the lease
only if its own token is there (the store keeps the last write; both jobs read the same winner back).
Residual race: a job whose check-then-write takes longer than `settle_s` can overwrite a lease whose owner
has already read its own token back; both then compute. The result is still correct (each writes its own
attempt; the commit is one atomic PUT and the last one wins), only the work is done twice; the heartbeat
thread of the overwritten owner logs that its lease was taken.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    """How the jobs sharing one cache key coordinate (seconds)."""

    heartbeat_s: float = 30.0  # the owner rewrites its lease this often
    stale_s: float = 600.0  # a lease not rewritten for this long is taken over (20 missed heartbeats)
    settle_s: float = 2.0  # object stores: wait this long after writing a lease before reading it back
    poll_s: float = 10.0  # a waiting job looks for the commit this often
    wait_s: float = 24 * 3600.0  # a waiting job gives up (with an error) after this long
    log_every_s: float = 300.0  # a waiting job says what it waits for this often
    abandoned_s: float = 24 * 3600.0  # an uncommitted attempt not written for this long is removed


def read_lease(fs, path: str) -> dict | None:
    """The lease's content, None when there is none. A body that does not parse is read again (a write may be
    under way where writes are not atomic); one that stays unreadable counts from its modification time."""
    for retry in range(3):
        try:
            state = json.loads(fs.cat_file(path))
            if isinstance(state, dict) and "token" in state:
                return state
        except FileNotFoundError:
            return None
        except ValueError:
            pass
        time.sleep(0.05 * (retry + 1))
    try:
        modified = fs.modified(path).timestamp()
    except (FileNotFoundError, NotImplementedError):
        modified = 0.0
    return {"token": "unreadable", "heartbeat": modified}


def is_live(state: dict | None, timing: Timing, now: float | None = None) -> bool:
    if state is None:
        return False
    return (now if now is not None else time.time()) - float(state.get("heartbeat", 0.0)) <= timing.stale_s


def describe(state: dict, now: float | None = None) -> str:
    age = (now if now is not None else time.time()) - float(state.get("heartbeat", 0.0))
    return f"{state.get('host', '?')} pid {state.get('pid', '?')}, heartbeat {age:.0f} s ago"


class Lease:
    """A held lease: a context manager that heartbeats while the pass runs and removes the lease at the end."""

    def __init__(self, fs, path: str, local: bool, timing: Timing, state: dict):
        self.fs, self.path, self.local, self.timing, self.state = fs, path, local, timing, state
        self.held = True
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name="bco-ray-cache-lease", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            self.held = False
            try:
                if self._still_mine():
                    self.fs.rm_file(self.path)
            except OSError as e:  # the store is unreachable: the lease goes stale, and a waiter takes it over
                log.warning("could not remove the precompute cache lease %s: %s", self.path, e)
        if self.local:
            _remove_quietly(self.state.get("takeover_marker"))

    def note_attempt(self, attempt: str) -> None:
        """Record the attempt this owner writes (an attempt under a live lease is never removed as abandoned)."""
        with self._lock:
            self.state["attempt"] = attempt
            self._write()

    def _still_mine(self) -> bool:
        state = read_lease(self.fs, self.path)
        return state is not None and state.get("token") == self.state["token"]

    def _write(self) -> None:
        self.state["heartbeat"] = time.time()
        _put(self.fs, self.path, self.local, self.state, replace=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.timing.heartbeat_s):
            with self._lock:
                try:
                    mine = self._still_mine()
                    if mine:
                        self._write()
                except OSError as e:  # a store that fails now and then: the next heartbeat tries again
                    log.warning("could not renew the precompute cache lease %s: %s", self.path, e)
                    continue
                if not mine:
                    log.warning(
                        "the lease %s was taken over by another job (this one missed heartbeats for %.0f s); "
                        "both compute the pass, and the last commit wins",
                        self.path,
                        self.timing.stale_s,
                    )
                    return


def try_acquire(fs, path: str, local: bool, timing: Timing) -> Lease | None:
    """The lease at `path` if this job gets it now (none there, or a stale one), else None."""
    seen = read_lease(fs, path)
    if is_live(seen, timing):
        return None
    state = {
        "token": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.time(),
        "heartbeat": time.time(),
        "attempt": None,
    }
    if seen is not None:
        log.warning("taking over the stale precompute cache lease %s (%s)", path, describe(seen))
    if local:
        won = _take_local(fs, path, state, seen)
    else:
        _put(fs, path, False, state, replace=True)
        time.sleep(timing.settle_s)
        won = (read_lease(fs, path) or {}).get("token") == state["token"]
    return Lease(fs, path, local, timing, state) if won else None


def _take_local(fs, path: str, state: dict, seen: dict | None) -> bool:
    if seen is None:
        return _put(fs, path, True, state, replace=False)
    marker = f"{path}.takeover-{seen.get('token')}-{seen.get('heartbeat')}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False  # another waiter is taking over this same stale lease
    if read_lease(fs, path) != seen:  # it changed since we judged it stale: not ours to take
        _remove_quietly(marker)
        return False
    state["takeover_marker"] = marker
    return _put(fs, path, True, state, replace=True)


def _put(fs, path: str, local: bool, state: dict, replace: bool) -> bool:
    """Write the lease; local: atomically (rename over it, or link into place only if absent). False: taken."""
    body = json.dumps(state, sort_keys=True).encode()
    if not local:
        fs.pipe_file(path, body)
        return True
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(body)
    if replace:
        os.replace(tmp, path)
        return True
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        _remove_quietly(tmp)


def _remove_quietly(path: str | None) -> None:
    if path:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
