"""CPU smoke test of the benchmarks (bench/precompute.py, bench/train.py): tiny model, a handful of rows.
Checks that each runs to the end and prints its ratio lines and a parseable `RESULT {json}` line; the numbers
themselves mean nothing on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness import ROOT, job_env

# Several processes (DeepSpeed ranks on gloo) or a bench run: the full suite, not `make test-fast`.
pytestmark = pytest.mark.slow

TINY_DATA = ["--model", "tiny", "--rows", "12"]


def run_bench(script: str, *args: str) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        env=job_env(CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{out[-4000:]}\n{proc.stderr[-4000:]}"
    results = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert results, f"{script} printed no RESULT line\n{out[-4000:]}"
    return json.loads(results[-1][len("RESULT ") :]), out


def test_precompute_bench_smoke():
    res, out = run_bench(
        "precompute.py",
        *TINY_DATA,
        "--prompt-len",
        "8",
        "48",
        "--completion-len",
        "8",
        "48",
        "--batch-size",
        "4",
        "--block-rows",
        "8",
        "--token-budget",
        "512",
    )
    assert "RATIO ours/naive rows/s" in out
    assert res["bench"] == "precompute" and res["rows"] == 12
    for side in ("ours", "naive"):
        assert res[side]["rows_per_s"] > 0 and res[side]["tokens_per_s"] > 0
        assert 0 <= res[side]["padding_fraction"] < 1
    assert res["speedup_rows_per_s"] > 0
    assert res["logps_max_rel_diff"] < 1e-3  # float32 on CPU: both paths compute the same log-probs


TRAIN_ARGS = [
    *TINY_DATA,
    "--seq-len",
    "24",
    "64",
    "--max-length",
    "64",
    "--baseline-batch-size",
    "4",
    "--micro-batch-tokens",
    "256",
    "--warmup",
    "1",
]


def test_train_bench_smoke():
    """One run: the baseline, ZeRO-0 and the DeepSpeed path (single-process ZeRO-2 and ZeRO-3) with the trainer
    loop's own bucketing. DeepSpeed on a fresh CPU machine first JIT-builds its shared-memory comm op (about a
    minute; the suite's first DeepSpeed process pays it)."""
    res, out = run_bench(
        "train.py",
        *TRAIN_ARGS,
        *("--zero", "0", "2", "3", "--bucketing", "trainer", "--micro-batch-size", "4", "--bucket-window", "2"),
    )
    assert "RATIO ours(zero0)/baseline(zero0)" in out
    assert res["bench"] == "train" and res["precompute"]["seconds"] > 0 and res["bucketing"] == "trainer"
    assert res["ours"]["zero0"]["tokens_per_s"] > 0 and res["ours"]["zero0"]["steps"] >= 1
    assert res["baseline"]["tokens_per_s"] > 0 and 0 < res["baseline"]["padding_fraction"] < 1
    r = res["ratios"]["zero0"]
    assert r["train_tokens_per_s"] > 0 and r["e2e_tokens_per_s"] > 0
    for z in ("zero2", "zero3"):
        assert res["ours"][z]["tokens_per_s"] > 0 and res["ours"][z]["optimizer"].startswith("DeepSpeed")
