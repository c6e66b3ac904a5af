"""Policy snapshots for the generation eval: at each intermediate evaluation the workers write the policy in
Hugging Face format under `<storage>/<run>/generation/step_NNNNNNN` (ZeRO-3 shards gathered; with LoRA the
merged model in `merged/`); after training the driver lists them for the generation pass (bco_ray/eval/),
then removes them."""

from __future__ import annotations

import os
import re
import shutil
import tempfile

import fsspec

from bco_ray.storage import is_remote, local_path

COMPLETE = "_COMPLETE"  # written last: a snapshot without it is an interrupted write, never read
_STEP = re.compile(r"^step_(\d+)$")


def snapshot_root(storage_dir: str) -> str:
    return f"{storage_dir.rstrip('/')}/generation"


def save_snapshot(export, storage_dir: str, step: int, rank: int) -> None:
    """`export(dir)` writes the policy in Hugging Face format (`PolicyUpdater.export_weights`). Every rank calls
    this (ZeRO-3 gathers need all of them); rank 0 writes."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "model")
        export(src)
        if rank == 0:
            open(os.path.join(src, COMPLETE), "w").close()
            publish_dir(src, f"{snapshot_root(storage_dir)}/step_{step:07d}")


def publish_dir(src: str, dest: str) -> None:
    if is_remote(dest):
        fs, p = fsspec.core.url_to_fs(dest)
        if fs.exists(p):
            fs.rm(p, recursive=True)
        fs.put(src.rstrip("/") + "/", p, recursive=True)  # the marker is among the files; readers check it
        return
    dest = local_path(dest)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(dest))
    shutil.copytree(src, os.path.join(tmp, "model"))
    shutil.rmtree(dest, ignore_errors=True)  # a step trained again after a restart
    os.replace(os.path.join(tmp, "model"), dest)
    os.rmdir(tmp)


def list_snapshots(storage_dir: str) -> dict[int, str]:
    """{step: snapshot path} of the complete snapshots of a run."""
    root = snapshot_root(storage_dir)
    fs, p = fsspec.core.url_to_fs(root)
    if not fs.exists(p):
        return {}
    out = {}
    for entry in fs.ls(p, detail=False):
        m = _STEP.match(os.path.basename(entry.rstrip("/")))
        if m and fs.exists(f"{entry.rstrip('/')}/{COMPLETE}"):
            out[int(m.group(1))] = f"{root}/{os.path.basename(entry.rstrip('/'))}"
    return out


def remove_snapshots(storage_dir: str) -> None:
    """Intermediate snapshots are only inputs of the generation pass: gone once it has run (their results are
    in MLflow)."""
    root = snapshot_root(storage_dir)
    if is_remote(root):
        fs, p = fsspec.core.url_to_fs(root)
        if fs.exists(p):
            fs.rm(p, recursive=True)
        return
    shutil.rmtree(local_path(root), ignore_errors=True)
