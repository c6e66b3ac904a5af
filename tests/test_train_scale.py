"""Training at scale on CPU with real Ray Train + DeepSpeed: ZeRO-3 with a worker that dies and is replaced
(an exact resume), and a run that diverges. The jobs run on the session's Ray head and share one precompute
cache, so each test pays only for its training. (Re-running a stopped job under the same run name is tested end
to end once, through `ray job stop`, in test_ray_job_submit.py; two nodes with their own disks and S3 storage in
test_multinode_s3.py; ZeRO-0 + LoRA through the TRL script's --use_peft run, test_trl_script_runs.py.)"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

import train_hooks
from harness import SMALL, TRAIN_ROWS, run_job

pytestmark = pytest.mark.e2e


def _history(tmp_path, run_name: str, key: str = "loss"):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bco-ray-tiny")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0], sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda m: m.step)


def _log(tmp_path) -> str:
    return (tmp_path / "job.log").read_text()


def _trained_rows(storage: Path) -> dict[tuple[int, int], list[int]]:
    """(rank, step) → the row ids that step trained on; a step re-run after a restart replaces its first try."""
    out = {}
    for f in sorted(storage.glob("rows/rank*.jsonl")):
        rank = int(f.stem[4:])
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out[(rank, rec["step"])] = rec["rows"]
    return out


def test_zero3_worker_failure_resumes_from_checkpoint_exactly(tmp_path, ray_head, shared_cache, monkeypatch):
    """One epoch (480 rows = 12 steps of 2 workers × 20 rows) under ZeRO-3 with length bucketing; the last
    worker dies after step 7 and Ray Train resumes both from the step-6 checkpoint. Every step is logged
    once, and the epoch trained every row of the split exactly once: none twice, none skipped."""
    train_hooks.use(monkeypatch, fail_at_step=7, record_rows=True)
    proc = run_job(
        tmp_path,
        *SMALL,
        "--mlflow.run_name=z3",
        "--train.zero_stage=3",
        "--train.micro_batch_size=20",
        "--train.max_steps=12",
        "--train.save_steps=3",
        "--train.max_failures=1",
        head=ray_head,
        cache=shared_cache,
    )
    log = _log(tmp_path)
    assert proc.returncode == 0, log[-6000:]
    assert "injected failure: rank 1 exits at step 7" in log
    assert "resumed from checkpoint at step 6" in log
    run, losses = _history(tmp_path, "z3")
    assert run.info.status == "FINISHED"
    assert [m.step for m in losses] == list(range(1, 13))  # every step once, none lost or doubled
    deltas = [m.value for m in _history(tmp_path, "z3", "delta")[1]]
    assert len(deltas) == 12 and all(abs(b - a) < 0.5 for a, b in zip(deltas, deltas[1:]))

    storage = tmp_path / "outputs" / "ray" / "z3"
    trained = _trained_rows(storage)
    assert sorted(trained) == [(r, s) for r in (0, 1) for s in range(1, 13)]
    result = json.loads((tmp_path / "outputs" / "runs" / "z3" / "result.json").read_text())
    split = pq.read_table(Path(result["precompute_dir"]) / "split=train").column("row_id").to_pylist()
    assert len(split) == TRAIN_ROWS
    assert Counter(r for rows in trained.values() for r in rows) == Counter(split)  # the epoch, exactly

    model_dir = tmp_path / "outputs" / "runs" / "z3" / "model"
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    assert (model_dir / "generation_config.json").exists()
    AutoModelForCausalLM.from_pretrained(model_dir)  # ZeRO-3 shards were gathered
    kept = sorted(p.name for p in storage.glob("*_step0*"))
    assert kept == ["checkpoint_step0000009", "final_step0000012"]  # keep_checkpoints=2: older ones pruned


def test_a_diverging_run_stops_and_publishes_its_last_good_checkpoint(tmp_path, ray_head, shared_cache, monkeypatch):
    """NaN losses at step 5 (the test hook poisons that step's reference log-probs, as a diverging run's
    would): training stops there with one training error (exit 5) naming the step and the step-4 checkpoint,
    whose model (finite weights) is the run's saved and logged model; the MLflow run is FAILED with that error."""
    import torch

    train_hooks.use(monkeypatch, nan_at_step=5)
    proc = run_job(
        tmp_path,
        *SMALL,
        "--mlflow.run_name=nan",
        "--train.num_workers=1",
        "--train.max_steps=8",
        "--train.save_steps=2",
        head=ray_head,
        cache=shared_cache,
    )
    log = _log(tmp_path)
    assert proc.returncode == 5, log[-6000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("bco-ray: training error:")]
    assert "training diverged at step 5 (loss = nan" in line, line
    assert "the model of the last good checkpoint" in line and "checkpoint_step0000004" in line, line
    assert "Traceback" not in proc.stderr  # one error, not a crash in the metrics
    storage = tmp_path / "outputs" / "ray" / "nan"
    assert not list(storage.glob("checkpoint_step000000[5-8]"))  # nothing non-finite was checkpointed
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "outputs" / "runs" / "nan" / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    run, losses = _history(tmp_path, "nan")
    assert run.info.status == "FAILED" and run.data.tags["error_type"] == "TrainingError"
    assert [m.step for m in losses] == [1, 2, 3, 4]  # non-finite values are printed, never logged
    assert "[bco-ray] step 5: loss=nan" in log
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(client.search_logged_models([run.info.experiment_id])) == 1  # the step-4 model, published
