"""Shared test set-up: offline, loopback-only Ray, and helpers to run the real job as a user would."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(**extra) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_ADDRESS"] = "local"        # never join a cluster that happens to run on this machine
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def run_job(tmp: Path, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python jobs/bco.py` with the embedded defaults, writing into tmp."""
    cmd = [sys.executable, str(ROOT / "jobs" / "bco.py"), f"--output_dir={tmp / 'outputs'}",
           f"--mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *overrides]
    proc = subprocess.run(cmd, cwd=tmp, env=job_env(), capture_output=True, text=True, timeout=timeout)
    (tmp / "job.log").write_text(proc.stdout + "\n----- stderr -----\n" + proc.stderr)
    return proc


@pytest.fixture
def tiny_overrides() -> list[str]:
    """Small enough for CI's 2 cores, large enough for the loss to move."""
    return ["--train.max_steps=30", "--train.logging_steps=1", "--train.eval_steps=0",
            "--udm.prompt_sample_size=256"]
