"""`ray job submit --working-dir . -- python jobs/bco.py ...` against a real Ray head on loopback."""
from __future__ import annotations

import tempfile
import time
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port, job_env

pytestmark = pytest.mark.e2e


def _ray(*args, env, timeout=180, check=True):
    ray_bin = str(Path(sys.executable).parent / "ray")
    return subprocess.run([ray_bin, *args], env=env, capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture
def ray_head(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")     # the head and this test's job client alike
    env = job_env(RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS")
    port, dash = free_port(), free_port()
    _ray("start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={free_port()}",
         f"--ray-client-server-port={free_port()}", "--num-cpus=8", "--disable-usage-stats",
         f"--temp-dir={tempfile.mkdtemp(prefix='ray-')}", env=env)   # short: Ray's socket paths have a length limit
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _ray("stop", "--force", env=env, check=False)


def test_ray_job_submit_succeeds(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "out"
    cmd = ["job", "submit", f"--address={address}", "--working-dir", str(ROOT),
           "--runtime-env", str(ROOT / "configs" / "runtime_env.yaml"), "--submission-id", "bco-submit-test",
           "--", "python", "jobs/bco.py", f"--output_dir={out}",
           f"--mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
           "--train.max_steps=6", "--train.eval_steps=0", "--udm.prompt_sample_size=128", "--data.eval=none"]
    proc = _ray(*cmd, env=env, timeout=900, check=False)
    log = proc.stdout + proc.stderr
    (tmp_path / "submit.log").write_text(log)
    assert proc.returncode == 0, log[-6000:]
    from ray.job_submission import JobStatus, JobSubmissionClient
    assert JobSubmissionClient(address).get_job_status("bco-submit-test") == JobStatus.SUCCEEDED
    assert "[bco-ray] done" in log
    assert list(out.glob("runs/*/model/model.safetensors"))


def test_ray_job_stop_then_resubmit_resumes(ray_head, tmp_path):
    """`ray job stop` mid-training: the run is marked KILLED, the last checkpoint stays; submitting the same
    run name again resumes from it and finishes, continuing the same MLflow run."""
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient
    address, env = ray_head
    client = JobSubmissionClient(address)
    out, db = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    entry = (f"python jobs/bco.py --output_dir={out} --mlflow.tracking_uri={db} --mlflow.run_name=stopme "
             "--train.max_steps=40 --train.save_steps=2 --train.eval_steps=0 --udm.prompt_sample_size=128 "
             "--data.eval=none")
    runtime_env = {"working_dir": str(ROOT), "excludes": [".git", ".venv", ".gpu", "outputs", "mlflow.db"]}
    first = client.submit_job(entrypoint=entry, runtime_env=runtime_env)
    deadline = time.time() + 600
    while not list((out / "ray" / "stopme").glob("checkpoint_step*")) and time.time() < deadline:
        assert client.get_job_status(first) not in (JobStatus.FAILED, JobStatus.SUCCEEDED), client.get_job_logs(first)[-4000:]
        time.sleep(2)
    assert client.stop_job(first)
    while client.get_job_status(first) not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
        time.sleep(1)
    assert client.get_job_status(first) == JobStatus.STOPPED
    mlflow = MlflowClient(db)
    exp = mlflow.get_experiment_by_name("bco-ray-tiny")
    (run,) = mlflow.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = 'stopme'")
    assert run.info.status in ("KILLED", "FAILED"), run.info.status
    second = client.submit_job(entrypoint=entry, runtime_env=runtime_env)
    while client.get_job_status(second) not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
        time.sleep(2)
    logs = client.get_job_logs(second)
    assert client.get_job_status(second) == JobStatus.SUCCEEDED, logs[-4000:]
    assert "resumed from checkpoint at step" in logs
    (run2,) = mlflow.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = 'stopme'")
    assert run2.info.run_id == run.info.run_id and run2.info.status == "FINISHED"
    steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(2, 41, 2))                # each logged step once across the stop
