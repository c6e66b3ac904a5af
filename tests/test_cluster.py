"""The cluster workflow: `cluster.yaml` against Ray's own launcher schema, the GPU recipe against the config
schema, and an autoscaling run: a head with no CPUs (Ray's fake multi-node provider, tests/fake_cluster/),
`ray job submit` of the tiny job, and the autoscaler adding worker nodes for the pass's actor pools and the
Ray Train worker group until the job succeeds."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from harness import ROOT, free_port, job_env, sqlite_store, stop_ray_head

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

    from bco_ray.config.schema import load_config

    c = _cluster()
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0, "no work on the head"
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
    assert "pip install" in setup and "/home/ray/bco-ray" in setup and c["file_mounts"]["/home/ray/bco-ray"] == "."
    torch_pin = next(
        line.split("?=")[1].strip()
        for line in (ROOT / "Makefile").read_text().splitlines()
        if line.startswith("TORCH_VERSION")
    )
    assert f'"torch=={torch_pin}"' in setup, "the cluster runs the torch the Makefile pins"
    assert any("MLFLOW_TRACKING_URI" in cmd and "ray start --head" in cmd for cmd in c["head_start_ray_commands"])


def test_gpu_recipe_loads():
    """The GPU recipe is a valid config as is (no download: only the schema and range checks run)."""
    from bco_ray.config.schema import load_config

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
class FakeCluster:
    """A Ray head with no CPUs whose autoscaler launches `fake_multinode` worker nodes (tests/fake_cluster/)."""

    def __init__(self, root: Path):
        self.tmp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths have a length limit
        # Every port the head listens on is a free one: other Ray clusters may run on this machine
        # (the dashboard agent's default, 52365, would fail to bind and leave the job API without an agent).
        self.port, dash = free_port(), free_port()
        self.address = f"http://127.0.0.1:{dash}"
        self.out = root  # job outputs, shared by the tests of this module
        cfg = yaml.safe_load(FAKE_CLUSTER.read_text())
        cfg["provider"]["gcs_address"] = f"127.0.0.1:{self.port}"
        self.config = Path(self.tmp) / "autoscaling.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.env = job_env(RAY_AUTH_MODE="disabled", RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        self.env.pop("RAY_ADDRESS", None)  # it would override every --address below
        head_cpus = cfg["available_node_types"][cfg["head_node_type"]]["resources"]["CPU"]
        self.head = subprocess.Popen(
            [
                RAY_BIN,
                "start",
                "--head",
                "--block",
                f"--port={self.port}",
                "--node-ip-address=127.0.0.1",
                f"--num-cpus={head_cpus}",
                "--object-store-memory=200000000",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
                "--disable-usage-stats",
                f"--temp-dir={self.tmp}",
                f"--autoscaling-config={self.config}",
            ],
            env=self.env,
            stdout=(log := open(Path(self.tmp) / "ray_start.log", "w")),
            stderr=subprocess.STDOUT,
        )
        self._start_log = log

    def wait_for_head(self, timeout: float = 120) -> None:
        from ray.util.state import list_nodes

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.head.poll() is not None:
                raise RuntimeError("ray start --head exited:\n" + (Path(self.tmp) / "ray_start.log").read_text())
            try:
                if any(n.is_head_node and n.state == "ALIVE" for n in list_nodes(address=self.address)):
                    return
            except Exception:
                pass
            time.sleep(1)
        raise TimeoutError(f"the head at {self.address} did not come up in {timeout} s")

    def nodes(self) -> list:
        from ray.util.state import list_nodes

        return list_nodes(address=self.address, detail=True)

    def submit(self, submission_id: str, *job_args: str) -> None:
        """`ray job submit --no-wait` of jobs/bco.py, as docs/cluster.md does it.

        The working dir is `local://<checkout>`: the code is already on every (fake) node, as the project is
        on a cluster's nodes after `ray up`. An uploaded working dir cannot work on fake nodes: they share this
        machine's disk and the head's session dir, so each new node's runtime-env agent deletes and re-unpacks
        the one shared copy (download_and_unpack_package(overwrite=True)) under the running workers' feet.
        The upload path is covered on a single node by test_ray_job_submit.py."""
        cmd = [
            RAY_BIN,
            "job",
            "submit",
            f"--address={self.address}",
            "--working-dir",
            f"local://{ROOT}",
            "--runtime-env",
            str(ROOT / "configs" / "runtime_env.yaml"),
            f"--submission-id={submission_id}",
            "--no-wait",
            "--",
            "python",
            "jobs/bco.py",
            f"--output_dir={self.out / 'outputs'}",
            f"--mlflow.tracking_uri={sqlite_store(self.out / 'mlflow.db')}",
            f"--mlflow.run_name={submission_id}",
            *TINY,
            *job_args,
        ]
        deadline = time.time() + 180
        while True:  # the head's job agent registers a little after the head
            proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                return
            if "No available agent" not in proc.stdout + proc.stderr or time.time() > deadline:
                raise AssertionError(proc.stdout + proc.stderr)
            time.sleep(2)

    def follow(self, submission_ids: list[str], timeout: float) -> tuple[dict, dict]:
        """Poll jobs until they end: ({id: final status}, {node id seen alive: (is head, resources)})."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.address)
        final = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
        seen: dict[str, tuple[bool, dict]] = {}
        status: dict[str, str] = {}
        t0 = time.time()
        while time.time() - t0 < timeout:
            status = {j: client.get_job_status(j) for j in submission_ids}
            try:
                for n in self.nodes():
                    if n.state == "ALIVE":
                        seen[n.node_id] = (n.is_head_node, dict(n.resources_total or {}))
            except Exception:
                pass
            if all(s in final for s in status.values()):
                return {j: str(s) for j, s in status.items()}, seen
            time.sleep(2)
        for j, s in status.items():
            if s not in final:
                client.stop_job(j)
        return {j: f"TIMEOUT after {timeout} s ({s})" for j, s in status.items()}, seen

    def logs(self, submission_id: str) -> str:
        proc = subprocess.run(
            [RAY_BIN, "job", "logs", f"--address={self.address}", submission_id],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return proc.stdout + proc.stderr

    def autoscaler_log(self) -> str:
        return (Path(self.tmp) / "session_latest" / "logs" / "monitor.log").read_text()

    def stop(self) -> None:
        """This test's cluster only (never `ray stop`: it ends every Ray on the machine): the `ray start
        --block` process and everything it and the autoscaler started, by pid, plus any process left whose
        command line names this cluster's own temp dir."""
        stop_ray_head(self.head, self.tmp)
        self._start_log.close()


# The tiny job, cut to what shows scaling: the pass (ReadText tasks, tokenize, the reference actor pool)
# and a 2-worker Ray Train group; no UDM, no eval.
TINY = (
    "--data.train=tests/data/train.jsonl",  # the working dir is the checkout: relative to it on every node
    "--train.num_workers=2",
    "--train.max_steps=2",
    "--train.logging_steps=1",
    "--train.eval_steps=0",
    "--udm.enabled=false",
    "--data.eval=none",
)


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this process's job and state clients
    cluster = FakeCluster(tmp_path_factory.mktemp("fake_cluster"))
    try:
        cluster.wait_for_head()
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old


@pytest.mark.e2e
def test_autoscaler_adds_workers_and_job_succeeds(fake_cluster):
    c = fake_cluster
    before = [n for n in c.nodes() if n.state == "ALIVE"]
    assert [n.is_head_node for n in before] == [True], "the cluster starts with only a head"
    assert not before[0].resources_total.get("CPU"), "the head offers no CPUs: all work needs worker nodes"

    c.submit("bco-autoscale")
    status, seen = c.follow(["bco-autoscale"], timeout=420)
    log, monitor = c.logs("bco-autoscale"), c.autoscaler_log()
    (c.out / "bco-autoscale.log").write_text(log)
    (c.out / "monitor.log").write_text(monitor)
    assert status["bco-autoscale"] == "SUCCEEDED", f"{status}\n{log[-6000:]}\n--- autoscaler ---\n{monitor[-3000:]}"
    assert "[bco-ray] done" in log
    assert list((c.out / "outputs").glob("runs/*/model/model.safetensors"))

    # The autoscaler launched worker nodes of the config's worker type for the job's requests, and both the
    # pass (actor pool) and the Ray Train worker group ran on them (the head has no CPU for either).
    workers = [res for is_head, res in seen.values() if not is_head]
    assert workers, f"no worker node was ever alive; autoscaler log:\n{monitor[-3000:]}"
    assert all(res.get("CPU") == 4 for res in workers), workers  # the fake cluster's `cpu4` type
    assert "Launching 1 nodes, type cpu4" in monitor, monitor[-3000:]
    assert "Attempting to start training worker group of size 2" in log
    ray_status = subprocess.run(
        [RAY_BIN, "status", f"--address=127.0.0.1:{c.port}"], env=c.env, capture_output=True, text=True, timeout=60
    ).stdout
    assert "cpu4" in ray_status, ray_status


@pytest.mark.e2e
def test_job_fails_clearly_when_resources_never_come(fake_cluster):
    """Requests the autoscaler cannot meet (this cluster has no GPU node type) end the job after
    train.resources_timeout_s with an error that says what was asked for, instead of waiting forever:
    GPU train workers (the pass is reused from the test above), and GPU actors for the pass."""
    c = fake_cluster
    c.submit("bco-gpu-train", "--train.use_gpu=true", "--train.resources_timeout_s=10")
    c.submit(
        "bco-gpu-pass",
        "--precompute.num_gpus_per_actor=1",
        "--train.resources_timeout_s=10",
        f"--precompute.cache_dir={c.out / 'cache-gpu-pass'}",
    )
    status, _ = c.follow(["bco-gpu-train", "bco-gpu-pass"], timeout=360)  # ends: not a wait without end
    for job, stage in (("bco-gpu-train", "The Ray Train worker group"), ("bco-gpu-pass", "The precompute pass")):
        log = c.logs(job)
        (c.out / f"{job}.log").write_text(log)
        assert status[job] == "FAILED", f"{job}: {status[job]}\n{log[-4000:]}"
        assert (
            f"bco-ray: resources error: {stage} did not get its resources within train.resources_timeout_s=10 s" in log
        ), log[-4000:]
        assert "GPU: 1}" in log.split("bco-ray: resources error:")[-1]
