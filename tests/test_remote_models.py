"""Models and BCOTrainer inputs on object storage, against a real S3-compatible server (moto, on loopback): a
model directory under s3:// is downloaded once per node into a cache keyed by its listing (bco_ray/remote.py)
and loads with transformers; BCOTrainer uploads in-memory inputs to an s3:// inputs_dir, content-addressed,
with a completion marker written last (bco_ray/api/_io.py); the job's checks name a missing remote model.
No Ray here: the multi-node job that downloads its policy from the bucket is in test_multinode_s3.py."""

from __future__ import annotations

import json
import logging
import pickle
import threading
import time
from pathlib import Path

import fsspec
import pytest
import torch

from bco_ray.builtin import ASSETS, materialize_tiny_model
from bco_ray.remote import MARKER, cache_key, fetch_dir, listing, local_model_dir

from harness import MotoS3

TRAIN_ROWS = [json.loads(line) for line in (ASSETS / "arithmetic" / "train.jsonl").read_text().splitlines()[:16]]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The moto server, with this process's AWS variables pointing at it (s3fs and pyarrow read them)."""
    server = MotoS3(tmp_path_factory.mktemp("moto"))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in server.env.items():
            mp.setenv(k, v)
        yield server
    server.stop()
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # instances made here point at this server's endpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return materialize_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=0)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BCO_RAY_REMOTE_CACHE", str(tmp_path / "remote-cache"))
    return tmp_path / "remote-cache"


def _upload(s3: MotoS3, local: Path, key: str) -> str:
    fs = s3.fs()
    for f in sorted(local.rglob("*")):
        if f.is_file():
            fs.put_file(str(f), f"{s3.bucket}/{key}/{f.relative_to(local).as_posix()}")
    return f"s3://{s3.bucket}/{key}"


def test_a_model_on_s3_is_downloaded_once_per_listing_and_loads(s3, tiny, cache, capfd):
    from transformers import AutoModelForCausalLM

    from bco_ray.models import load_causal_lm, load_tokenizer

    uri = _upload(s3, tiny, "models/one")
    s3.fs().pipe_file(f"{s3.bucket}/models/one/.cache/huggingface/x.lock", b"")  # hidden: not copied
    local = Path(local_model_dir(uri))
    assert local.parent == cache and (local / "config.json").is_file()
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in tiny.iterdir())
    assert "[bco-ray] downloaded " + uri in capfd.readouterr().err
    got, want = AutoModelForCausalLM.from_pretrained(local), AutoModelForCausalLM.from_pretrained(tiny)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))

    # the loaders take the URI; a second call is a cache hit (no download, no temporary directory left)
    assert load_causal_lm(uri, dtype=torch.float32).config.vocab_size == want.config.vocab_size
    assert local_model_dir(uri) == str(local)
    assert "downloaded " not in capfd.readouterr().err
    assert load_tokenizer(uri).pad_token_id is not None and load_tokenizer(uri).pad_token_id is not None
    assert capfd.readouterr().err.count("downloaded " + uri) == 1  # the tokenizer's copy: no weights, once
    meta = Path(local_model_dir(uri, weights=False))
    assert meta != local and (meta / "config.json").is_file() and not list(meta.glob("*.safetensors"))
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == sorted([local.name, meta.name])
    assert not [p for p in cache.iterdir() if p.is_dir() and p.name.startswith(".")]

    # a changed object is a new listing, so a new cache entry, downloaded again
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["bco_ray_note"] = "changed"
    s3.fs().pipe_file(f"{s3.bucket}/models/one/config.json", json.dumps(cfg).encode())
    changed = Path(local_model_dir(uri))
    assert changed != local and json.loads((changed / "config.json").read_text())["bco_ray_note"] == "changed"
    assert "downloaded " + uri in capfd.readouterr().err
    assert local_model_dir("org/name") == "org/name" and local_model_dir(str(tiny)) == str(tiny)


def test_concurrent_downloads_of_one_model_share_one_copy(s3, tiny, cache, monkeypatch):
    import bco_ray.remote as remote

    uri = _upload(s3, tiny, "models/two")
    real, calls, started = remote._download, [], threading.Barrier(2)

    def counted(*a, **kw):
        calls.append(a[0])
        return real(*a, **kw)

    monkeypatch.setattr(remote, "_download", counted)
    out: list[Path] = []

    def fetch():
        started.wait()
        out.append(fetch_dir(uri))

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 2 and out[0] == out[1] and calls == [uri]  # the second waited for the first's copy
    key = cache_key(uri, listing(uri), True)
    assert out[0] == cache / key and (out[0] / "model.safetensors").is_file()


def _recording(monkeypatch, uri: str) -> list[str]:
    """The object writes the s3 filesystem used for `uri` makes, in order."""
    import fsspec

    fs = fsspec.core.url_to_fs(uri)[0]
    writes: list[str] = []
    put_file, pipe_file = fs.put_file, fs.pipe_file

    def put(lpath, rpath, *a, **kw):
        writes.append(rpath)
        return put_file(lpath, rpath, *a, **kw)

    def pipe(path, *a, **kw):
        writes.append(path)
        return pipe_file(path, *a, **kw)

    monkeypatch.setattr(fs, "put_file", put)
    monkeypatch.setattr(fs, "pipe_file", pipe)
    return writes


def test_save_by_content_to_s3_is_idempotent_and_marks_completion_last(s3, tiny, monkeypatch):
    import shutil

    from bco_ray.api._io import _save_by_content

    root = f"s3://{s3.bucket}/inputs/models"
    writes = _recording(monkeypatch, root)
    save = lambda d: [shutil.copy2(f, Path(d) / f.name) for f in tiny.iterdir()]  # noqa: E731
    dest = _save_by_content(root, "model", save, directory=True)
    assert dest.startswith(root + "/model-")
    prefix = dest[len("s3://") :]
    assert writes[-1] == f"{prefix}/{MARKER}" and len(writes) == len(list(tiny.iterdir())) + 1
    fs = s3.fs()
    assert sorted(json.loads(fs.cat(f"{prefix}/{MARKER}"))) == sorted(p.name for p in tiny.iterdir())

    writes.clear()
    assert _save_by_content(root, "model", save, directory=True) == dest and writes == []  # complete: skipped

    fs.rm(f"{prefix}/{MARKER}")  # an upload cut short: files there, no marker
    fs.rm(f"{prefix}/model.safetensors")
    assert _save_by_content(root, "model", save, directory=True) == dest
    assert writes[-1] == f"{prefix}/{MARKER}" and f"{prefix}/model.safetensors" in writes
    fs.invalidate_cache()
    assert fs.exists(f"{prefix}/model.safetensors")

    writes.clear()  # a single file: one object, which S3 shows only once written; no marker
    f1 = _save_by_content(f"s3://{s3.bucket}/inputs/data", "train", lambda p: Path(p).write_text("x"), ".txt")
    f2 = _save_by_content(f"s3://{s3.bucket}/inputs/data", "train", lambda p: Path(p).write_text("x"), ".txt")
    assert f1 == f2 and writes == [f1[len("s3://") :]] and fs.cat(f1[len("s3://") :]) == b"x"


def _embed(input_ids=None, attention_mask=None):
    return torch.ones(input_ids.shape[0], 4)


def test_trainer_puts_its_inputs_in_the_bucket(s3, tiny, cache, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bco_ray import BCOConfig, BCOTrainer
    from bco_ray.data.checks import check_data
    from bco_ray.job.checks import resolve_paths
    from bco_ray.job.locations import resolve_locations
    from bco_ray.precompute.embedding_func import EmbeddingFuncError, load_embedding_func

    model, tok = AutoModelForCausalLM.from_pretrained(tiny), AutoTokenizer.from_pretrained(tiny)
    inputs = f"s3://{s3.bucket}/explicit/inputs"
    trainer = BCOTrainer(
        model=model,
        args=BCOConfig(output_dir=str(tmp_path / "o"), inputs_dir=inputs),
        processing_class=tok,
        train_dataset=TRAIN_ROWS,
        embedding_func=_embed,
        embedding_tokenizer=str(tiny),
    )
    cfg = trainer.config
    assert cfg.model.policy.startswith(f"{inputs}/models/model-") and cfg.model.reference is None
    assert cfg.model.tokenizer.startswith(f"{inputs}/models/tokenizer-")
    assert cfg.data.train.startswith(f"{inputs}/data/train-") and cfg.data.train.endswith(".parquet")
    assert cfg.udm.embedding_func.startswith(f"{inputs}/udm/embedding_func-")
    fs = s3.fs()
    fs.invalidate_cache()
    for uri in (cfg.model.policy, cfg.model.tokenizer):
        assert fs.exists(f"{uri[len('s3://') :]}/{MARKER}")
    assert not (tmp_path / "o" / "inputs").exists()  # nothing left on the driver's disk

    # what the job does with them before any Ray work: data read from the bucket, models checked
    cfg = resolve_locations(cfg)
    assert check_data(cfg).train.rows == len(TRAIN_ROWS)
    paths, tokenizer = resolve_paths(cfg)
    assert paths.policy == cfg.model.policy and tokenizer.pad_token_id == paths.pad_id
    obj = load_embedding_func(cfg.udm.embedding_func)  # the pickle, checked and loaded from s3
    assert obj["func"](input_ids=torch.zeros(2, 3, dtype=torch.long)).shape == (2, 4)
    fs.pipe_file(cfg.udm.embedding_func[len("s3://") :], pickle.dumps({"func": print, "tokenizer": None}))
    with pytest.raises(EmbeddingFuncError, match="changed after it was written"):  # replaced in the bucket
        load_embedding_func(cfg.udm.embedding_func)

    monkeypatch.setenv("BCO_RAY_STORAGE", f"s3://{s3.bucket}/store")  # the default inputs_dir follows it
    by_env = BCOTrainer(
        model=model, args=BCOConfig(output_dir=str(tmp_path / "o")), processing_class=tok, train_dataset=TRAIN_ROWS
    )
    assert by_env.config.model.policy.startswith(f"s3://{s3.bucket}/store/inputs/models/model-")
    assert by_env.config.model.policy.rsplit("/", 1)[1] == trainer.config.model.policy.rsplit("/", 1)[1]


def test_checks_name_a_missing_remote_model(s3, tiny, cache):
    from bco_ray.config.schema import load_config
    from bco_ray.job.checks import ModelError, resolve_paths

    uri = _upload(s3, tiny, "models/three")
    good = load_config(None, [f"--model.policy={uri}", "--udm.enabled=false"])
    paths, _ = resolve_paths(good)
    assert paths.policy == uri and paths.tokenizer == uri
    assert not list(Path(cache).glob("*/model.safetensors"))  # the checks fetched no weights
    missing = f"s3://{s3.bucket}/models/nothing-here"
    bad = load_config(None, [f"--model.policy={uri}", f"--model.reference={missing}", "--udm.enabled=false"])
    with pytest.raises(
        ModelError,
        match=rf"^model.reference: '{missing}': there is no config.json under it; "
        "give the URI of a directory holding a Hugging Face model",
    ):
        resolve_paths(bad)


def test_the_cache_key_fingerprints_an_s3_model_by_its_listing(s3, tiny, monkeypatch):
    """The precompute cache key's fingerprint of a model on s3 comes from the objects' ETags and sizes (no object
    is read back: a large model costs one listing), and changes when an object changes."""
    from bco_ray.data import fingerprint

    fsspec.core.url_to_fs(f"s3://{s3.bucket}/models")[0].ls(f"{s3.bucket}/models")  # a listing cached before
    uri = _upload(s3, tiny, "models/fp")
    reads = []
    monkeypatch.setattr(fingerprint, "_hash_file", lambda fs, p, size: reads.append(p) or "read")
    first = fingerprint.fingerprint_path(uri, etags=True)
    assert reads == [] and first == fingerprint.fingerprint_path(uri, etags=True)
    s3.fs().pipe_file(f"{s3.bucket}/models/fp/config.json", b'{"changed": true}')
    assert fingerprint.fingerprint_path(uri, etags=True) != first and reads == []
    fingerprint.fingerprint_path(uri)  # by content (the embedding func's check): every object
    assert len(reads) == len([f for f in tiny.rglob("*") if f.is_file()])


def test_a_model_replaced_during_its_download_is_not_cached(s3, tiny, cache, monkeypatch):
    """Same sizes, new content (new ETags) while it downloads: the copy is dropped, the error says try again."""
    from bco_ray import remote

    uri = _upload(s3, tiny, "models/moving")
    real = remote._download

    def download_then_replace(uri_, files, root, dest):
        real(uri_, files, root, dest)
        cfg = s3.fs().cat_file(f"{s3.bucket}/models/moving/config.json")
        assert cfg.endswith(b"\n")
        s3.fs().pipe_file(f"{s3.bucket}/models/moving/config.json", cfg[:-1] + b" ")  # same size, still JSON

    monkeypatch.setattr(remote, "_download", download_then_replace)
    with pytest.raises(OSError, match="changed while it was downloaded"):
        fetch_dir(uri)
    assert not [p for p in cache.iterdir() if not p.name.startswith(".")]
    monkeypatch.setattr(remote, "_download", real)
    assert (fetch_dir(uri) / "config.json").exists()  # the next try gets the new content


def test_the_precompute_cache_on_s3_is_computed_once_and_checked_on_reuse(s3, caplog):
    """Two jobs (each its own S3 client, as two processes have) on one cache key in a bucket: one computes, the
    other waits on the lease and reuses the commit; a file cut short after the commit is named by its s3:// URI
    and recomputed, and a client that listed the key before sees the new commit (s3fs caches listings)."""
    import s3fs

    from bco_ray.precompute.cache import Cache, reuse_or_compute
    from bco_ray.precompute.lease import Timing

    timing = Timing(heartbeat_s=0.3, stale_s=30, settle_s=0.2, poll_s=0.1, wait_s=60)
    calls, results = [], []

    def job(delay: float):
        cache = Cache(f"s3://{s3.bucket}/cache", "k", timing)
        cache.fs = s3fs.S3FileSystem(skip_instance_cache=True)  # this job's own client and listing cache

        def compute():
            attempt = cache.new_attempt()
            calls.append(attempt)
            base = f"{cache.key_dir}/{attempt}"
            cache.fs.pipe_file(f"{base}/split=train/part-0.parquet", _parquet(10))
            time.sleep(delay)
            cache.write_json(f"{base}/summary.json", {"rows": 10})
            cache.commit(attempt, {"train": cache.uri(f"{base}/split=train")})
            return "computed", attempt

        results.append(reuse_or_compute(cache, compute, lambda r: ("reused", r["attempt"])))

    threads = [threading.Thread(target=job, args=(0.5,)) for _ in range(2)]
    threads[0].start()
    while not s3.fs().exists(f"{s3.bucket}/cache/k/LEASE.json"):  # the second job lists the key while it waits
        time.sleep(0.05)
    threads[1].start()
    for t in threads:
        t.join(60)
    assert len(calls) == 1 and sorted(results) == [("computed", calls[0]), ("reused", calls[0])]
    part = f"{s3.bucket}/cache/k/{calls[0]}/split=train/part-0.parquet"
    s3.fs().pipe_file(part, s3.fs().cat_file(part)[:-20])
    other = Cache(f"s3://{s3.bucket}/cache", "k", timing)
    other.fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert other.complete()["attempt"] == calls[0] and other.fs.ls(other.key_dir)  # listed, and cached
    with caplog.at_level(logging.WARNING, logger="bco_ray.precompute.cache"):
        job(0.0)
    assert len(calls) == 2 and results[-1] == ("computed", calls[1])
    assert any(f"s3://{part} is" in r.getMessage() for r in caplog.records)
    assert other.complete()["attempt"] == calls[1]


def _parquet(rows: int) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"x": list(range(rows))}), buf)
    return buf.getvalue()
