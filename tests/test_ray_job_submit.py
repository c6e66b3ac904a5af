"""`ray job submit --working-dir . -- python jobs/bco.py ...` against a real Ray head on loopback."""
from __future__ import annotations

import tempfile
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
