"""Test hooks for the training workers (bco_ray/train/hooks.py), installed with
`BCO_RAY_TRAIN_HOOKS=<this file>:install` and set by `BCO_RAY_TRAIN_HOOK_*` variables (the driver hands both to
the workers): the last rank dies once after step N (FAIL_AT_STEP), step N's losses become NaN (NAN_AT_STEP), and
each rank appends the row ids of every step to <storage>/rows/rank<r>.jsonl (RECORD_ROWS)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bco_ray.console import console
from bco_ray.train import hooks

FAIL, NAN, ROWS = "BCO_RAY_TRAIN_HOOK_FAIL_AT_STEP", "BCO_RAY_TRAIN_HOOK_NAN_AT_STEP", "BCO_RAY_TRAIN_HOOK_RECORD_ROWS"


def use(monkeypatch, fail_at_step: int = 0, nan_at_step: int = 0, record_rows: bool = False) -> None:
    """Install these hooks in the jobs this test starts (their environment is this process's)."""
    monkeypatch.setenv(hooks.ENV, f"{Path(__file__).resolve()}:install")
    for name, value in ((FAIL, fail_at_step), (NAN, nan_at_step), (ROWS, int(record_rows))):
        monkeypatch.setenv(name, str(value))


def install() -> None:
    fail_at, nan_at = int(os.environ.get(FAIL, 0)), int(os.environ.get(NAN, 0))
    if nan_at:
        hooks.before_micro_batch(lambda step, batch: _poison(step, batch, nan_at))
    if fail_at:
        hooks.at_step_end(lambda end: _fail(end, fail_at))
    if os.environ.get(ROWS, "0") == "1":
        hooks.at_step_end(_record_rows)


def _poison(step: int, batch, at_step: int) -> None:
    """The reference log-probs of step `at_step` become NaN, as a diverging run's would: NaN losses, metrics,
    gradients and then weights."""
    if step == at_step:
        batch.ref_logps = batch.ref_logps * float("nan")


def _fail(end: hooks.StepEnd, at_step: int) -> None:
    """The last rank dies, once per run, right after optimizer step `at_step`, so that Ray Train must replace it
    and resume from the latest checkpoint."""
    if end.step != at_step or end.rank != end.world - 1:
        return
    marker = os.path.join(end.storage_dir, f"injected_failure_step{at_step}")
    if os.path.exists(marker):
        return
    os.makedirs(end.storage_dir, exist_ok=True)
    open(marker, "w").close()
    console(f"[bco-ray] injected failure: rank {end.rank} exits at step {end.step}")
    os._exit(1)


def _record_rows(end: hooks.StepEnd) -> None:
    """The row ids each optimizer step trained on, one line per step."""
    os.makedirs(os.path.join(end.storage_dir, "rows"), exist_ok=True)
    with open(os.path.join(end.storage_dir, "rows", f"rank{end.rank}.jsonl"), "a") as f:
        f.write(json.dumps({"step": end.step, "rows": end.row_ids}) + "\n")
