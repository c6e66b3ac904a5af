"""The real pipeline and its MLflow tracking end to end (marked e2e), against a real `mlflow server` on 127.0.0.1
started once for the module:
- the tiny job runs with β=0.1 on the session's Ray head: Ray Data pass (UDM on) → 2 Ray Train workers with
  DeepSpeed ZeRO-2 → MLflow, with the generation eval (held-out prompts, reference vs policy) at steps 0, 15, 30;
- a job with β=0.5 fails after its MLflow run is open (a bad row only the pass's read finds) and is marked FAILED;
- re-run under the same name, on a local Ray of its own (as `make demo` starts one), it continues that MLflow run
  to FINISHED (this time through $MLFLOW_TRACKING_URI), reusing the first job's pass;
- `jobs/compare.py` then compares the two β runs.
The unit tests are in tests/test_mlflow.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bco_ray.builtin import BUILTIN_TRAIN, SFT_DIR, resolve_data
from bco_ray.config.schema import load_config
from bco_ray.job.locations import resolve_locations
from bco_ray.tracking import mlflow_inputs, mlflow_run

from harness import ROOT, TEST_DATA, TRAIN_ROWS, MlflowServer, job_env
from mlflow_helpers import PLOTS, STEP_KEYS, metric_steps, mlflow_globals_restored, png_stats


@pytest.fixture(autouse=True)
def _restore_mlflow_globals():
    with mlflow_globals_restored():
        yield


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port, SQLite backend, artifacts served over HTTP."""
    d = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(d, str(d / "artifacts"))
    try:
        yield server.wait().uri
    finally:
        server.stop()


SUBMIT_COMMIT = "5ab1e" * 8
E2E_ARGS = [
    *TEST_DATA,
    "--train.max_steps=4",
    "--train.logging_steps=1",
    "--train.eval_steps=0",
    "--udm.prompt_sample_size=64",
    "--mlflow.experiment=beta-sweep",
    "--eval.generate=false",
]
# The first job trains for real: 30 steps at 5e-3 (the demo's 5e-4 moves the SFT'd policy's loss too little to
# test), with the generation eval on a handful of held-out prompts and one intermediate eval (a policy snapshot).
A_ARGS = [
    "--mlflow.run_name=beta-0.1",
    "--train.beta=0.1",
    "--mlflow.registered_model_name=bco-beta",
    "--train.max_steps=30",
    "--train.lr=5e-3",
    "--train.eval_steps=15",
    "--eval.generate=true",
    "--eval.num_prompts=8",
    "--eval.max_new_tokens=12",
]
GEN_REWARDS = ("eval/gen/reward", "eval/gen/reward_ref")


def _job(
    tmp: Path, head, *overrides: str, env: dict | None = None, log: str = "job.log"
) -> subprocess.CompletedProcess:
    """The job on `head`, or with head None on a local Ray of its own."""
    cmd = [sys.executable, str(ROOT / "jobs" / "bco.py"), f"--output_dir={tmp / 'outputs'}", *E2E_ARGS, *overrides]
    t0 = time.time()
    env = head.client_env(**(env or {})) if head else job_env(**(env or {}))
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    (tmp / log).write_text(
        f"{' '.join(cmd)}\n{time.time() - t0:.1f} s\n{proc.stdout}\n----- stderr -----\n{proc.stderr}"
    )
    return proc


@pytest.fixture(scope="module")
def jobs(mlflow_server, ray_head, tmp_path_factory):
    """The three jobs, in order, sharing one output dir (so one precompute pass); each run's state right after."""
    tmp = tmp_path_factory.mktemp("mlflow-jobs")
    client = MlflowClient(mlflow_server)
    out: dict = {"tmp": tmp, "uri": mlflow_server}

    def run_state(name: str):
        exp = client.get_experiment_by_name("beta-sweep")
        runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
        assert len(runs) == 1, [r.info.run_id for r in runs]
        return runs[0]

    # The commit as `ray job submit ... -- BCO_RAY_GIT_COMMIT=$(git rev-parse HEAD) python jobs/bco.py` gives it;
    # system metrics sampled every second so that a short job records several.
    proc = _job(
        tmp,
        ray_head,
        f"--mlflow.tracking_uri={mlflow_server}",
        *A_ARGS,
        log="a.log",
        env={"BCO_RAY_GIT_COMMIT": SUBMIT_COMMIT, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"},
    )
    assert proc.returncode == 0, (tmp / "a.log").read_text()[-6000:]
    out["a"] = run_state("beta-0.1")

    # A bad row past the rows the driver checks before Ray: the pass's read finds it, after the run opened.
    rows = [json.loads(x) for x in open(resolve_data(BUILTIN_TRAIN))][:40]
    lines = [json.dumps(r) for r in rows[:20]] + ['{"prompt": "truncated'] + [json.dumps(r) for r in rows[20:]]
    (tmp / "bad-row.jsonl").write_text("\n".join(lines) + "\n")
    proc = _job(
        tmp,
        ray_head,
        f"--mlflow.tracking_uri={mlflow_server}",
        "--mlflow.run_name=beta-0.5",
        "--train.beta=0.5",
        f"--data.train={tmp / 'bad-row.jsonl'}",
        "--data.driver_check_rows=10",
        log="failed.log",
    )
    out["failed_rc"] = proc.returncode
    out["failed"] = run_state("beta-0.5")

    # Same run name, the tracking server named by the environment this time, a working cache, a local Ray.
    proc = _job(
        tmp,
        None,
        "--mlflow.run_name=beta-0.5",
        "--train.beta=0.5",
        "--train.num_workers=1",  # the first job ran 2 workers; this one is about the rerun and the local Ray
        env={"MLFLOW_TRACKING_URI": mlflow_server},
        log="b.log",
    )
    assert proc.returncode == 0, (tmp / "b.log").read_text()[-6000:]
    out["b"] = run_state("beta-0.5")
    return out


@pytest.mark.e2e
def test_job_logs_params_tags_and_step_metrics(jobs, ray_head):
    run = jobs["a"]
    client = MlflowClient(jobs["uri"])
    assert run.info.status == "FINISHED"
    expected = mlflow_run.config_params(
        resolve_locations(
            load_config(
                ROOT / "configs" / "tiny.yaml",
                [  # jobs/bco.py's default
                    f"--output_dir={jobs['tmp'] / 'outputs'}",
                    *E2E_ARGS,
                    f"--mlflow.tracking_uri={jobs['uri']}",
                    *A_ARGS,
                ],
            )
        )
    )
    assert run.data.params == expected  # the whole resolved config, flattened
    tags = run.data.tags
    for key in ("version.ray", "version.deepspeed", "version.torch", "precompute.cache_key", "dataset.train"):
        assert tags.get(key), key
    assert tags["num_workers"] == "2" and tags["num_gpus"] == "0" and tags["precompute.reused"] == "False"
    assert tags["git_commit"] == SUBMIT_COMMIT and tags["git_commit.source"] == "env"  # taken at submit time
    assert tags["ray.job_id"] and tags["ray.dashboard_url"] == ray_head.dashboard  # where it ran
    # System metrics: the driver's (system/*) and the training node's (system/train-node0/*), sampled each second.
    for key in (
        "system/cpu_utilization_percentage",
        "system/system_memory_usage_megabytes",
        "system/train-node0/cpu_utilization_percentage",
    ):
        assert len(client.get_metric_history(run.info.run_id, key)) >= 1, key
    # The data as run inputs: source URI and the digest of the cache key's data fingerprint.
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert sorted(t.value for i in inputs for t in i.tags if t.key == "mlflow.data.context") == [
        "evaluation",
        "training",
    ]
    digests = {i.dataset.digest: json.loads(i.dataset.source) for i in inputs}
    assert digests.keys() == {
        mlflow_inputs.data_digest(tags["dataset.train"]),
        mlflow_inputs.data_digest(tags["dataset.eval"]),
    }
    assert {Path(s["uri"]).name for s in digests.values()} == {"train.jsonl", "eval.jsonl"}
    # MLflow 3: the model is a LoggedModel of this run, holding the final step's metrics, registered by name.
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    assert [(m.name, str(m.status)) for m in models] == [("model", "READY")]
    linked = {m.key: (m.step, m.value) for m in models[0].metrics}
    assert linked["eval/auc"] == (30, run.data.metrics["eval/auc"]) and linked["loss"][0] == 30
    assert tags["model.id"] == models[0].model_id and tags["model.registered_version"] == "1"
    (version,) = client.search_model_versions("name = 'bco-beta'")
    assert models[0].model_id in version.source
    for key in STEP_KEYS:  # step = optimizer step, each once
        assert metric_steps(client, run.info.run_id, key) == list(range(1, 31)), key
    assert metric_steps(client, run.info.run_id, "eval/auc") == [0, 15, 30]  # the reference, mid-run, the end
    assert 0.0 <= run.data.metrics["eval/auc"] <= 1.0
    for key in ("precompute/rows", "precompute/tokens", "precompute/padding_fraction", "udm/accuracy"):
        assert metric_steps(client, run.info.run_id, key) == [0], key
    assert run.data.metrics["precompute/rows"] == TRAIN_ROWS  # the train split's
    for phase in ("checks", "ray_start", "precompute", "train_start", "train", "eval", "save", "log_model"):
        assert run.data.metrics[f"time/{phase}"] >= 0, phase  # per-phase wall times of the job


@pytest.mark.e2e
def test_job_trains_evaluates_generations_and_saves(jobs, tmp_path):
    """What a user looks at after the first job: the loss fell, the eval curves, the generation eval, the model."""
    run, client = jobs["a"], MlflowClient(jobs["uri"])
    run_id = run.info.run_id
    assert run.data.params["train.num_workers"] == "2" and run.data.params["train.zero_stage"] == "2"
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < first - 0.02, f"loss did not decrease: first {first:.4f}, last {last:.4f}"
    margins = sorted(client.get_metric_history(run_id, "rewards/margins"), key=lambda m: m.step)
    assert margins[-1].step == 30 and margins[-1].value > 0

    # Every eval curve starts at step 0 (the reference); the generation eval logged reference vs policy at steps
    # 0, 15 and 30, its tables, and the policy scores no lower than the reference it started from.
    score = {m.step: m.value for m in client.get_metric_history(run_id, "eval/gen/score")}
    score_ref = {m.step: m.value for m in client.get_metric_history(run_id, "eval/gen/score_ref")}
    assert sorted(score) == sorted(score_ref) == [0, 15, 30] and score[0] == score_ref[0]
    assert score[30] >= score_ref[30], (score, score_ref)
    for key in ("eval/gen/hedged", "eval/gen/hedged_ref", "eval/gen/length", *GEN_REWARDS):
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
    table = json.loads(Path(client.download_artifacts(run_id, "eval/generations.json", str(tmp_path))).read_text())
    assert table["columns"][:4] == ["step", "prompt", "reference", "policy"] and len(table["data"]) == 8
    assert {"score", "score_ref", "reward", "reward_ref"} <= set(table["columns"])
    assert not (jobs["tmp"] / "outputs" / "ray" / "beta-0.1" / "generation").exists()  # snapshots removed

    # The saved policy loads with plain transformers and moved away from its initial weights.
    result = json.loads((jobs["tmp"] / "outputs" / "runs" / "beta-0.1" / "result.json").read_text())
    trained = AutoModelForCausalLM.from_pretrained(result["model_dir"])
    init = load_file(str(SFT_DIR / "model.safetensors"))  # the demo's policy starts from the SFT'd model
    assert max(float((trained.state_dict()[k] - v).abs().max()) for k, v in init.items()) > 1e-3
    with torch.no_grad():
        assert torch.isfinite(trained(torch.tensor([[0, 5, 6, 7]])).logits).all()
    # The job's result carries what it logged (the API and the model card read it there, not from MLflow).
    history = result["history"]
    assert [h["step"] for h in history if "loss" in h] == list(range(1, 31)) and history[0]["step"] == 0
    assert [h["step"] for h in history if "eval/auc" in h] == [0, 15, 30] and "udm/accuracy" in history[0]
    assert [h["step"] for h in history if "eval/gen/score" in h] == [0, 15, 30] and "time/fit" in history[-1]
    assert f"| loss | {losses[-1]:.4g} |" in (Path(result["model_dir"]) / "README.md").read_text()


@pytest.mark.e2e
def test_job_logs_config_plots_classifier_and_model(jobs, tmp_path):
    rid = jobs["a"].info.run_id
    client = MlflowClient(jobs["uri"])
    assert {"config.yaml", "plots", "precompute", "udm"} <= {a.path for a in client.list_artifacts(rid)}
    cfg = yaml.safe_load(Path(client.download_artifacts(rid, "config.yaml", str(tmp_path))).read_text())
    assert cfg["train"]["beta"] == 0.1 and cfg["train"]["max_steps"] == 30
    assert json.loads(Path(client.download_artifacts(rid, "precompute/summary.json", str(tmp_path))).read_text())[
        "train"
    ]
    assert "udm/classifier.json" in {a.path for a in client.list_artifacts(rid, "udm")}
    clf = json.loads(Path(client.download_artifacts(rid, "udm/classifier.json", str(tmp_path))).read_text())
    assert len(clf["coef"][0]) == 384 and clf["classes"] == [0.0, 1.0]  # plain parameters, not a pickle
    plot_dir = Path(client.download_artifacts(rid, "plots", str(tmp_path)))
    assert {p.stem for p in plot_dir.glob("*.png")} == PLOTS | {"gen_score", "gen_reward"}
    for p in plot_dir.glob("*.png"):
        h, w, colour = png_stats(p)  # the generation eval's plots: 3 points a line (steps 0, 15, 30)
        assert h >= 400 and w >= 700 and colour > (0.0005 if p.stem in PLOTS else 0.0002), p.name
    keep = os.environ.get("BCO_RAY_KEEP_PLOTS")  # a directory to copy them to, for a look
    if keep:
        import shutil

        shutil.copytree(plot_dir, Path(keep) / "job-plots", dirs_exist_ok=True)

    assert jobs["a"].data.tags["model.format"] == "mlflow-transformers"
    # The Hugging Face directory has its model card, naming the final metrics; the cache holds no pickle.
    card = (jobs["tmp"] / "outputs" / "runs" / "beta-0.1" / "model" / "README.md").read_text()
    assert "base_model" not in card and "| eval/auc |" in card and "| loss |" in card and "beta-0.1" in card
    cache_files = [p for p in (jobs["tmp"] / "outputs" / "cache").rglob("*") if p.is_file()]
    assert any(p.name == "classifier.json" for p in cache_files)
    assert not [p for p in cache_files if p.suffix in (".pkl", ".pickle") or p.read_bytes()[:1] == b"\x80"]
    from mlflow import transformers as mlflow_transformers

    mlflow.set_tracking_uri(jobs["uri"])
    pipe = mlflow_transformers.load_model(f"runs:/{rid}/model")
    assert pipe("3+4=", max_new_tokens=2, do_sample=False)[0]["generated_text"].startswith("3+4=")


@pytest.mark.e2e
def test_failed_job_is_marked_failed_with_its_error(jobs):
    run = jobs["failed"]
    assert jobs["failed_rc"] != 0
    assert run.info.status == "FAILED" and run.info.end_time
    assert "bad-row.jsonl row 20: line 21 is not valid JSON" in run.data.tags["error"]
    assert run.data.tags["error_type"] == "DataFormatError" and "Traceback" not in run.data.tags["error"].split("\n")[0]
    assert run.data.params["train.beta"] == "0.5"


@pytest.mark.e2e
def test_rerun_continues_the_failed_run(jobs):
    run, client = jobs["b"], MlflowClient(jobs["uri"])
    assert run.info.run_id == jobs["failed"].info.run_id and run.info.status == "FINISHED"
    assert "error" not in run.data.tags and run.data.tags["resume.previous_status"] == "FAILED"
    assert "data.train: " in run.data.tags["resume.changed_params"]
    assert run.data.tags["precompute.reused"] == "True"  # the first job's pass: β is not in the cache key
    for key in STEP_KEYS:
        assert metric_steps(client, run.info.run_id, key) == [1, 2, 3, 4], key
    assert metric_steps(client, run.info.run_id, "precompute/rows") == [0]
    assert run.data.tags["model.format"] == "mlflow-transformers"


@pytest.mark.e2e
def test_compare_cli_over_the_beta_runs(jobs, tmp_path):
    out = tmp_path / "compare"
    proc = _compare("--experiment", "beta-sweep", "--metric", "loss", "--tracking-uri", jobs["uri"], "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("run "))
    assert "train.beta" in header and "loss final" in header and "loss best (min)" in header
    body = [line for line in lines if line.startswith(("beta-0.1 ", "beta-0.5 "))]
    assert len(body) == 2 and any(" 0.1 " in b for b in body) and any(" 0.5 " in b for b in body)
    csv_rows = (out / "compare_beta-sweep_loss.csv").read_text().splitlines()
    assert "train.beta" in csv_rows[0].split(",") and len(csv_rows) == 3
    assert (out / "compare_beta-sweep_loss.md").read_text().count("| beta-0.") == 2
    h, w, colour = png_stats(out / "compare_beta-sweep_loss.png")
    assert h >= 500 and w >= 1000 and colour > 0.0005
    assert (out / "compare_beta-sweep_loss.png").stat().st_size > 20_000
    keep = os.environ.get("BCO_RAY_KEEP_PLOTS")
    if keep:
        import shutil

        shutil.copytree(out, Path(keep) / "compare", dirs_exist_ok=True)

    bad = _compare("--experiment", "nope", "--tracking-uri", jobs["uri"], "--out", str(out))
    assert bad.returncode == 2 and "beta-sweep" in bad.stderr


def _compare(*args: str) -> subprocess.CompletedProcess:
    """`python jobs/compare.py ARGS`, as a user runs it."""
    cmd = [sys.executable, str(ROOT / "jobs" / "compare.py"), *args]
    return subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=300)
