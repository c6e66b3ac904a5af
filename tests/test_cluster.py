"""The cluster workflow: `cluster.yaml` against Ray's own launcher schema, the GPU recipe against the config
schema, and an autoscaling run: a head with no CPUs (Ray's fake multi-node provider, tests/fake_cluster/),
`ray job submit` of the tiny job, and the autoscaler adding worker nodes for the pass's actor pools and the
Ray Train worker group until the job succeeds."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port, job_env

CLUSTER_YAML = ROOT / "cluster.yaml"
GPU_RECIPE = ROOT / "configs" / "qwen2.5-0.5b.yaml"
FAKE_CLUSTER = ROOT / "tests" / "fake_cluster" / "autoscaling.yaml"
RAY_BIN = str(Path(sys.executable).parent / "ray")


# ------------------------------------------------------------------------------------------ cluster.yaml
def _cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_ray_launcher_validation():
    """What `ray up` does with the file before touching the cloud: merge the provider's defaults, then
    validate against ray/autoscaler/ray-schema.json plus the launcher's own checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config
    raw = _cluster()
    validate_config(prepare_config(raw))
    assert raw["provider"]["type"] == "aws"


def test_cluster_yaml_node_types_fit_the_recipe():
    """A CPU head, GPU worker types that start at zero, and room for the GPU recipe's requests."""
    import ray
    from bco_ray.config import load_config
    c = _cluster()
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {k: v for k, v in types.items() if k != c["head_node_type"]}
    assert workers and all(v.get("min_workers", 0) == 0 for v in workers.values())
    assert all(1 <= v["max_workers"] <= c["max_workers"] for v in workers.values())
    assert 0 < c["idle_timeout_minutes"] <= 30
    gpus = sorted(v["resources"].get("GPU", 0) for v in workers.values())
    assert gpus[0] >= 1, "every worker type is a GPU type"
    cfg = load_config(GPU_RECIPE)
    assert cfg.train.use_gpu and cfg.train.num_workers <= max(gpus), "the train worker group fits one node"
    assert cfg.precompute.num_gpus_per_actor <= gpus[0]
    # The image runs the Ray and Python this project pins (a client/cluster version mismatch fails at submit).
    image = c["docker"]["image"]
    assert f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}" in image
    assert "gpu" in image or "-cu" in image
    # The project and its pinned dependencies are installed on every node, and jobs get an MLflow URI.
    setup = "\n".join(c["setup_commands"])
    assert "pip install" in setup and "/home/ray/bco-ray" in setup
    assert any("MLFLOW_TRACKING_URI" in cmd and "ray start --head" in cmd for cmd in c["head_start_ray_commands"])


def test_gpu_recipe_loads():
    """The GPU recipe is a valid config as is (no download: only the schema and range checks run)."""
    from bco_ray.config import load_config
    cfg = load_config(GPU_RECIPE)
    assert cfg.model.policy == "Qwen/Qwen2.5-0.5B-Instruct"
    assert cfg.data.train.startswith("hf:trl-lib/kto-mix-14k")
    assert cfg.udm.embedding_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert cfg.train.use_gpu and cfg.train.bf16 == "auto" and cfg.train.zero_stage == 2
    assert cfg.precompute.num_gpus_per_actor == 1


def test_runtime_env_excludes_outputs_and_caches():
    env = yaml.safe_load((ROOT / "configs" / "runtime_env.yaml").read_text())
    assert {".git", ".venv", "outputs", "mlruns", "mlflow.db"} <= set(env["excludes"])


# ------------------------------------------------------------------------------- autoscaling, locally
def _descendants(pid: int) -> list:
    import psutil
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _stop(head: subprocess.Popen, tmp: str) -> None:
    """Stop this test's cluster only (never `ray stop`: it would end every Ray on the machine): the
    `ray start --block` process and everything it or the autoscaler started, found by pid, then any
    process left whose command line names this cluster's own temp dir."""
    import psutil
    procs = _descendants(head.pid)
    head.send_signal(signal.SIGTERM)                 # --block: tears down the head's own processes
    try:
        head.wait(30)
    except subprocess.TimeoutExpired:
        head.kill()
    time.sleep(2)
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if tmp in " ".join(p.info["cmdline"] or []):
                procs.append(p)
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.fixture
def autoscaling_head(monkeypatch):
    """A Ray head with no CPUs and the fake multi-node autoscaler, on loopback; yields (address, env, tmp, gcs port)."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    tmp = tempfile.mkdtemp(prefix="ray-")            # short: Ray's socket paths have a length limit
    port, dash = free_port(), free_port()
    cfg = yaml.safe_load(FAKE_CLUSTER.read_text())
    cfg["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    (Path(tmp) / "autoscaling.yaml").write_text(yaml.safe_dump(cfg))
    env = job_env(RAY_AUTH_MODE="disabled", RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    env.pop("RAY_ADDRESS", None)                     # it would override every --address below
    head_cpus = cfg["available_node_types"][cfg["head_node_type"]]["resources"]["CPU"]
    head = subprocess.Popen(
        [RAY_BIN, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         f"--num-cpus={head_cpus}", "--object-store-memory=200000000", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--disable-usage-stats", f"--temp-dir={tmp}",
         f"--autoscaling-config={Path(tmp) / 'autoscaling.yaml'}"],
        env=env, stdout=open(Path(tmp) / "ray_start.log", "w"), stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_head(address, head, tmp)
        yield address, env, tmp, port
    finally:
        _stop(head, tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_head(address: str, head: subprocess.Popen, tmp: str, timeout: float = 120) -> None:
    from ray.util.state import list_nodes
    t0 = time.time()
    while time.time() - t0 < timeout:
        if head.poll() is not None:
            raise RuntimeError("ray start --head exited:\n" + (Path(tmp) / "ray_start.log").read_text()[-3000:])
        try:
            if any(n.is_head_node and n.state == "ALIVE" for n in list_nodes(address=address)):
                return
        except Exception:
            pass
        time.sleep(1)
    raise TimeoutError(f"the head at {address} did not come up in {timeout} s")


def _submit(address: str, env: dict, submission_id: str, *job_args: str) -> None:
    # `local://`: the checkout is already on every (fake) node, as the project is on a cluster's nodes after
    # `ray up`. An uploaded working_dir cannot work on fake nodes: they share this machine's disk and the
    # head's session dir, and each new node's runtime-env agent deletes and re-unpacks the one shared copy
    # (download_and_unpack_package(overwrite=True)) under the running workers' feet. The upload itself is
    # covered by test_ray_job_submit.py.
    cmd = ["job", "submit", f"--address={address}", "--working-dir", f"local://{ROOT}",
           "--runtime-env", str(ROOT / "configs" / "runtime_env.yaml"), f"--submission-id={submission_id}",
           "--no-wait", "--", "python", "jobs/bco.py", *job_args]
    for _ in range(30):                              # the head's job agent registers a little after the head
        proc = subprocess.run([RAY_BIN, *cmd], env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return
        if "No available agent" not in proc.stdout + proc.stderr:
            raise AssertionError(proc.stdout + proc.stderr)
        time.sleep(2)
    raise AssertionError("no job agent on the head: " + proc.stdout + proc.stderr)


def _follow(address: str, submission_id: str, timeout: float) -> tuple[str, dict]:
    """Poll the job until it ends; returns (final status, node ids seen alive → (is_head, resources))."""
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_nodes
    client = JobSubmissionClient(address)
    seen: dict[str, tuple[bool, dict]] = {}
    t0 = time.time()
    status = None
    while time.time() - t0 < timeout:
        status = client.get_job_status(submission_id)
        try:
            for n in list_nodes(address=address, detail=True):
                if n.state == "ALIVE":
                    seen[n.node_id] = (n.is_head_node, dict(n.resources_total or {}))
        except Exception:
            pass
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status), seen
        time.sleep(2)
    client.stop_job(submission_id)
    return f"TIMEOUT after {timeout} s (last status {status})", seen


def _logs(address: str, env: dict, submission_id: str) -> str:
    proc = subprocess.run([RAY_BIN, "job", "logs", f"--address={address}", submission_id], env=env,
                          capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr


@pytest.mark.e2e
def test_autoscaler_adds_workers_and_job_succeeds(autoscaling_head, tmp_path):
    address, env, tmp, port = autoscaling_head
    from ray.util.state import list_nodes
    before = list_nodes(address=address, detail=True)
    assert [n.is_head_node for n in before if n.state == "ALIVE"] == [True], "starts with only a head"
    assert not any(n.resources_total.get("CPU") for n in before)

    out = tmp_path / "out"
    _submit(address, env, "bco-autoscale", f"--output_dir={out}",
            f"--mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "--train.num_workers=2",
            "--train.max_steps=4", "--train.eval_steps=0", "--udm.enabled=false", "--data.eval=none")
    status, seen = _follow(address, "bco-autoscale", timeout=420)
    log = _logs(address, env, "bco-autoscale")
    (tmp_path / "job.log").write_text(log)
    monitor = (Path(tmp) / "session_latest" / "logs" / "monitor.log").read_text()
    (tmp_path / "monitor.log").write_text(monitor)
    assert status == "SUCCEEDED", f"{status}\n{log[-6000:]}\n--- autoscaler ---\n{monitor[-3000:]}"
    assert "[bco-ray] done" in log
    assert list(out.glob("runs/*/model/model.safetensors"))

    workers = {k: v for k, v in seen.items() if not v[0]}
    assert workers, f"no worker node was ever alive; autoscaler log:\n{monitor[-3000:]}"
    assert all(res.get("CPU") == 4 for _, res in workers.values())     # the fake cluster's `cpu4` type
    assert "Launching" in monitor or "Adding" in monitor, monitor[-3000:]
    status_out = subprocess.run([RAY_BIN, "status", f"--address=127.0.0.1:{port}"], env=env,
                                capture_output=True, text=True, timeout=60).stdout
    assert "cpu4" in status_out, status_out
