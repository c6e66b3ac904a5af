"""`ray job submit --working-dir . -- python jobs/bco.py ...` against a real 1-CPU Ray head on loopback (the
smallest head a laptop or a small head node has; 2-CPU heads run the other e2e tests): the job sizes its pass
(UDM on) and worker group to it, and nothing waits forever for a CPU another stage holds. The same job is
stopped with `ray job stop` and submitted again, and resumes."""

from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path

import pytest

from bco_ray.storage import local_path

from harness import RAY_BIN, ROOT, SUBMIT_DATA, RayHead, sqlite_store

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


def _wait(client, job_id: str, until) -> str:
    from ray.job_submission import JobStatus

    deadline = time.time() + 600
    while not until() and time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
            return status
        time.sleep(0.5)
    return client.get_job_status(job_id)


def test_a_1_cpu_head_runs_the_job_and_a_stopped_job_resumes(tmp_path, monkeypatch):
    """On a 1-CPU head:
    - asking for two training workers fails at once, naming what is missing, instead of waiting for a CPU that
      never comes;
    - the job with one worker (UDM on) imports the uploaded bco_ray, not this checkout's;
    - `ray job stop` mid-training (SIGTERM): the job exits with 143 within Ray's 3 s before SIGKILL, the run is
      marked KILLED, training stops at once (at most the checkpoint in flight is written, nothing after);
    - submitting the same run name again reuses the pass, resumes from the checkpoint and finishes, continuing the
      same MLflow run with each step logged once;
    - the job's default MLflow store (under $BCO_RAY_STORAGE) keeps its artifacts (plots, model, UDM classifier)
      beside the store, not in the uploaded working directory: still there once the head and its session are
      gone."""
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    head = RayHead(1)
    try:
        head.wait()
        t0 = time.time()
        db = sqlite_store(tmp_path / "mlflow.db")
        too_big = _submit(head, tmp_path / "out-2", db, "bco-1cpu-2workers", "--train.max_steps=2")
        assert too_big.returncode != 0 and time.time() - t0 < 120
        assert "needs 2 × 1 CPU = 2 CPU" in too_big.stdout + too_big.stderr

        client = JobSubmissionClient(head.dashboard)
        out, store = tmp_path / "out", tmp_path / "store"
        # jobs/*.py do not patch sys.path: Ray puts the uploaded working directory first on the entrypoint's
        # PYTHONPATH, so a submitted job imports the uploaded bco_ray. The entrypoint's shell waits for the job
        # on SIGTERM (a trap), then prints the job's exit status.
        entry = (
            f"export BCO_RAY_STORAGE={store}; trap true TERM; "
            'python -c \'import bco_ray; print("BCO_RAY" + "_FILE=" + bco_ray.__file__)\' && '
            f"python jobs/bco.py --output_dir={out} --mlflow.run_name=stopme {SUBMIT_DATA} --data.eval=none "
            "--train.num_workers=1 --train.micro_batch_size=48 --train.eval_steps=0 --train.logging_steps=1 "
            "--train.max_steps=60 --train.save_steps=20; echo BCO_EXIT=$?"
        )
        runtime_env = {"working_dir": str(ROOT), "excludes": [".git", ".venv", ".gpu", "outputs", "mlflow.db"]}
        first = client.submit_job(entrypoint=entry, runtime_env=runtime_env)
        # A checkpoint counts once Ray Train's controller has registered it in its snapshot (the directory alone
        # may be a half-registered report: stopping then would rightly restart from scratch). Checkpoints are 20
        # steps (~6 s on 1 CPU) apart: on a 1-CPU head the SIGTERM takes a second or two to reach the worker,
        # whose steps keep the one CPU busy, so 5-step checkpoints could be written in that time.
        snapshot = store / "ray" / "stopme" / "checkpoint_manager_snapshot.json"  # under $BCO_RAY_STORAGE
        status = _wait(client, first, lambda: snapshot.exists() and "checkpoint_step" in snapshot.read_text())
        assert status == JobStatus.RUNNING, client.get_job_logs(first)[-4000:]
        checkpoints = lambda: {d.name for d in (store / "ray" / "stopme").glob("checkpoint_step*")}  # noqa: E731
        before = checkpoints()
        assert client.stop_job(first)
        assert _wait(client, first, lambda: False) == JobStatus.STOPPED
        stopped = checkpoints()
        time.sleep(3)
        assert checkpoints() == stopped and len(stopped - before) <= 1, (before, stopped, checkpoints())
        logs = client.get_job_logs(first)
        assert "BCO_EXIT=143" in logs and "UDM classifier accuracy" in logs, logs[-4000:]  # the pass ran, UDM on
        uploaded = logs.split("BCO_RAY_FILE=")[1].split()[0]
        assert "working_dir_files" in uploaded and not uploaded.startswith(str(ROOT)), uploaded
        mlflow = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
        exp = mlflow.get_experiment_by_name("bco-ray-tiny")
        (run,) = mlflow.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = 'stopme'")
        assert run.info.status == "KILLED", run.info.status
        assert run.data.tags["error"] == "Interrupted: stopped by SIGTERM"

        second = client.submit_job(entrypoint=entry, runtime_env=runtime_env)
        status = _wait(client, second, lambda: False)
        logs = client.get_job_logs(second)
        assert status == JobStatus.SUCCEEDED, logs[-4000:]
        assert "precompute reused" in logs and "resumed from checkpoint at step" in logs, logs[-4000:]
        assert "BCO_EXIT=0" in logs and list(out.glob("runs/stopme/model/model.safetensors"))
    finally:
        head.stop()
    assert not Path(uploaded).exists()  # the job's Ray session is gone, its uploaded package with it
    (run2,) = mlflow.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = 'stopme'")
    assert run2.info.run_id == run.info.run_id and run2.info.status == "FINISHED"
    steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 61))  # each step once across the stop
    artifacts = Path(local_path(run.info.artifact_uri))
    assert artifacts.is_relative_to(store / "mlartifacts"), run.info.artifact_uri
    for name in ("config.yaml", "udm/classifier.json", "plots/loss.png"):
        assert (artifacts / name).is_file(), (name, sorted(p.name for p in artifacts.rglob("*")))
    (model,) = mlflow.search_logged_models([exp.experiment_id])  # the published model, beside them
    assert Path(local_path(model.artifact_location)).is_relative_to(store / "mlartifacts"), model.artifact_location
    assert (Path(local_path(model.artifact_location)) / "MLmodel").is_file()
