"""Multi-node as on a real cluster: nodes with their own disks and shared object storage.

On one machine: a Ray head (1 CPU) and a worker node (1 CPU) started inside its own mount namespace with
private tmpfs mounts over the head's Ray temp dir and this module's directories (where the head's HOME, and
so the job's node-local defaults, live): what the head writes there, the worker node cannot see. Shared
storage is a real S3-compatible server (moto) on 127.0.0.1, reached through the standard AWS_ENDPOINT_URL
variables, and MLflow is a real `mlflow server` whose artifact store is that bucket. The S3 job's policy model
is a directory in that bucket, which each node downloads into its own cache (bco_ray/remote.py).
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from bco_ray.builtin import materialize_tiny_model

from harness import ROOT, MlflowServer, MotoS3, RayHead, SeparateDiskNode, can_unshare, job_env

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(can_unshare() is not None, reason=f"separate-disk nodes: {can_unshare()}"),
]

MODEL_KEY = "models/tiny"
RUNTIME_ENV = {"working_dir": str(ROOT), "excludes": [".git", ".venv", ".gpu", "outputs", "mlflow.db"]}
JOB = (
    "python jobs/bco.py --data.train=tests/data/train.jsonl --udm.enabled=false --data.eval=none --eval.generate=false --train.eval_steps=0 "
    "--train.logging_steps=1 --train.num_workers=2 --train.cpus_per_worker=1"
)


def _alive_nodes(head: RayHead) -> int:
    try:
        with urllib.request.urlopen(f"{head.dashboard}/api/v0/nodes?limit=100", timeout=5) as r:
            nodes = json.load(r)["data"]["result"]["result"]
    except OSError:
        return 0
    return sum(n.get("state") == "ALIVE" for n in nodes)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("multinode")
    home = d / "home"
    home.mkdir()
    s3 = MotoS3(d)
    tiny = materialize_tiny_model(d / "tiny", seed=0)  # under d: the worker node does not see this copy
    for f in tiny.iterdir():
        s3.fs().put_file(str(f), f"{s3.bucket}/{MODEL_KEY}/{f.name}")
    env = {**job_env(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", HOME=str(home)), **s3.env}
    for leaked in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "BCO_RAY_STORAGE"):  # e.g. set by mlflow in this process
        env.pop(leaked, None)
    mlflow = MlflowServer(d, f"s3://{s3.bucket}/mlflow", env=env)
    head = RayHead(1, env=env)  # the server and the head start side by side
    node = None
    try:
        mlflow.wait()
        head.wait()
        node = SeparateDiskNode(head, 1, [head.tmp, str(d)], env, log=d / "worker-node.log")
        deadline = time.time() + 120
        while _alive_nodes(head) < 2:
            assert node.proc.poll() is None and time.time() < deadline, "the worker node did not join"
            time.sleep(1)
        yield {"head": head, "node": node, "s3": s3, "mlflow": mlflow, "home": home, "dir": d}
    finally:
        if node:
            node.stop()
        head.stop()
        mlflow.stop()
        s3.stop()


def _client(cluster):
    from ray.job_submission import JobSubmissionClient

    os.environ["RAY_AUTH_MODE"] = "disabled"
    return JobSubmissionClient(cluster["head"].dashboard)


def _wait(client, job, timeout=900):
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, client.get_job_logs(job)[-4000:]
        time.sleep(1)
    return status


def test_node_local_defaults_fail_at_preflight_and_write_nothing(cluster):
    """No BCO_RAY_STORAGE, no tracking server: the defaults are on the head's disk. The job fails at
    preflight, fast, naming each path and the fix, before any MLflow run, cache or checkpoint exists."""
    client = _client(cluster)
    job = client.submit_job(entrypoint=f"{JOB} --mlflow.run_name=local", runtime_env=RUNTIME_ENV)
    assert _wait(client, job, timeout=120) == "FAILED"
    info, logs = client.get_job_info(job), client.get_job_logs(job)
    assert (info.end_time - info.start_time) / 1000 < 30, logs[-3000:]
    assert "bco-ray: storage error" in logs, logs[-3000:]
    for field in ("precompute.cache_dir", "train.storage_path", "mlflow.tracking_uri"):
        assert f"  {field}=" in logs
    assert "not visible (a file the driver wrote there is missing) on node" in logs and "BCO_RAY_STORAGE=s3://" in logs
    root = cluster["home"] / "bco-ray"  # the node-local default root of a submitted job
    written = [p for p in root.rglob("*")] if root.exists() else []
    assert written == [], written
    bucket = cluster["s3"].bucket
    assert [k for k in cluster["s3"].fs().find(bucket) if not k.startswith(f"{bucket}/{MODEL_KEY}/")] == []


def test_s3_job_on_two_nodes_survives_a_killed_worker(cluster):
    """BCO_RAY_STORAGE=s3://...: the policy model read from the bucket, one training worker per node, the
    pass, checkpoints, the final model and MLflow's artifacts in the bucket. Each node downloads the model into
    its own cache. The worker on the second node is killed after the first registered checkpoint; the run
    resumes from the bucket and ends with each step logged once."""
    from mlflow.tracking import MlflowClient

    s3, fs = cluster["s3"], cluster["s3"].fs()
    client = _client(cluster)
    env = {"BCO_RAY_STORAGE": f"s3://{s3.bucket}/bco", "MLFLOW_TRACKING_URI": cluster["mlflow"].uri}
    model = f"s3://{s3.bucket}/{MODEL_KEY}"
    job = client.submit_job(
        entrypoint=f"{JOB} --mlflow.run_name=s3run --train.max_steps=6 --train.save_steps=2 "
        f"--train.max_failures=1 --model.policy={model}",
        runtime_env={**RUNTIME_ENV, "env_vars": env},
    )
    run_dir = f"{s3.bucket}/bco/ray/s3run"
    snapshot = f"{run_dir}/checkpoint_manager_snapshot.json"
    deadline = time.time() + 600
    while not (fs.exists(snapshot) and "checkpoint_step" in fs.cat(snapshot).decode()):
        assert client.get_job_status(job) not in ("FAILED", "SUCCEEDED") and time.time() < deadline, (
            client.get_job_logs(job)[-4000:]
        )
        time.sleep(1)
        fs.invalidate_cache()
    victims = cluster["node"].pids("RayTrainWorker")
    assert victims, "no training worker on the second node"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    status, logs = _wait(client, job), client.get_job_logs(job)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "resumed from checkpoint at step" in logs, logs[-4000:]
    assert f"precompute computed: s3://{s3.bucket}/bco/cache/" in logs
    assert f"[bco-ray] downloaded {model} " in logs, logs[-4000:]
    # each node's own copy, in its own HOME (the worker node's is on its private disk, seen through its root)
    node_root = Path(f"/proc/{cluster['node'].proc.pid}/root")  # the worker node's view of the disks
    copies = [
        list((root / str(cluster["home"]).lstrip("/") / ".cache/bco-ray/remote").glob("*/model.safetensors"))
        for root in (Path("/"), node_root)
    ]
    assert copies[0] and copies[1], copies
    weights = (cluster["dir"] / "tiny" / "model.safetensors").read_bytes()
    assert copies[0][0].read_bytes() == copies[1][0].read_bytes() == weights
    assert not (node_root / str(cluster["dir"]).lstrip("/") / "tiny").exists()  # it never saw the head's copy

    fs.invalidate_cache()
    keys = fs.find(s3.bucket)
    assert any(k.startswith(f"{s3.bucket}/bco/cache/") and k.endswith(".parquet") for k in keys)
    ckpts = sorted({k.split("/")[4] for k in keys if k.startswith(f"{run_dir}/checkpoint_step")})
    assert ckpts, keys
    ranks = [json.loads(fs.cat(f"{run_dir}/{ckpts[-1]}/rank{r}.json")) for r in (0, 1)]
    assert ranks[0]["node_id"] != ranks[1]["node_id"]  # one worker on each node
    ds = [k for k in keys if k.startswith(f"{run_dir}/{ckpts[-1]}/ds/")]
    assert any("zero_pp_rank_0" in k for k in ds) and any("zero_pp_rank_1" in k for k in ds)
    assert any(k.startswith(f"{run_dir}/final_step0000006/model/") and k.endswith(".safetensors") for k in keys)

    ml = MlflowClient(cluster["mlflow"].uri)
    (run,) = ml.search_runs(
        [ml.get_experiment_by_name("bco-ray-tiny").experiment_id], filter_string="tags.mlflow.runName = 's3run'"
    )
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in ml.get_metric_history(run.info.run_id, "loss")) == list(range(1, 7))
    assert any(k.startswith(f"{s3.bucket}/mlflow/") for k in keys)  # the run's artifacts are in the bucket
