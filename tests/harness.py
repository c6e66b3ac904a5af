"""The tests' process harness: real Ray heads, an `mlflow server`, an S3-compatible server and separate-disk Ray
nodes on loopback, each started and stopped by pid; the job as a user runs it (`run_job`); the e2e jobs' data.
tests/conftest.py builds the session's shared fixtures from these."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY_BIN = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(**extra) -> dict:
    """A job's environment as a user's shell gives it: this process's, less the MLflow settings that in-process
    runs (mlflow.set_tracking_uri / set_experiment write os.environ) left behind; `extra` on top."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")}
    if not env.get("PATH", "").startswith(f"{Path(sys.executable).parent}{os.pathsep}"):
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_ADDRESS"] = "local"  # never join a cluster that happens to run on this machine
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def stop_ray_head(proc: subprocess.Popen, tmp: str) -> None:
    """Stop one `ray start --block` head and everything it (and its autoscaler) started, by pid, plus any
    process left whose command line names that head's own temp dir; never `ray stop`, which ends every Ray
    on the machine."""
    import psutil

    mine = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if tmp in " ".join(p.info["cmdline"] or []):
                mine.append(p)
        except psutil.Error:
            pass
    _stop_tree(proc, mine)
    shutil.rmtree(tmp, ignore_errors=True)


class RayHead:
    """`ray start --head --block` on loopback with its own ports and temp dir, stopped by pid (never
    `ray stop`, which ends every Ray on the machine). Clients need RAY_AUTH_MODE=disabled, as the head."""

    def __init__(self, num_cpus: int, *extra: str, env: dict | None = None):
        self.tmp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths have a length limit
        self.port, dash = free_port(), free_port()
        self.gcs = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.env = env or job_env(RAY_AUTH_MODE="disabled")
        self.env.pop("RAY_ADDRESS", None)
        self.num_cpus = num_cpus
        self._log = open(Path(self.tmp) / "ray_start.log", "w")
        self.proc = subprocess.Popen(
            [
                RAY_BIN,
                "start",
                "--head",
                "--block",
                f"--port={self.port}",
                "--node-ip-address=127.0.0.1",
                f"--num-cpus={num_cpus}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
                "--disable-usage-stats",
                f"--temp-dir={self.tmp}",
                *extra,
            ],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait(self, timeout: float = 180) -> RayHead:
        """Until the job API answers (its agent registers a little after the head)."""
        import urllib.request

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError("ray start --head exited:\n" + (Path(self.tmp) / "ray_start.log").read_text())
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/jobs/", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"the head at {self.dashboard} did not come up in {timeout} s")

    def client_env(self, **extra) -> dict:
        """The environment of a driver that joins this head (as `ray job submit` gives its entrypoint)."""
        return {**job_env(RAY_AUTH_MODE="disabled", **extra), "RAY_ADDRESS": self.gcs}

    def stop(self) -> None:
        stop_ray_head(self.proc, self.tmp)
        self._log.close()


def small_cluster_cpus() -> int:
    """A head the size of a laptop or a small head node: the CPUs this machine gives us, at most 2."""
    from bco_ray.job.resources import usable_cpus

    return min(usable_cpus(), 2)


_STORE_TEMPLATE: list[Path] = []


def sqlite_store(db: Path) -> str:
    """`sqlite:///<db>`, the file first copied from an empty MLflow store migrated once per test process (MLflow's
    schema migrations cost ~4 s on a new file, in every job that would create one)."""
    if not db.exists():
        if not _STORE_TEMPLATE:
            from mlflow.tracking import MlflowClient

            template = Path(tempfile.mkdtemp(prefix="mlflow-template-")) / "mlflow.db"
            MlflowClient(f"sqlite:///{template}").search_experiments()  # creates and migrates it
            _STORE_TEMPLATE.append(template)
        shutil.copyfile(_STORE_TEMPLATE[0], db)
    return f"sqlite:///{db}"


def job_command(tmp: Path, *overrides: str, cache: Path | None = None, script: str = "bco.py") -> list[str]:
    """The command line of `run_job` (for a test that starts the job itself, e.g. to stop it)."""
    return [
        sys.executable,
        str(ROOT / "jobs" / script),
        f"--output_dir={tmp / 'outputs'}",
        f"--mlflow.tracking_uri={sqlite_store(tmp / 'mlflow.db')}",
        *([f"--precompute.cache_dir={cache}"] if cache else []),
        *overrides,
    ]


def run_job(
    tmp: Path,
    *overrides: str,
    head: RayHead | None = None,
    cache: Path | None = None,
    timeout: int = 900,
    script: str = "bco.py",
) -> subprocess.CompletedProcess:
    """`python jobs/bco.py` (or another job script: `script="online.py"`) with the embedded defaults, writing
    into tmp; on `head` if given (else a local Ray of its own, as `make demo`), with the precompute cache in
    `cache` if given."""
    cmd = job_command(tmp, *overrides, cache=cache, script=script)
    env = head.client_env() if head else job_env()
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    (tmp / "job.log").write_text(
        f"{' '.join(cmd)}\n{time.time() - t0:.1f} s\n{proc.stdout}\n----- stderr -----\n{proc.stderr}"
    )
    return proc


# The e2e jobs' data: the first 480 rows of the bundled train split (247 desirable) and 64 of its eval split, so a
# test's pass scores a few hundred rows, not 3,000. Relative to the repository root: `ray job submit --working-dir`
# uploads them to every node.
DATA = ROOT / "tests" / "data"
TRAIN_ROWS = 480
TEST_DATA = (f"--data.train={DATA / 'train.jsonl'}", f"--data.eval={DATA / 'eval.jsonl'}")
SUBMIT_DATA = "--data.train=tests/data/train.jsonl --data.eval=tests/data/eval.jsonl"  # in a submitted entrypoint

# The smallest job that still runs every stage: the pass (cached across tests), 2 Ray Train workers with
# DeepSpeed, MLflow. UDM is off unless a test is about it.
SMALL = (TEST_DATA[0], "--udm.enabled=false", "--data.eval=none", "--train.logging_steps=1", "--train.eval_steps=0")


def _stop_tree(proc: subprocess.Popen, also: list | None = None, grace: float = 1.0) -> None:
    """Stop a process and everything it started (and the processes `also` names): SIGTERM to all, then SIGKILL
    whatever is left after `grace` seconds (as `ray stop --force` does; a test's servers and Ray nodes hold
    nothing worth a graceful stop, and Ray's processes, all told to stop at once, wait on each other for 10 s)."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    procs = list({p.pid: p for p in procs + list(also or [])}.values())
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    for p in psutil.wait_procs(procs, timeout=grace)[1]:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError as e:
            if getattr(e, "code", 500) < 500:  # an HTTP error page: the server is up
                return
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{url} did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


class MlflowServer:
    """A real `mlflow server` on a free loopback port, SQLite backend in `d`, artifacts proxied to `artifacts`
    (a directory or an s3:// URI)."""

    def __init__(self, d: Path, artifacts: str, env: dict | None = None):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = d / "mlflow-server.log"
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--backend-store-uri",
                sqlite_store(d / "mlflow.db"),
                "--artifacts-destination",
                artifacts,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
            env=env or job_env(),
        )

    def wait(self) -> MlflowServer:
        _wait_http(f"{self.uri}/health", self.proc, self.log)
        return self

    def stop(self) -> None:
        _stop_tree(self.proc)


class MotoS3:
    """An S3-compatible server (moto's standalone server) on a free loopback port with one bucket; `env` holds
    the standard variables that point boto3, s3fs, pyarrow and MLflow at it."""

    def __init__(self, d: Path, bucket: str = "bco"):
        self.port, self.bucket = free_port(), bucket
        self.env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        log = d / "moto.log"
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
        )
        _wait_http(self.env["AWS_ENDPOINT_URL"], self.proc, log, timeout=60)
        self.fs().mkdir(bucket)

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(
            key="testing", secret="testing", client_kwargs={"endpoint_url": self.env["AWS_ENDPOINT_URL"]}
        )

    def stop(self) -> None:
        _stop_tree(self.proc)


def can_unshare() -> str | None:
    """None when this process may give a node its own disk (`unshare --mount` needs root), else why not."""
    if not shutil.which("unshare"):
        return "the unshare tool is not installed"
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        return "unshare --mount is not permitted here (it needs root)"
    return None


class SeparateDiskNode:
    """A Ray worker node on this machine with a disk of its own: `ray start --address=<head>` inside its own
    mount namespace, with private tmpfs mounts over `private` (the head's Ray temp dir, the tests' output
    directories...), so paths the head writes there are invisible on this node, as on a real cluster."""

    def __init__(self, head: RayHead, num_cpus: int, private: list[str], env: dict, log: Path):
        mounts = " && ".join(f"mount -t tmpfs tmpfs {p}" for p in private)
        cmd = (
            f"{mounts} && exec {RAY_BIN} start --block --address={head.gcs} --num-cpus={num_cpus} "
            f"--node-ip-address=127.0.0.1 --temp-dir={head.tmp} --disable-usage-stats"
        )
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd],
            env=env,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
        )

    def pids(self, needle: str) -> list[int]:
        """Processes of this node whose command line contains `needle`."""
        import psutil

        out = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if needle in " ".join(p.cmdline()):
                    out.append(p.pid)
            except psutil.Error:
                pass
        return out

    def stop(self) -> None:
        _stop_tree(self.proc)
