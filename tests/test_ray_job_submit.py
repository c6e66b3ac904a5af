"""`ray job submit --working-dir . -- python jobs/bco.py ...` against real Ray heads on loopback, with the
CPUs a laptop or a small head node has: the session's head (at most 2 CPUs) and a head of 1 CPU. The job
sizes its pass and worker group to them; nothing waits forever for a CPU another stage holds."""

from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path

import pytest

from bco_ray.storage import local_path

from conftest import RAY_BIN, ROOT, RayHead

pytestmark = pytest.mark.e2e


def _submit(
    head: RayHead, out, db: str | None, submission_id: str, *args: str, prefix: str = ""
) -> subprocess.CompletedProcess:
    """`ray job submit ... -- python jobs/bco.py ...`; `prefix`: shell run before it in the same entrypoint;
    `db` None: the job's default MLflow store."""
    store = [f"--mlflow.tracking_uri={db}"] if db else []
    job = shlex.join(["python", "jobs/bco.py", f"--output_dir={out}", *store, *args])
    cmd = [
        RAY_BIN,
        "job",
        "submit",
        f"--address={head.dashboard}",
        "--working-dir",
        str(ROOT),
        "--runtime-env",
        str(ROOT / "configs" / "runtime_env.yaml"),
        "--submission-id",
        submission_id,
        "--",
        "bash",
        "-c",
        prefix + job,
    ]
    return subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=900)


def _check_succeeded(head: RayHead, proc, submission_id: str, out, tmp_path) -> str:
    log = proc.stdout + proc.stderr
    (tmp_path / f"{submission_id}.log").write_text(log)
    assert proc.returncode == 0, log[-6000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(head.dashboard).get_job_status(submission_id) == JobStatus.SUCCEEDED
    assert "[bco-ray] done" in log
    assert list(out.glob("runs/*/model/model.safetensors"))
    return log


def test_ray_job_submit_succeeds_on_a_1_cpu_head(tmp_path, monkeypatch):
    """A 1-CPU head runs the whole job (UDM on) with one training worker; asking for two fails at once,
    naming what is missing, instead of waiting for a CPU that never comes. The job that runs uses the default
    MLflow store (under $BCO_RAY_STORAGE): its artifacts (plots, model, UDM classifier) live beside the store,
    not in the uploaded working directory, and are still there once the head and its session are gone."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    head = RayHead(1)
    try:
        head.wait()
        out, db = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
        t0 = time.time()
        too_big = _submit(head, tmp_path / "out-2", db, "bco-1cpu-2workers", "--train.max_steps=2")
        assert too_big.returncode != 0 and time.time() - t0 < 120
        assert "needs 2 × 1 CPU = 2 CPU" in too_big.stdout + too_big.stderr
        # jobs/*.py do not patch sys.path: Ray puts the uploaded working directory first on the entrypoint's
        # PYTHONPATH, so a submitted job imports the uploaded bco_ray, not this checkout's installed one.
        where = 'python -c \'import bco_ray; print("BCO_RAY" + "_FILE=" + bco_ray.__file__)\' && '
        store = tmp_path / "store"
        proc = _submit(
            head,
            out,
            None,
            "bco-submit-1cpu",
            "--train.num_workers=1",
            "--train.max_steps=2",
            "--train.eval_steps=0",
            "--data.eval=none",
            prefix=f"export BCO_RAY_STORAGE={store}; {where}",
        )
        log = _check_succeeded(head, proc, "bco-submit-1cpu", out, tmp_path)
        uploaded = log.split("BCO_RAY_FILE=")[1].split()[0]
        assert "working_dir_files" in uploaded and not uploaded.startswith(str(ROOT)), uploaded
    finally:
        head.stop()
    assert not Path(uploaded).exists()  # the job's Ray session is gone, its uploaded package with it
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bco-ray-tiny")
    (run,) = client.search_runs([exp.experiment_id])
    artifacts = Path(local_path(run.info.artifact_uri))
    assert artifacts.is_relative_to(store / "mlartifacts"), run.info.artifact_uri
    for name in ("config.yaml", "udm/classifier.json", "plots/loss.png"):
        assert (artifacts / name).is_file(), (name, sorted(p.name for p in artifacts.rglob("*")))
    (model,) = client.search_logged_models([exp.experiment_id])  # the published model, beside them
    assert Path(local_path(model.artifact_location)).is_relative_to(store / "mlartifacts"), model.artifact_location
    assert (Path(local_path(model.artifact_location)) / "MLmodel").is_file()


def test_ray_job_stop_then_resubmit_resumes(ray_head, tmp_path, monkeypatch):
    """On the session's head (at most 2 CPUs): the tiny job as `make demo` runs it, UDM on (the pass that used
    to deadlock on 2 CPUs) and 2 workers. `ray job stop` mid-training (SIGTERM): the job exits with 143 within
    Ray's 3 s before SIGKILL, the run is marked KILLED, training stops at once (at most the checkpoint in flight
    is written, nothing after); submitting the same run name again reuses the pass, resumes from the checkpoint
    and finishes, continuing the same MLflow run with each step logged once."""
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    client = JobSubmissionClient(ray_head.dashboard)
    out, db = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert ray_head.num_cpus <= 2
    # The entrypoint's shell waits for the job on SIGTERM (a trap), then prints the job's exit status.
    entry = (
        "trap true TERM; "
        f"python jobs/bco.py --output_dir={out} --mlflow.tracking_uri={db} --mlflow.run_name=stopme "
        "--data.eval=none --train.eval_steps=0 --train.logging_steps=1 --train.max_steps=60 --train.save_steps=5; "
        "echo BCO_EXIT=$?"
    )
    runtime_env = {"working_dir": str(ROOT), "excludes": [".git", ".venv", ".gpu", "outputs", "mlflow.db"]}
    first = client.submit_job(entrypoint=entry, runtime_env=runtime_env)
    deadline = time.time() + 600
    # A checkpoint counts once Ray Train's controller has registered it in its snapshot (the directory alone
    # may be a half-registered report: stopping then would rightly restart from scratch).
    snapshot = out / "ray" / "stopme" / "checkpoint_manager_snapshot.json"
    while not (snapshot.exists() and "checkpoint_step" in snapshot.read_text()) and time.time() < deadline:
        assert client.get_job_status(first) not in (JobStatus.FAILED, JobStatus.SUCCEEDED), client.get_job_logs(first)[
            -4000:
        ]
        time.sleep(1)
    checkpoints = lambda: {d.name for d in (out / "ray" / "stopme").glob("checkpoint_step*")}  # noqa: E731
    before = checkpoints()
    assert client.stop_job(first)
    while client.get_job_status(first) not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
        time.sleep(0.5)
    assert client.get_job_status(first) == JobStatus.STOPPED
    stopped = checkpoints()
    time.sleep(3)
    assert checkpoints() == stopped and len(stopped - before) <= 1, (before, stopped, checkpoints())
    assert "BCO_EXIT=143" in client.get_job_logs(first), client.get_job_logs(first)[-4000:]
    mlflow = MlflowClient(db)
    exp = mlflow.get_experiment_by_name("bco-ray-tiny")
    (run,) = mlflow.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = 'stopme'")
    assert run.info.status == "KILLED", run.info.status
    assert run.data.tags["error"] == "Interrupted: stopped by SIGTERM"
    second = client.submit_job(entrypoint=entry, runtime_env=runtime_env)
    while client.get_job_status(second) not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
        time.sleep(2)
    assert "UDM classifier accuracy" in client.get_job_logs(first)  # the pass ran, on 2 CPUs, UDM on
    logs = client.get_job_logs(second)
    assert client.get_job_status(second) == JobStatus.SUCCEEDED, logs[-4000:]
    assert "precompute reused" in logs, logs[-4000:]
    assert "resumed from checkpoint at step" in logs, logs[-4000:]
    (run2,) = mlflow.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = 'stopme'")
    assert run2.info.run_id == run.info.run_id and run2.info.status == "FINISHED"
    steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 61))  # each step once across the stop
