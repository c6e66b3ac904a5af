"""The real pipeline, end to end, on the embedded defaults: Ray Data pass → 2 Ray Train workers with
DeepSpeed ZeRO-2 → MLflow. Asserts on what a user would look at afterwards."""
from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import run_job

pytestmark = pytest.mark.e2e


def test_job_trains_logs_and_saves(tmp_path, tiny_overrides):
    proc = run_job(tmp_path, *tiny_overrides, "--mlflow.run_name=e2e", "--mlflow.experiment=e2e")
    assert proc.returncode == 0, (tmp_path / "job.log").read_text()[-6000:]
    result = json.loads(next((tmp_path / "outputs" / "runs").glob("e2e/result.json")).read_text())

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2" and run.data.params["train.zero_stage"] == "2"
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "delta", "learning_rate",
                "logps/chosen", "logps/rejected", "grad_norm", "tokens_per_second", "eval/auc"):
        assert key in run.data.metrics, key
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == 30
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < first - 0.02, f"loss did not decrease: first {first:.4f}, last {last:.4f}"
    margins = client.get_metric_history(run.info.run_id, "rewards/margins")
    assert max(m.step for m in margins) == 30 and sorted(margins, key=lambda m: m.step)[-1].value > 0

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "plots", "config.yaml", "precompute", "udm"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/loss.png" in plots and "plots/udm_weights.png" in plots

    # The saved policy loads with plain transformers and moved away from its initial weights.
    trained = AutoModelForCausalLM.from_pretrained(result["model_dir"])
    init = load_file(str(tmp_path / "outputs" / "models" / "tiny-qwen2-seed0" / "model.safetensors"))
    diffs = [float((trained.state_dict()[k] - v).abs().max()) for k, v in init.items()]
    assert max(diffs) > 1e-3
    with torch.no_grad():
        out = trained(torch.tensor([[0, 5, 6, 7]])).logits
    assert torch.isfinite(out).all()

    # The pass ran for this job (cache reuse is asserted in test_precompute.py and test_mlflow.py).
    assert "udm/accuracy" in run.data.metrics and run.data.tags["precompute.reused"] == "False"
