"""Stopping a job by signal. SIGTERM (`ray job stop`, a scheduler, `kill`) and SIGINT (Ctrl-C) raise `Interrupted`
in the driver's main thread, wherever it waits (a Ray Data pass, Ray Train's fit): the job stops its training
workers, marks its MLflow run KILLED and the command exits with 128 + the signal (143, 130).

`ray.init()` replaces the SIGTERM handler with `sys.exit` and Ray Train's fit() installs its own SIGINT handler,
so a job installs these after Ray has started (`stop_signals`) and again inside fit (bco_ray/job/train_stage.py).
No Ray import here."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []  # the signals the handler took, in order
_deferred: list[int] = []  # [depth of `deferred` blocks, then the signals held back in them]


class Interrupted(KeyboardInterrupt):
    """The job was stopped by `signum`; `exit_code` is the shell's status for it (128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def install(before: Callable[[], None] | None = None) -> dict:
    """SIGTERM and SIGINT raise `Interrupted` (in the main thread only: elsewhere Python cannot set handlers);
    `before` runs first (e.g. stop the training workers). The first signal wins: later ones are ignored while
    the job cleans up. Returns the handlers replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        if _deferred and _deferred[0] > 0:  # inside a `deferred` block: raised at its end
            _deferred.append(signum)
            return
        _received.append(signum)
        for s in SIGNALS:  # the clean-up (stop workers, close the MLflow run) runs once, uninterrupted
            signal.signal(s, signal.SIG_IGN)
        if before is not None:
            try:
                before()
            except Exception as e:  # noqa: BLE001 - the job still stops; the caller's clean-up follows
                log.warning("while stopping on %s: %s", signal.Signals(signum).name, e)
        raise Interrupted(signum)

    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _received.clear()
    _deferred[:] = [0]
    for s in SIGNALS:
        signal.signal(s, handler)
    return previous


def interrupted(e: KeyboardInterrupt) -> Interrupted:
    """`e` as an `Interrupted`: Ray's `ray.get` turns the handler's exception into a plain KeyboardInterrupt, so
    the signal is the one the handler took last; a KeyboardInterrupt without one is a Ctrl-C (SIGINT)."""
    if isinstance(e, Interrupted):
        return e
    return Interrupted(_received[-1] if _received else signal.SIGINT)


def restore(previous: dict) -> None:
    for s, h in previous.items():
        signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def stop_signals(before: Callable[[], None] | None = None) -> Iterator[None]:
    """`install` for the duration of the block, the previous handlers restored after it."""
    previous = install(before)
    try:
        yield
    finally:
        restore(previous)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A stop signal taken inside the block takes effect at its end (the handler `install` set runs then): for
    writes that must land together, e.g. a round's metrics and the marker that says they are logged, so that a
    resumed job neither logs them twice nor misses them. Keep such blocks short (no waiting on the cluster)."""
    if not _deferred or threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferred[0] += 1
    try:
        yield
    finally:
        _deferred[0] -= 1
        if _deferred[0] == 0 and len(_deferred) > 1:
            signum = _deferred[1]
            del _deferred[1:]
            signal.raise_signal(signum)


@contextlib.contextmanager
def kept() -> Iterator[None]:
    """The handlers as they are now, restored after the block (whatever a library installed inside it)."""
    previous = (
        {s: signal.getsignal(s) for s in SIGNALS} if threading.current_thread() is threading.main_thread() else {}
    )
    try:
        yield
    finally:
        restore(previous)
