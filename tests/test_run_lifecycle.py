"""A job's MLflow run from start to end, unit tests (a local SQLite store, no Ray): the experiment's artifacts
beside the store, never in a job's uploaded working directory; a run whose driver died is marked KILLED by the
next job and one whose driver is alive is not resumed twice; a finished run name is refused; SIGTERM / SIGINT
become `Interrupted` (exit 143 / 130); a diverging run's checks and its one error."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from bco_ray import cli
from bco_ray.config.schema import load_config
from bco_ray.errors import InputError, TrainingError
from bco_ray.job import run, signals
from bco_ray.tracking import driver_runs, mlflow_run
from bco_ray.tracking.tracker import MlflowTracker
from bco_ray.train.divergence import Diverged, check_device, check_values

from mlflow_helpers import mlflow_globals_restored


@pytest.fixture(autouse=True)
def _restore_mlflow_globals():
    with mlflow_globals_restored():
        yield


@pytest.fixture
def store(local_store):
    """The session's SQLite store (tests/conftest.py) and its directory."""
    return Path(local_store[len("sqlite:///") :]).parent, local_store


def _cfg(uri: str, out, *more: str):
    return load_config(overrides=[f"--mlflow.tracking_uri={uri}", f"--output_dir={out}", *more])


def test_artifacts_live_beside_a_sqlite_store(store, tmp_path, caplog):
    d, uri = store
    assert mlflow_run.artifact_root("sqlite:////srv/bco/mlflow.db") == "/srv/bco/mlartifacts"
    assert mlflow_run.artifact_root("http://mlflow:5000") is None and mlflow_run.artifact_root("file:///x") is None
    _, run_id, _ = mlflow_run.open_run(_cfg(uri, tmp_path, "--mlflow.experiment=my sweep/1"), "a")
    mlflow.log_text("x", "note.txt")
    mlflow_run.close_run("FINISHED")
    art = MlflowClient(uri).get_run(run_id).info.artifact_uri
    assert art.startswith(str(d / "mlartifacts" / "my_sweep_1")), art
    assert (d / "mlartifacts" / "my_sweep_1" / run_id / "artifacts" / "note.txt").read_text() == "x"
    # An experiment made earlier inside a job's uploaded working directory: a warning naming the fix.
    pkg = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab" / "mlruns" / "7"
    MlflowClient(uri).create_experiment("old", artifact_location=str(pkg))
    with caplog.at_level(logging.WARNING):
        mlflow_run.open_run(_cfg(uri, tmp_path, "--mlflow.experiment=old"), "b")
    mlflow_run.close_run("FINISHED")
    assert "inside a working directory Ray uploaded" in caplog.text and "rename_experiment" in caplog.text
    assert str(d / "mlartifacts") in caplog.text


def _running_run(client: MlflowClient, exp_id: str, name: str, out, driver: dict) -> str:
    r = client.create_run(exp_id, run_name=name, tags=driver)
    client.log_param(r.info.run_id, "output_dir", str(out))
    return r.info.run_id


def test_stale_running_run_of_a_dead_driver_is_marked_killed(store, tmp_path):
    _, uri = store
    client = MlflowClient(uri)
    cfg = _cfg(uri, tmp_path, "--mlflow.experiment=stale")
    mlflow_run.open_run(cfg, "first")  # creates the experiment; this run FINISHES normally
    mlflow_run.close_run("FINISHED")
    exp_id = client.get_experiment_by_name("stale").experiment_id
    host = driver_runs.driver_tags()[driver_runs.DRIVER_TAG].rpartition(":")[0]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names no process now
    dead_tags = {driver_runs.DRIVER_TAG: f"{host}:{dead.pid}", driver_runs.DRIVER_STARTED_TAG: "1.00"}
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import psutil

        live_tags = {
            driver_runs.DRIVER_TAG: f"{host}:{alive.pid}",
            driver_runs.DRIVER_STARTED_TAG: f"{psutil.Process(alive.pid).create_time():.2f}",
        }
        reused_pid = {**live_tags, driver_runs.DRIVER_STARTED_TAG: "1.00"}  # same pid, another process
        stale = _running_run(client, exp_id, "bco-20260101-000000", tmp_path, dead_tags)
        reused = _running_run(client, exp_id, "bco-20260101-000001", tmp_path, reused_pid)
        live = _running_run(client, exp_id, "live", tmp_path, live_tags)
        elsewhere = _running_run(client, exp_id, "other-host", tmp_path, {driver_runs.DRIVER_TAG: "far-away:1"})
        other_ns = {**dead_tags, driver_runs.DRIVER_PID_NS_TAG: "pid:[1]"}  # a container: its pids are not ours
        container = _running_run(client, exp_id, "container", tmp_path, other_ns)
        other_out = _running_run(client, exp_id, "other-out", tmp_path / "x", dead_tags)
        # A later job with the same output dir:
        _, new_id, resumed = mlflow_run.open_run(cfg, "second")
        assert not resumed
        runs = (stale, reused, live, elsewhere, container, other_out, new_id)
        status = {i: client.get_run(i).info.status for i in runs}
        assert status == {
            stale: "KILLED",
            reused: "KILLED",
            live: "RUNNING",
            elsewhere: "RUNNING",
            container: "RUNNING",
            other_out: "RUNNING",
            new_id: "RUNNING",
        }
        assert client.get_run(stale).data.tags["error_type"] == "DriverLost"
        tags = client.get_run(new_id).data.tags  # this job's driver, for the next one to check
        assert tags[driver_runs.DRIVER_TAG] == f"{host}:{os.getpid()}"
        mlflow_run.close_run("FINISHED")
        # The same run name as a run whose driver is alive: not resumed a second time.
        with pytest.raises(InputError, match=f"is still running, driven by process {host}:{alive.pid}"):
            mlflow_run.open_run(cfg, "live")
    finally:
        alive.kill()
        alive.wait()


def test_a_finished_run_name_is_refused_before_any_ray_work(store, tmp_path):
    _, uri = store
    cfg = _cfg(uri, tmp_path, "--mlflow.experiment=finished", "--mlflow.run_name=done")
    assert mlflow_run.finished_run(cfg, "done") is None
    mlflow_run.open_run(cfg, "done")
    mlflow_run.close_run("FINISHED")
    with pytest.raises(InputError, match="mlflow.run_name 'done' finished already .* another --mlflow.run_name"):
        run.refuse_finished(cfg, MlflowTracker(cfg), "done")
    # No store yet: nothing is created by the check.
    missing = tmp_path / "none" / "mlflow.db"
    assert mlflow_run.finished_run(_cfg(f"sqlite:///{missing}", tmp_path), "done") is None
    assert not missing.exists()


def test_the_mlflow_tracker_opens_logs_and_ends_the_run(store, tmp_path):
    """The driver's tracker seam on MLflow: a run opened by name with the config as params, metrics at a step, a
    table, a file, a terminal status with the error; a second start of that name resumes it."""
    _, uri = store
    cfg = _cfg(uri, tmp_path, "--mlflow.experiment=seam")
    tracker = MlflowTracker(cfg)
    assert tracker.uri == uri and tracker.finished_run("t") is None
    assert tracker.start("t") is False and tracker.view_hint() == f"mlflow ui --backend-store-uri {uri}"
    tracker.set_tags({"a": 1, "none": None})
    tracker.log_metrics({"time/fit": 1.5}, step=3)
    tracker.log_table({"step": [3], "prompt": ["1+1="]}, "eval/t.json")
    (tmp_path / "c.json").write_text("{}")
    tracker.log_artifact(str(tmp_path / "c.json"), "udm")
    tracker.finish("FAILED", "RuntimeError: boom")
    client = MlflowClient(uri)
    got = client.get_run(tracker.run_id)
    assert (got.info.status, got.data.tags["error_type"], got.data.tags["a"]) == ("FAILED", "RuntimeError", "1")
    assert got.data.params["train.lr"] == str(cfg.train.lr) and "none" not in got.data.tags
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "time/fit")] == [(3, 1.5)]
    assert {"eval/t.json", "udm/c.json"} <= {
        f.path for d in ("eval", "udm") for f in client.list_artifacts(tracker.run_id, d)
    }
    again = MlflowTracker(cfg)
    assert again.start("t") is True and again.run_id == tracker.run_id
    again.finish("FINISHED")
    assert again.finished_run("t") == tracker.run_id


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_signals_raise_interrupted(sig, code):
    calls = []
    before = signal.getsignal(sig)
    with pytest.raises(signals.Interrupted) as e:
        with signals.stop_signals(before=lambda: calls.append(1)):
            os.kill(os.getpid(), sig)  # the handler runs before the next bytecode
            pytest.fail("no Interrupted")
    assert e.value.exit_code == code and calls == [1] and isinstance(e.value, KeyboardInterrupt)
    assert signal.getsignal(sig) == before  # restored
    # Ray Train's fit() installs its SIGINT handler through this hook; bco_ray/job/train_stage.py replaces it.
    from ray.train.torch import TorchTrainer

    assert callable(getattr(TorchTrainer, "_register_sigint_handler", None))


def test_cli_exits_128_plus_the_signal(monkeypatch, capsys):
    def run_job(cfg):
        raise signals.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(run, "run_job", run_job)
    saved = {s: signal.getsignal(s) for s in signals.SIGNALS}
    try:
        assert cli.train(["--mlflow.run_name=r1"], prog="python jobs/bco.py") == 143
    finally:
        signals.restore(saved)
    err = capsys.readouterr().err
    assert "bco-ray: stopped by SIGTERM" in err and "python jobs/bco.py --mlflow.run_name=r1" in err


def test_divergence_checks_and_error():
    check_values(3, loss=0.5, grad_norm=1.0)
    with pytest.raises(Diverged, match="diverged at step 4: loss = nan"):
        check_values(4, loss=float("nan"), grad_norm=1.0)
    with pytest.raises(Diverged, match="grad_norm = inf"):
        check_values(4, loss=0.5, grad_norm=float("inf"))
    model = torch.nn.Linear(3, 2)
    frozen = torch.nn.Linear(3, 2).requires_grad_(False)
    sums = torch.zeros(8, dtype=torch.float64)
    check_device(1, sums, torch.nn.Sequential(model, frozen))
    with torch.no_grad():
        frozen.weight[0, 0] = float("nan")  # a frozen weight does not train: not checked
    check_device(1, sums, torch.nn.Sequential(model, frozen))
    with pytest.raises(Diverged, match="step 2: a non-finite loss, reward or weight"):
        check_device(2, torch.tensor([0.0, float("nan")]), model)
    with torch.no_grad():
        model.weight[1, 2] = float("inf")
    with pytest.raises(Diverged):
        check_device(2, sums, model)
    cfg = load_config(overrides=["--train.lr=10", "--train.save_steps=2"])
    e = run.diverged_error(cfg, {"step": 5, "what": "loss = nan", "checkpoint": "/ckpt/checkpoint_step0000004"})
    assert isinstance(e, TrainingError) and e.exit_code == 5
    assert str(e).startswith("training diverged at step 5 (loss = nan); the model of the last good checkpoint")
    assert "train.lr (now 10" in str(e)
    none = run.diverged_error(cfg, {"step": 1, "what": "a non-finite weight", "checkpoint": None})
    assert "no model was saved: no checkpoint came before it (train.save_steps=2)" in str(none)
