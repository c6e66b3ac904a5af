"""Shared test set-up: offline, loopback-only Ray, and the session's shared fixtures (the process harness they are
built from, and the job as a user runs it, are in tests/harness.py).

Tiers: `make test-fast` runs the tests marked neither `e2e` (Ray jobs, Ray clusters) nor `slow` (several DeepSpeed
processes, bench runs); `make test` runs all.
Jobs share what a user's jobs would share: one Ray head per test session (`ray_head`: a real
`ray start --head` on loopback with at most 2 CPUs, as a laptop or a small head node), and one precompute
cache (`shared_cache`), so a test pays for its own behaviour, not for Ray's start or for a pass another test
ran on the same inputs. Tests that need a cluster of their own (autoscaling, several nodes, 1 CPU) start it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bco_ray.train.jit_builds import pin_jit_builds

from harness import RayHead, small_cluster_cpus

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")
# Without an NVIDIA GPU, Triton kernels (tests/test_liger.py) run on CPU tensors under Triton's interpreter. Triton
# reads the switch when a kernel is defined, and building a transformers model imports triton: so it is set here.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The in-process DeepSpeed tests build DeepSpeed's JIT ops where the jobs' workers do (bco_ray/train/jit_builds.py):
# once per suite, not once each time the two alternate. Every job this process starts inherits the setting.
pin_jit_builds()


@pytest.fixture(scope="session")
def ray_head():
    """One real Ray head for the session's jobs, started with the real CPU count (at most 2)."""
    head = RayHead(small_cluster_cpus())
    try:
        yield head.wait()
    finally:
        head.stop()


@pytest.fixture(scope="session")
def ray_client(ray_head):
    """This pytest process as a driver on the session's head, connected once for the session (Ray Data keeps
    per-process state that a disconnect and reconnect in one process would leave stale)."""
    import ray
    import ray.data

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address=ray_head.gcs, log_to_driver=False)
    ray.data.DataContext.get_current().use_datasource_v2 = False
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def local_store(tmp_path_factory) -> str:
    """One SQLite MLflow store for the unit tests of tests/test_mlflow.py and tests/test_run_lifecycle.py (creating
    one costs several seconds); each test uses its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-unit') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One precompute cache for the session: jobs on the same inputs reuse one pass (the cache key says when)."""
    return tmp_path_factory.mktemp("precompute-cache")
