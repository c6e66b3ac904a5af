"""MLflow tracking and run comparison.

Unit tests (a local SQLite store, no Ray): params within MLflow's limits, tracking URIs, a resumed run that
logs nothing twice, the transformers-flavour model, plots and the comparison on synthetic runs, MFU.

End to end (marked e2e) against a real `mlflow server` on 127.0.0.1, started once for the module: the tiny
job runs with β=0.1; a job with β=0.5 fails after its MLflow run is open (its precompute cache cannot be
created) and is marked FAILED; re-run under the same name it continues that MLflow run to FINISHED (this
time through $MLFLOW_TRACKING_URI); `jobs/compare.py` then compares the two β runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image as mpimg
import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from bco_ray.config import load_config
from bco_ray.data.pass_summary import PrecomputeSummary
from bco_ray.storage import resolve_locations
from bco_ray.tracking import compare, mlflow_inputs, mlflow_model, mlflow_run, plots, throughput
from bco_ray.tracking.step_logger import StepLogger

from conftest import ROOT, MlflowServer, job_env

PLOTS = {"loss", "rewards", "margins", "delta", "eval_auc", "overview", "udm_weights"}
STEP_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "delta",
    "learning_rate",
    "grad_norm",
    "logps/chosen",
    "logps/rejected",
    "tokens_per_second",
    "samples_per_second",
)


# ------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _restore_mlflow_globals():
    """mlflow.set_tracking_uri / set_experiment write os.environ; keep them from leaking into later tests."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    saved_uri = tracking_utils._tracking_uri
    yield
    while mlflow.active_run():
        mlflow.end_run()
    tracking_utils._tracking_uri = saved_uri
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def local_store(tmp_path_factory) -> str:
    """One SQLite store for the unit tests (creating one costs several seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-unit') / 'mlflow.db'}"


def _png(path) -> tuple[int, int, float]:
    """(height, width, fraction of coloured pixels): empty axes are all black, white and grey (0.0); a plot
    with its curves or bars drawn has colour (0.001 for two markers, 0.005 to 0.1 for curves and bars)."""
    rgb = mpimg.imread(str(path))[..., :3]
    return rgb.shape[0], rgb.shape[1], float(((rgb.max(-1) - rgb.min(-1)) > 0.25).mean())


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# ---------------------------------------------------------------------------------------------- units
def test_params_are_the_flat_config_within_mlflow_limits():
    cfg = load_config(overrides=["--train.lora.target_modules=" + ",".join(["x" * 60] * 200), "--train.beta=0.25"])
    params = mlflow_run.config_params(cfg)
    assert set(params) == set(cfg.flat())
    assert params["train.beta"] == "0.25" and params["udm.enabled"] == "True" and params["model.reference"] == "None"
    assert params["precompute.ref_actors"] == "[1, 1]"
    long = params["train.lora.target_modules"]
    assert len(long) == mlflow_run.MAX_PARAM_VAL_LENGTH and long.endswith(mlflow_run.TRUNCATED)
    # The config artifact has the whole value, as YAML the config loader reads back.
    back = yaml.safe_load(mlflow_run.config_yaml(cfg))
    assert back["train"]["lora"]["target_modules"] == cfg.train.lora.target_modules
    assert load_config(overrides=back).flat() == cfg.flat()


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config()
    assert mlflow_run.tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert mlflow_run.tracking_uri(cfg) == "http://mlflow.internal:5000"
    cfg = load_config(overrides=["--mlflow.tracking_uri=sqlite:///runs/m.db"])  # config wins over the env
    assert mlflow_run.tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve() / 'runs' / 'm.db'}"
    assert mlflow_run.normalize_uri("mlruns") == (tmp_path.resolve() / "mlruns").as_uri()
    assert mlflow_run.normalize_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert mlflow_run.normalize_uri("databricks") == "databricks"
    # Ray Train workers get the driver's URI and client settings, never credentials.
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "secret")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    env = mlflow_run.worker_env("http://mlflow.internal:5000")
    assert env == {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def test_failed_run_then_resume_logs_nothing_twice(local_store):
    cfg = load_config(overrides=[f"--mlflow.tracking_uri={local_store}", "--mlflow.experiment=unit-resume"])
    uri, run_id, resumed = mlflow_run.open_run(cfg, "r")
    assert not resumed and uri == local_store
    client = MlflowClient(uri)
    summary = PrecomputeSummary.from_dict(
        {
            "train": {
                "rows": 10,
                "tokens": 100,
                "chosen": 6,
                "rejected": 4,
                "padding_fraction": 0.1,
                "mean_rejected_weight": 1.5,
            },
            "udm": {"udm/accuracy": 0.7},
            "dropped": {"empty": 1},
            "seconds": 2.0,
        }
    )
    mlflow_inputs.log_precompute(summary)
    logger = StepLogger({"tracking_uri": uri, "run_id": run_id}, rank=0, buffered=True)
    for step in (1, 2):
        logger.log({"loss": 0.7 - step / 100, "nan_is_dropped": float("nan")}, step)
    logger.flush()
    mlflow_run.close_run("FAILED", "RuntimeError: worker died\nTraceback ...")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("RuntimeError: worker died")
    assert run.data.tags["error_type"] == "RuntimeError" and "version.torch" in run.data.tags

    # Same run name: the same MLflow run, the failure cleared, a changed param recorded (params are immutable).
    cfg2 = load_config(
        overrides=[f"--mlflow.tracking_uri={local_store}", "--mlflow.experiment=unit-resume", "--train.max_steps=4"]
    )
    _, run_id2, resumed = mlflow_run.open_run(cfg2, "r")
    assert resumed and run_id2 == run_id
    mlflow_inputs.log_precompute(summary)  # a resumed job logs its precompute again
    logger = StepLogger({"tracking_uri": uri, "run_id": run_id}, rank=0, buffered=False)
    for step in (1, 2, 3, 4):  # restarted from scratch: steps 1, 2 again
        logger.log({"loss": 1.0 + step}, step)
    mlflow_run.close_run("FINISHED")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags and "error_type" not in run.data.tags
    assert run.data.tags["resume.count"] == "1" and run.data.tags["resume.previous_status"] == "FAILED"
    assert "train.max_steps: -1 -> 4" in run.data.tags["resume.changed_params"]
    assert run.data.params["train.max_steps"] == "-1"
    assert _steps(client, run_id, "loss") == [1, 2, 3, 4]
    assert [m.value for m in client.get_metric_history(run_id, "loss") if m.step == 1] == [0.69]
    assert _steps(client, run_id, "precompute/rows") == [0] and _steps(client, run_id, "udm/accuracy") == [0]
    assert not client.get_metric_history(run_id, "nan_is_dropped")
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "config.resume-1.yaml", "precompute"} <= arts

    # A finished run is not continued: the same name starts a new run.
    _, run_id3, resumed = mlflow_run.open_run(cfg2, "r")
    mlflow_run.close_run("FINISHED")
    assert not resumed and run_id3 != run_id


def test_step_logger_keeps_points_when_the_server_is_down(local_store):
    mlflow.set_tracking_uri(local_store)
    exp = mlflow.set_experiment("unit-down")
    run_id = MlflowClient(local_store).create_run(exp.experiment_id).info.run_id
    logger = StepLogger({"tracking_uri": local_store, "run_id": run_id}, rank=0, buffered=False)
    good = logger.client
    logger.client = MlflowClient("http://127.0.0.1:9")  # nothing listens: every call fails
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        logger.log({"loss": 0.5}, 1)  # does not raise: training goes on
    finally:
        os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    assert len(logger.pending) == 1
    logger.client = good
    logger.log({"loss": 0.4}, 2)
    assert not logger.pending and _steps(good, run_id, "loss") == [1, 2]
    assert StepLogger({"tracking_uri": local_store, "run_id": run_id}, rank=1, buffered=False).active is False


def test_model_is_logged_in_the_transformers_flavour(local_store, tmp_path):
    from transformers import AutoTokenizer

    from bco_ray.builtin import materialize_tiny_model, tokenizer_path

    model_dir = materialize_tiny_model(tmp_path / "tiny")
    AutoTokenizer.from_pretrained(str(tokenizer_path())).save_pretrained(str(model_dir))
    mlflow.set_tracking_uri(local_store)
    mlflow.set_experiment("unit-model")
    with mlflow.start_run() as run:
        mlflow.log_metric("loss", 0.6, step=2)
        mlflow.log_metrics({"loss": 0.5, "eval/auc": 0.7}, step=3)
        assert mlflow_model.log_model(str(model_dir), step=3, registered_model_name="bco-unit") == "mlflow-transformers"
        model_tags = MlflowClient(local_store).get_run(run.info.run_id).data.tags
        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
        assert mlflow_model.log_model(str(tmp_path / "adapter"), "adapter") == "peft-adapter"
    client = MlflowClient(local_store)
    assert client.get_run(run.info.run_id).data.tags["model.format"] == "peft-adapter"  # the last one logged
    # MLflow 3: a LoggedModel of this run, holding the run's metrics at the final step, registered by name.
    models = mlflow.search_logged_models(filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list")
    assert [(m.name, str(m.status)) for m in models] == [("model", "READY")]
    assert model_tags["model.id"] == models[0].model_id and model_tags["model.registered_version"] == "1"
    assert {m.key: m.value for m in models[0].metrics} == {"loss": 0.5, "eval/auc": 0.7}
    assert _steps(client, run.info.run_id, "loss") == [2, 3]  # linking logs no second point
    (version,) = client.search_model_versions("name = 'bco-unit'")
    assert models[0].model_id in version.source and version.run_id == run.info.run_id
    assert "adapter/adapter_config.json" in {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    from mlflow import transformers as mlflow_transformers

    pipe = mlflow_transformers.load_model(f"runs:/{run.info.run_id}/model")
    out = pipe("12+7=", max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"].startswith("12+7=")


def _synthetic_sweep(uri: str, experiment: str) -> dict[float, str]:
    """Three finished β runs with 40 steps of noisy training curves and 2 evaluations, plus a failed run."""
    import random

    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment(experiment)
    client = MlflowClient(uri)
    ids = {}
    for beta in (0.1, 0.3, 1.0):  # (outputs written elsewhere by one run: not a difference that matters)
        cfg = load_config(overrides=[f"--train.beta={beta}", f"--output_dir=out-{beta == 0.3}"])
        run = client.create_run(exp.experiment_id, run_name=f"beta-{beta}")
        rid = run.info.run_id
        params = [mlflow.entities.Param(k, v) for k, v in mlflow_run.config_params(cfg).items()]
        for i in range(0, len(params), 100):
            client.log_batch(rid, params=params[i : i + 100])
        rng = random.Random(beta)
        logger = StepLogger({"tracking_uri": uri, "run_id": rid}, rank=0, buffered=True)
        for s in range(1, 41):
            logger.log(
                {
                    "loss": 0.69 * math.exp(-s * beta / 20) + 0.04 * rng.random(),
                    "rewards/chosen": s * beta / 50,
                    "rewards/rejected": -s * beta / 40,
                    "rewards/margins": s * beta * 0.045,
                    "delta": s * beta * 0.001,
                    "learning_rate": 5e-3 * min(1.0, s / 4) * (40 - s) / 40,
                },
                s,
            )
            if s % 20 == 0:
                logger.log(
                    {
                        "eval/auc": 0.5 + 0.4 * (1 - math.exp(-s * beta / 10)) - 0.05 * (s == 40),
                        "eval/accuracy": 0.5 + 0.3 * (1 - math.exp(-s * beta / 10)),
                        "eval/loss": 0.7 - s * beta / 100,
                    },
                    s,
                )
        logger.flush()
        client.set_terminated(rid, "FINISHED")
        ids[beta] = rid
    failed = client.create_run(exp.experiment_id, run_name="broken")
    params = [
        mlflow.entities.Param(k, v)
        for k, v in mlflow_run.config_params(load_config(overrides=["--train.beta=2.0"])).items()
    ]
    for i in range(0, len(params), 100):
        client.log_batch(failed.info.run_id, params=params[i : i + 100])
    client.set_terminated(failed.info.run_id, "FAILED")
    return ids


def test_compare_and_plots_on_synthetic_runs(local_store, tmp_path):
    ids = _synthetic_sweep(local_store, "unit-sweep")
    client = MlflowClient(local_store)
    comp = compare.compare_runs(client, "unit-sweep", "eval/auc")
    assert comp.mode == "max" and comp.varying == ["train.beta"]  # not mlflow.*, output_dir: where, not what
    assert compare.compare_runs(client, "unit-sweep", "eval/auc", ignore_params=()).varying == [
        "output_dir",
        "train.beta",
    ]
    assert [r.name for r in comp.runs] == ["beta-1.0", "beta-0.3", "beta-0.1", "broken"]  # best first, no metric last
    top = comp.runs[0]
    assert top.best_step == 20 and top.final < top.best and top.last_step == 40
    assert comp.runs[-1].status == "FAILED" and comp.runs[-1].final is None
    text = compare.format_table(comp)
    assert "train.beta" in text.splitlines()[3] and "beta-0.3" in text
    paths = compare.write_outputs(comp, str(tmp_path / "cmp"))
    rows = (tmp_path / "cmp" / "compare_unit-sweep_eval_auc.csv").read_text().splitlines()
    assert rows[0].startswith("run,run_id,status,train.beta,eval/auc final,eval/auc best (max)")
    assert len(rows) == 5 and ids[1.0] in rows[1]
    assert "| train.beta |" in Path(paths["markdown"]).read_text()
    loss = compare.compare_runs(client, "unit-sweep", "loss")
    assert loss.mode == "min" and loss.runs[0].name == "beta-1.0"
    loss_png = compare.write_outputs(loss, str(tmp_path / "cmp"))["png"]
    for p in (paths["png"], loss_png):
        h, w, colour = _png(p)
        assert h > 400 and w > 800 and colour > 0.0005, p
    assert compare.direction("eval/loss") == "min" and compare.direction("rewards/margins") == "max"
    with pytest.raises(compare.CompareError, match="unit-sweep"):
        compare.compare_runs(client, "no-such-experiment")

    files = plots.plot_run(client, ids[0.3], str(tmp_path / "plots"))
    assert {Path(f).stem for f in files} == PLOTS - {"udm_weights"}
    hist = {"edges": [0.5 + 0.475 * i for i in range(21)], "counts": [0, 5, 40, 60, 30, 10] + [0] * 13 + [2]}
    files.append(plots.plot_weight_hist(hist, str(tmp_path / "plots" / "udm_weights.png"), "beta-0.3", mean=2.1))
    for f in files:
        assert _png(f)[2] > 0.0005, f


def test_peak_flops_table():
    assert throughput.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert throughput.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert throughput.peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 156e12
    assert throughput.peak_flops("NVIDIA A10G") is None and throughput.peak_flops("NVIDIA A10") == 125e12
    assert throughput.peak_flops("Some Future GPU") is None


# ---------------------------------------------------------------------------------------- end to end
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
# The generation eval has its own end-to-end test (test_e2e.py); these jobs are about what MLflow records.
E2E_ARGS = [
    "--train.max_steps=4",
    "--train.logging_steps=1",
    "--train.eval_steps=0",
    "--udm.prompt_sample_size=64",
    "--mlflow.experiment=beta-sweep",
    "--eval.generate=false",
]


def _job(
    tmp: Path, head, *overrides: str, env: dict | None = None, log: str = "job.log"
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "jobs" / "bco.py"), f"--output_dir={tmp / 'outputs'}", *E2E_ARGS, *overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=tmp, env=head.client_env(**(env or {})), capture_output=True, text=True, timeout=900)
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
        "--mlflow.run_name=beta-0.1",
        "--train.beta=0.1",
        "--mlflow.registered_model_name=bco-beta",
        log="a.log",
        env={"BCO_RAY_GIT_COMMIT": SUBMIT_COMMIT, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"},
    )
    assert proc.returncode == 0, (tmp / "a.log").read_text()[-6000:]
    out["a"] = run_state("beta-0.1")

    (tmp / "not-a-dir").write_text("a file where the precompute cache should go")
    proc = _job(
        tmp,
        ray_head,
        f"--mlflow.tracking_uri={mlflow_server}",
        "--mlflow.run_name=beta-0.5",
        "--train.beta=0.5",
        f"--precompute.cache_dir={tmp / 'not-a-dir' / 'cache'}",
        log="failed.log",
    )
    out["failed_rc"] = proc.returncode
    out["failed"] = run_state("beta-0.5")

    # Same run name, the tracking server named by the environment this time, a working cache.
    proc = _job(
        tmp,
        ray_head,
        "--mlflow.run_name=beta-0.5",
        "--train.beta=0.5",
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
                    "--mlflow.run_name=beta-0.1",
                    "--train.beta=0.1",
                    "--mlflow.registered_model_name=bco-beta",
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
    assert linked["eval/auc"] == (4, run.data.metrics["eval/auc"]) and linked["loss"][0] == 4
    assert tags["model.id"] == models[0].model_id and tags["model.registered_version"] == "1"
    (version,) = client.search_model_versions("name = 'bco-beta'")
    assert models[0].model_id in version.source
    for key in STEP_KEYS:
        assert _steps(client, run.info.run_id, key) == [1, 2, 3, 4], key  # step = optimizer step, each once
    assert _steps(client, run.info.run_id, "eval/auc") == [0, 4]  # the reference, then the end
    assert 0.0 <= run.data.metrics["eval/auc"] <= 1.0
    for key in ("precompute/rows", "precompute/tokens", "precompute/padding_fraction", "udm/accuracy"):
        assert _steps(client, run.info.run_id, key) == [0], key
    assert run.data.metrics["precompute/rows"] > 2000
    for phase in ("checks", "ray_start", "precompute", "train_start", "train", "eval", "save", "log_model"):
        assert run.data.metrics[f"time/{phase}"] >= 0, phase  # per-phase wall times of the job


@pytest.mark.e2e
def test_job_logs_config_plots_classifier_and_model(jobs, tmp_path):
    rid = jobs["a"].info.run_id
    client = MlflowClient(jobs["uri"])
    assert {"config.yaml", "plots", "precompute", "udm"} <= {a.path for a in client.list_artifacts(rid)}
    cfg = yaml.safe_load(Path(client.download_artifacts(rid, "config.yaml", str(tmp_path))).read_text())
    assert cfg["train"]["beta"] == 0.1 and cfg["train"]["max_steps"] == 4
    assert json.loads(Path(client.download_artifacts(rid, "precompute/summary.json", str(tmp_path))).read_text())[
        "train"
    ]
    assert "udm/classifier.json" in {a.path for a in client.list_artifacts(rid, "udm")}
    clf = json.loads(Path(client.download_artifacts(rid, "udm/classifier.json", str(tmp_path))).read_text())
    assert len(clf["coef"][0]) == 384 and clf["classes"] == [0.0, 1.0]  # plain parameters, not a pickle
    plot_dir = Path(client.download_artifacts(rid, "plots", str(tmp_path)))
    assert {p.stem for p in plot_dir.glob("*.png")} == PLOTS
    for p in plot_dir.glob("*.png"):
        h, w, colour = _png(p)
        assert h >= 400 and w >= 700 and colour > 0.0005, p.name
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
    assert "not-a-dir" in run.data.tags["error"] and run.data.tags["error_type"]
    assert run.data.params["train.beta"] == "0.5"


@pytest.mark.e2e
def test_rerun_continues_the_failed_run(jobs):
    run, client = jobs["b"], MlflowClient(jobs["uri"])
    assert run.info.run_id == jobs["failed"].info.run_id and run.info.status == "FINISHED"
    assert "error" not in run.data.tags and run.data.tags["resume.previous_status"] == "FAILED"
    assert run.data.tags["resume.changed_params"].startswith("precompute.cache_dir: ")  # not the URI's source
    assert run.data.tags["precompute.reused"] == "True"  # the first job's pass: β is not in the cache key
    for key in STEP_KEYS:
        assert _steps(client, run.info.run_id, key) == [1, 2, 3, 4], key
    assert _steps(client, run.info.run_id, "precompute/rows") == [0]
    assert run.data.tags["model.format"] == "mlflow-transformers"


@pytest.mark.e2e
def test_compare_cli_over_the_beta_runs(jobs, tmp_path):
    out = tmp_path / "compare"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "compare.py"),
            "--experiment",
            "beta-sweep",
            "--metric",
            "loss",
            "--tracking-uri",
            jobs["uri"],
            "--out",
            str(out),
        ],
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("run "))
    assert "train.beta" in header and "loss final" in header and "loss best (min)" in header
    body = [line for line in lines if line.startswith(("beta-0.1 ", "beta-0.5 "))]
    assert len(body) == 2 and any(" 0.1 " in b for b in body) and any(" 0.5 " in b for b in body)
    csv_rows = (out / "compare_beta-sweep_loss.csv").read_text().splitlines()
    assert "train.beta" in csv_rows[0].split(",") and len(csv_rows) == 3
    assert (out / "compare_beta-sweep_loss.md").read_text().count("| beta-0.") == 2
    h, w, colour = _png(out / "compare_beta-sweep_loss.png")
    assert h >= 500 and w >= 1000 and colour > 0.0005
    assert (out / "compare_beta-sweep_loss.png").stat().st_size > 20_000
    keep = os.environ.get("BCO_RAY_KEEP_PLOTS")
    if keep:
        import shutil

        shutil.copytree(out, Path(keep) / "compare", dirs_exist_ok=True)

    bad = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "compare.py"),
            "--experiment",
            "nope",
            "--tracking-uri",
            jobs["uri"],
            "--out",
            str(out),
        ],
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "beta-sweep" in bad.stderr
