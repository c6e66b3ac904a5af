"""The real pipeline, end to end, on the embedded defaults: Ray Data pass → 2 Ray Train workers with
DeepSpeed ZeRO-2 → MLflow. Asserts on what a user would look at afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bco_ray.builtin import SFT_DIR

from conftest import run_job
from mlflow_helpers import STEP_KEYS

pytestmark = pytest.mark.e2e


GEN_REWARDS = ("eval/gen/reward", "eval/gen/reward_ref")


def test_job_trains_logs_and_saves(tmp_path, tiny_overrides):
    # With the generation eval on a handful of held-out prompts, one intermediate eval (a policy snapshot).
    proc = run_job(
        tmp_path,
        *tiny_overrides,
        "--mlflow.run_name=e2e",
        "--mlflow.experiment=e2e",
        "--train.eval_steps=15",
        "--eval.num_prompts=8",
        "--eval.max_new_tokens=12",
        "--train.lr=5e-3",
    )  # 30 steps at the demo's 5e-4 move the SFT'd policy's loss too little to test
    assert proc.returncode == 0, (tmp_path / "job.log").read_text()[-6000:]
    result = json.loads(next((tmp_path / "outputs" / "runs").glob("e2e/result.json")).read_text())

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2" and run.data.params["train.zero_stage"] == "2"
    for key in (*STEP_KEYS, "eval/auc"):
        assert key in run.data.metrics, key
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == 30
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < first - 0.02, f"loss did not decrease: first {first:.4f}, last {last:.4f}"
    margins = client.get_metric_history(run.info.run_id, "rewards/margins")
    assert max(m.step for m in margins) == 30 and sorted(margins, key=lambda m: m.step)[-1].value > 0

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "config.yaml", "precompute", "udm"} <= artifacts  # the model: a LoggedModel (MLflow 3)
    assert run.data.tags["model.format"] == "mlflow-transformers" and run.data.tags["model.id"].startswith("m-")
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/loss.png", "plots/udm_weights.png", "plots/gen_score.png"} <= plots

    # Every eval curve starts at step 0 (the reference); the generation eval logged reference vs policy at
    # steps 0, 15 and 30, its tables, and the policy scores no lower than the reference it started from.
    run_id = run.info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "eval/auc")] == [0, 15, 30]
    score = {m.step: m.value for m in client.get_metric_history(run_id, "eval/gen/score")}
    score_ref = {m.step: m.value for m in client.get_metric_history(run_id, "eval/gen/score_ref")}
    assert sorted(score) == sorted(score_ref) == [0, 15, 30] and score[0] == score_ref[0]
    assert score[30] >= score_ref[30], (score, score_ref)
    for key in ("eval/gen/hedged", "eval/gen/hedged_ref", "eval/gen/length", "eval/gen/reward", "eval/gen/reward_ref"):
        assert key in run.data.metrics, key
    # The implicit reward β·(log π − log π_ref) of each side's completions under the policy of that step: exactly 0
    # at step 0 (the policy is the reference); then the policy's own completions score above the reference's (the
    # score above cannot show this: the tiny model rarely gets an answer right).
    reward, reward_ref = ({m.step: m.value for m in client.get_metric_history(run_id, k)} for k in GEN_REWARDS)
    assert reward[0] == reward_ref[0] == 0.0, (reward, reward_ref)
    assert reward[30] > reward_ref[30], (reward, reward_ref)
    assert {a.path for a in client.list_artifacts(run_id, "eval")} >= {
        "eval/generations.json",
        "eval/generations_by_step.json",
    }
    table = json.loads(open(client.download_artifacts(run_id, "eval/generations.json", str(tmp_path))).read())
    assert table["columns"][:4] == ["step", "prompt", "reference", "policy"] and len(table["data"]) == 8
    assert {"score", "score_ref", "reward", "reward_ref"} <= set(table["columns"])
    assert not (tmp_path / "outputs" / "ray" / "e2e" / "generation").exists()  # snapshots removed after the pass

    # The saved policy loads with plain transformers and moved away from its initial weights.
    trained = AutoModelForCausalLM.from_pretrained(result["model_dir"])
    init = load_file(str(SFT_DIR / "model.safetensors"))  # the demo's policy starts from the SFT'd model
    diffs = [float((trained.state_dict()[k] - v).abs().max()) for k, v in init.items()]
    assert max(diffs) > 1e-3
    with torch.no_grad():
        out = trained(torch.tensor([[0, 5, 6, 7]])).logits
    assert torch.isfinite(out).all()

    # The pass ran for this job (cache reuse is asserted in test_precompute.py and test_mlflow_jobs.py).
    assert "udm/accuracy" in run.data.metrics and run.data.tags["precompute.reused"] == "False"
    # The job's result carries what it logged (the API and the model card read it there, not from MLflow).
    history = result["history"]
    assert [h["step"] for h in history if "loss" in h] == list(range(1, 31)) and history[0]["step"] == 0
    assert [h["step"] for h in history if "eval/auc" in h] == [0, 15, 30] and "udm/accuracy" in history[0]
    assert [h["step"] for h in history if "eval/gen/score" in h] == [0, 15, 30] and "time/fit" in history[-1]
    assert f"| loss | {losses[-1]:.4g} |" in (Path(result["model_dir"]) / "README.md").read_text()
