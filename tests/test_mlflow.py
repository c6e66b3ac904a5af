"""MLflow tracking and run comparison, unit tests (a local SQLite store, no Ray): params within MLflow's limits,
tracking URIs, a resumed run that logs nothing twice, the transformers-flavour model, plots and the comparison
on synthetic runs, MFU. The end-to-end jobs against a real `mlflow server` are in tests/test_mlflow_jobs.py."""

from __future__ import annotations

import math
import os
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from bco_ray.config.schema import load_config
from bco_ray.data.pass_summary import PrecomputeSummary
from bco_ray.tracking import compare, mlflow_inputs, mlflow_model, mlflow_run, plots
from bco_ray.tracking.step_logger import StepLogger
from bco_ray.train import throughput

from mlflow_helpers import PLOTS, metric_steps, mlflow_globals_restored, png_stats


@pytest.fixture(autouse=True)
def _restore_mlflow_globals():
    with mlflow_globals_restored():
        yield


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
    assert metric_steps(client, run_id, "loss") == [1, 2, 3, 4]
    assert [m.value for m in client.get_metric_history(run_id, "loss") if m.step == 1] == [0.69]
    assert metric_steps(client, run_id, "precompute/rows") == [0] and metric_steps(client, run_id, "udm/accuracy") == [
        0
    ]
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
    assert not logger.pending and metric_steps(good, run_id, "loss") == [1, 2]
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
    assert metric_steps(client, run.info.run_id, "loss") == [2, 3]  # linking logs no second point
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
        h, w, colour = png_stats(p)
        assert h > 400 and w > 800 and colour > 0.0005, p
    assert compare.direction("eval/loss") == "min" and compare.direction("rewards/margins") == "max"
    with pytest.raises(compare.CompareError, match="unit-sweep"):
        compare.compare_runs(client, "no-such-experiment")

    files = plots.plot_run(client, ids[0.3], str(tmp_path / "plots"))
    assert {Path(f).stem for f in files} == PLOTS - {"udm_weights"}
    hist = {"edges": [0.5 + 0.475 * i for i in range(21)], "counts": [0, 5, 40, 60, 30, 10] + [0] * 13 + [2]}
    files.append(plots.plot_weight_hist(hist, str(tmp_path / "plots" / "udm_weights.png"), "beta-0.3", mean=2.1))
    for f in files:
        assert png_stats(f)[2] > 0.0005, f


def test_peak_flops_table():
    assert throughput.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert throughput.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert throughput.peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 156e12
    assert throughput.peak_flops("NVIDIA A10G") is None and throughput.peak_flops("NVIDIA A10") == 125e12
    assert throughput.peak_flops("Some Future GPU") is None


def test_an_online_run_is_plotted_and_compared_over_rounds(local_store, tmp_path):
    """An online run's per-round metrics (step r: round r, or the policy after r rounds) go to plots/online.png and
    compare over rounds; its loss stays per optimizer step (bco_ray/job/online.py logs both)."""
    client = MlflowClient(local_store)
    exp = client.create_experiment("unit-online")
    rid = client.create_run(exp, run_name="online").info.run_id
    for r in range(3):
        client.log_metric(rid, "online/pass_rate", 0.1 * (r + 1), step=r)
        client.log_metric(rid, "loss", 0.69 - 0.01 * r, step=2 * r + 2)
    for s in range(4):
        client.log_metric(rid, "eval/gen/score", 0.05 * s, step=s)
        client.log_metric(rid, "eval/gen/score_ref", 0.05, step=s)
    client.set_terminated(rid, "FINISHED")
    files = {Path(f).stem: f for f in plots.plot_run(client, rid, str(tmp_path / "plots"))}
    assert "online" in files and "gen_score" not in files and "loss" in files  # eval over rounds, not steps
    assert png_stats(files["online"])[2] > 0.0005
    passes = compare.compare_runs(client, "unit-online", "online/pass_rate")
    assert passes.unit == "round" and "best round" in passes.header and passes.runs[0].best_step == 2
    assert compare.compare_runs(client, "unit-online", "eval/gen/score").unit == "round"
    loss = compare.compare_runs(client, "unit-online", "loss")
    assert loss.unit == "step" and loss.runs[0].last_step == 6 and "online/pass_rate" in loss.extra
    assert png_stats(compare.write_outputs(passes, str(tmp_path / "cmp"))["png"])[2] > 0.0005
