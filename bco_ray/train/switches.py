"""Testing switches of a training run (train.inject_failure_at_step, train.inject_nan_at_step, train.record_rows):
a worker that dies, a step whose losses are NaN, the rows each step trained on."""

from __future__ import annotations

import json
import os

from bco_ray.console import console


def inject_failure_if_due(
    at_step: int, step: int, micro: int, gas: int, rank: int, world: int, storage_dir: str
) -> None:
    """Testing switch (train.inject_failure_at_step): the last rank dies, once per run, right after the
    optimizer step `at_step`, so that Ray Train must replace it and resume from the latest checkpoint."""
    if at_step <= 0 or step != at_step or micro % gas or rank != world - 1:
        return
    marker = os.path.join(storage_dir, f"injected_failure_step{at_step}")
    if os.path.exists(marker):
        return
    os.makedirs(storage_dir, exist_ok=True)
    open(marker, "w").close()
    console(f"[bco-ray] injected failure: rank {rank} exits at step {step}")
    os._exit(1)


def record_rows(storage_dir: str, rank: int, step: int, rows: list) -> None:
    """Testing switch (train.record_rows): the row ids each optimizer step trained on, one line per step."""
    os.makedirs(os.path.join(storage_dir, "rows"), exist_ok=True)
    with open(os.path.join(storage_dir, "rows", f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "rows": [int(r) for r in rows]}) + "\n")


def inject_nan_if_due(at_step: int, step: int, batch: dict) -> None:
    """Testing switch (train.inject_nan_at_step): the reference log-probs of the micro-batches of optimizer step
    `at_step` become NaN, as a diverging run's would: NaN losses, metrics, gradients and then weights."""
    if at_step > 0 and step == at_step:
        batch["ref_logps"] = batch["ref_logps"] * float("nan")
