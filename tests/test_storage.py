"""Where a job writes by default (bco_ray/storage.py) and what the multi-node preflight checks
(bco_ray/job/preflight.py): no Ray here; the preflight itself runs end to end in test_multinode_s3.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from bco_ray.config.schema import load_config
from bco_ray.job.locations import resolve_locations
from bco_ray.job.preflight import Need, _message, needs
from bco_ray.models import Paths
from bco_ray.storage import in_job_working_dir, join, resolve_output_dir
from bco_ray.tracking.mlflow_run import tracking_uri


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("BCO_RAY_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _job_dir(tmp_path: Path) -> Path:
    d = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    d.mkdir(parents=True)
    return d


def test_the_pass_takes_the_jobs_resolved_locations_as_given(clean_env):
    """run_precompute resolves nothing itself: a config whose locations the job did not resolve is refused."""
    from bco_ray.precompute.pipeline import run_precompute

    paths = Paths(policy="p", reference="p", tokenizer="p", embedder=None, pad_id=0)
    with pytest.raises(ValueError, match="locations resolved .*run_checks"):
        run_precompute(load_config(None, []), paths)


def test_defaults_outside_a_job_are_under_the_current_directory(clean_env):
    cfg = resolve_locations(load_config(None, []))
    assert cfg.output_dir == str(clean_env / "outputs")
    assert cfg.precompute.cache_dir == str(clean_env / "outputs" / "cache")
    assert cfg.train.storage_path == str(clean_env / "outputs" / "ray")
    assert tracking_uri(cfg) == f"sqlite:///{clean_env / 'mlflow.db'}"


def test_defaults_in_a_submitted_job_never_point_into_its_upload(clean_env, monkeypatch):
    monkeypatch.chdir(_job_dir(clean_env))
    assert in_job_working_dir(Path.cwd())
    cfg = resolve_locations(load_config(None, []))
    home = clean_env / "home" / "bco-ray"
    assert cfg.output_dir == str(home / "outputs") and cfg.train.storage_path == str(home / "outputs" / "ray")
    assert tracking_uri(cfg) == f"sqlite:///{home / 'mlflow.db'}"


def test_bco_ray_storage_is_the_root_of_cache_and_checkpoints(clean_env, monkeypatch):
    monkeypatch.setenv("BCO_RAY_STORAGE", "s3://bucket/prefix/")
    cfg = resolve_locations(load_config(None, []))
    assert cfg.precompute.cache_dir == "s3://bucket/prefix/cache"
    assert cfg.train.storage_path == "s3://bucket/prefix/ray"
    assert cfg.output_dir == str(clean_env / "outputs")  # the driver's own directory stays local
    explicit = resolve_locations(
        load_config(None, ["--train.storage_path=s3://other/ckpt", "--precompute.cache_dir=/mnt/c"])
    )
    assert explicit.train.storage_path == "s3://other/ckpt" and explicit.precompute.cache_dir == "/mnt/c"
    monkeypatch.setenv("BCO_RAY_STORAGE", str(clean_env / "shared"))  # a shared mount
    cfg = resolve_locations(load_config(None, []))
    assert cfg.output_dir == str(clean_env / "shared" / "outputs")
    assert cfg.precompute.cache_dir == str(clean_env / "shared" / "cache")
    assert resolve_output_dir("/abs/out") == Path("/abs/out")
    assert join("s3://b/p/", "x", "y") == "s3://b/p/x/y" and join("/a", "x") == "/a/x"


def test_preflight_needs_what_the_job_writes_and_reads_from_outside(clean_env, monkeypatch):
    model = clean_env / "my-model"
    model.mkdir()
    data = clean_env / "train.jsonl"
    data.write_text("{}\n")
    job_copy = _job_dir(clean_env) / "data.jsonl"
    job_copy.write_text("{}\n")
    cfg = resolve_locations(
        load_config(None, [f"--data.train={data}", f"--data.eval={job_copy}", "--udm.enabled=false"])
    )
    paths = Paths(policy=str(model), reference=str(model), tokenizer="builtin:tiny-qwen2", embedder=None, pad_id=0)
    got = {n.field: n for n in needs(cfg, paths, f"sqlite:///{clean_env}/db/mlflow.db")}
    assert got["precompute.cache_dir"].writes and got["train.storage_path"].writes
    assert got["mlflow.tracking_uri"] == Need("mlflow.tracking_uri", f"{clean_env}/db", True)
    assert got["model.policy"] == Need("model.policy", str(model), False)
    assert got["data.train"] == Need("data.train", str(data), False)
    assert "data.eval" not in got  # inside the job's upload: Ray puts it on every node
    assert "model.tokenizer" not in got  # builtin: shipped with the package
    elsewhere = Paths(policy="org/model", reference="s3://b/m", tokenizer="org/model", embedder=None, pad_id=0)
    remote = {n.field for n in needs(cfg, elsewhere, "http://127.0.0.1:5000")}
    assert not remote & {"model.policy", "model.reference", "mlflow.tracking_uri"}
    inputs = "s3://b/inputs"  # BCOTrainer's inputs in a bucket: shared by construction, never probed
    on_s3 = resolve_locations(
        load_config(
            None,
            [
                f"--data.train={inputs}/data/train-0123456789abcdef.parquet",
                f"--udm.embedding_func={inputs}/udm/embedding_func-0.pkl",
            ],
        )
    )
    in_bucket = Paths(
        policy=f"{inputs}/models/model-0",
        reference=f"{inputs}/models/model-0",
        tokenizer=f"{inputs}/models/tokenizer-0",
        embedder=None,
        pad_id=0,
    )
    assert {n.field for n in needs(on_s3, in_bucket, "http://127.0.0.1:5000")} == {
        "precompute.cache_dir",
        "train.storage_path",
    }


def test_preflight_message_names_each_path_and_the_fix():
    msg = _message(
        {
            "train.storage_path": ("/home/ray/out/ray", "not visible (...) on node w1 (abc)"),
            "data.train": ("/data/t.jsonl", "not found on node w1 (abc)"),
        },
        3,
    )
    assert msg.startswith("this cluster has 3 nodes")
    assert "  train.storage_path=/home/ray/out/ray: not visible" in msg and "  data.train=/data/t.jsonl" in msg
    assert "BCO_RAY_STORAGE=s3://" in msg and "--mlflow.tracking_uri=http://" in msg
