"""Training at scale on CPU with real Ray Train + DeepSpeed: ZeRO stages, LoRA, checkpoints, a worker that
dies and is replaced, re-running a stopped job, and a two-node cluster. The precompute pass is shared
through one cache directory, so each test pays only for its training."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from conftest import ROOT, job_env, run_job

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shared-precompute-cache")


def _common(cache_dir) -> list[str]:
    return [f"--precompute.cache_dir={cache_dir}", "--data.eval=none", "--udm.prompt_sample_size=128",
            "--train.logging_steps=1", "--train.eval_steps=0"]


def _history(tmp_path, run_name: str, key: str = "loss"):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bco-ray-tiny")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0], sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda m: m.step)


def _log(tmp_path) -> str:
    return (tmp_path / "job.log").read_text()


def test_zero3_worker_failure_resumes_from_checkpoint(tmp_path, cache_dir):
    proc = run_job(tmp_path, *_common(cache_dir), "--mlflow.run_name=z3", "--train.zero_stage=3",
                   "--train.max_steps=6", "--train.save_steps=2", "--train.inject_failure_at_step=3",
                   "--train.max_failures=1")
    log = _log(tmp_path)
    assert proc.returncode == 0, log[-6000:]
    assert "injected failure: rank 1 exits at step 3" in log
    assert "resumed from checkpoint at step 2" in log
    run, losses = _history(tmp_path, "z3")
    assert run.info.status == "FINISHED"
    assert [m.step for m in losses] == [1, 2, 3, 4, 5, 6]          # every step once, none lost or doubled
    deltas = [m.value for m in _history(tmp_path, "z3", "delta")[1]]
    assert len(deltas) == 6 and all(abs(b - a) < 0.5 for a, b in zip(deltas, deltas[1:]))
    model_dir = tmp_path / "outputs" / "runs" / "z3" / "model"
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    assert (model_dir / "generation_config.json").exists()
    AutoModelForCausalLM.from_pretrained(model_dir)                 # ZeRO-3 shards were gathered
    kept = sorted(p.name for p in (tmp_path / "outputs" / "ray" / "z3").glob("*_step0*"))
    assert kept == ["checkpoint_step0000004", "final_step0000006"]     # keep_checkpoints=2: step 2 pruned


def test_zero0_lora_adapter_loads(tmp_path, cache_dir):
    proc = run_job(tmp_path, *_common(cache_dir), "--mlflow.run_name=lora", "--train.zero_stage=0",
                   "--train.max_steps=4", "--train.lora.enabled=true", "--train.lora.r=4")
    assert proc.returncode == 0, _log(tmp_path)[-6000:]
    from peft import AutoPeftModelForCausalLM, PeftConfig
    adapter = tmp_path / "outputs" / "runs" / "lora" / "model"
    assert (adapter / "adapter_config.json").exists() and PeftConfig.from_pretrained(adapter).r == 4
    model = AutoPeftModelForCausalLM.from_pretrained(adapter)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and max(float(p.abs().max()) for p in lora_b) > 0      # trained (B starts at zero)
    AutoModelForCausalLM.from_pretrained(adapter / "merged")


def test_stopped_job_resumes_when_rerun(tmp_path, cache_dir):
    args = [*_common(cache_dir), "--mlflow.run_name=rerun", "--train.max_steps=4", "--train.save_steps=2",
            "--train.inject_failure_at_step=3", "--train.max_failures=0"]
    first = run_job(tmp_path, *args)
    assert first.returncode != 0                                    # died after the step-2 checkpoint
    run, losses = _history(tmp_path, "rerun")
    assert run.info.status == "FAILED" and "error" in run.data.tags
    assert [m.step for m in losses] == [1, 2]
    second = run_job(tmp_path, *args)                               # same run name: picks up at step 2
    assert second.returncode == 0, _log(tmp_path)[-6000:]
    assert "resumed from checkpoint at step 2" in _log(tmp_path)
    run2, losses = _history(tmp_path, "rerun")
    assert run2.info.run_id == run.info.run_id and run2.info.status == "FINISHED"
    assert [m.step for m in losses] == [1, 2, 3, 4]


TWO_NODES = """
import subprocess, sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "node_ip_address": "127.0.0.1"})
cluster.add_node(num_cpus=4, node_ip_address="127.0.0.1")
cluster.wait_for_nodes()
proc = subprocess.run([sys.executable, *sys.argv[1:]], env={**__import__("os").environ, "RAY_ADDRESS": cluster.address})
cluster.shutdown()
sys.exit(proc.returncode)
"""


def test_two_node_cluster_with_shared_storage(tmp_path, cache_dir):
    storage = tmp_path / "shared-storage"
    cmd = [sys.executable, "-c", TWO_NODES, str(ROOT / "jobs" / "bco.py"), f"--output_dir={tmp_path / 'outputs'}",
           f"--mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *_common(cache_dir),
           "--mlflow.run_name=twonode", "--train.max_steps=4", "--train.save_steps=2",
           "--train.cpus_per_worker=3", f"--train.storage_path={storage}",
           "--precompute.ref_actors=[1,1]", "--precompute.embed_actors=[1,1]"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    ckpt = storage / "twonode" / "checkpoint_step0000002"
    ranks = [json.loads((ckpt / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["node_id"] != ranks[1]["node_id"]              # one worker on each node
    files = os.listdir(ckpt / "ds")
    assert any("zero_pp_rank_0" in f for f in files) and any("zero_pp_rank_1" in f for f in files)
    assert (storage / "twonode" / "final_step0000004" / "model" / "model.safetensors").exists()
