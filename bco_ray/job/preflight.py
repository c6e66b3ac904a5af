"""Preflight on a multi-node cluster: every path the job writes or reads must be visible from every node.

A path on the head's disk is invisible to a worker on another node; the job would fail at its first
checkpoint or first read, minutes or hours in. Before any work (no MLflow run, no cache, no checkpoint),
the driver writes a marker next to each path it will write (the nearest existing directory, or the URI
prefix of an object store) and a zero-CPU task pinned to each alive node reads it back; local paths the job
only reads must exist on every node (hub ids and object-store URIs, e.g. an s3:// model each node downloads
itself or BCOTrainer's s3:// inputs_dir, are shared by construction: not probed). Markers are removed
afterwards. One error names every path that fails, why, and the fix.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import fsspec
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from bco_ray.builtin import BUILTIN_EMBEDDER
from bco_ray.errors import StorageError
from bco_ray.storage import ENV, in_job_working_dir, is_remote, local_path

MARKER = ".bco-ray-preflight-"


class SharedStorageError(StorageError, ValueError):
    """A path the job needs is not visible from every node of the cluster."""


@dataclass(frozen=True)
class Need:
    field: str  # the config field, e.g. "train.storage_path"
    path: str  # a local path or a URI
    writes: bool  # written by the job (shared storage), else only read


def needs(cfg, paths, tracking_uri: str) -> list[Need]:
    """The paths a job writes (cache, checkpoints, a file-based MLflow store) and reads from outside its own
    uploaded working directory and installed packages (local models, data files, an embedding function)."""
    out = [
        Need("precompute.cache_dir", cfg.precompute.cache_dir, True),
        Need("train.storage_path", cfg.train.storage_path, True),
    ]
    if tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///") :].split("?")[0]
        out.append(Need("mlflow.tracking_uri", os.path.dirname(db) or ".", True))
    elif tracking_uri.startswith("file:"):
        out.append(Need("mlflow.tracking_uri", urlparse(tracking_uri).path, True))
    elif "://" not in tracking_uri:
        out.append(Need("mlflow.tracking_uri", tracking_uri, True))
    reads = [
        ("model.policy", paths.policy),
        ("model.reference", paths.reference),
        ("model.tokenizer", paths.tokenizer),
        ("data.train", cfg.data.train),
        ("data.eval", cfg.data.eval),
        ("udm.embedding_func", cfg.udm.embedding_func),
    ]
    if cfg.udm.enabled and cfg.udm.embedding_model != BUILTIN_EMBEDDER:
        reads.append(("udm.embedding_model", paths.embedder))
    for field, p in reads:
        if not p or p.startswith(("builtin:", "hf:")) or is_remote(p):
            continue
        p = local_path(p)
        if os.path.exists(p) and not in_job_working_dir(p):  # the working dir is on every node
            out.append(Need(field, os.path.abspath(p), False))
    return out


def _existing_dir(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        p = os.path.dirname(p)
    return p


def _marker_location(need: Need, name: str) -> str:
    if is_remote(need.path):
        return f"{need.path.rstrip('/')}/{name}"
    return os.path.join(_existing_dir(need.path), name)


def _probe(items: list[tuple[str, str, str | None]]) -> dict:
    """On one node: for each (field, location, token) the marker's content equals token, or the path exists."""
    seen = {}
    for field, loc, token in items:
        try:
            fs, p = fsspec.core.url_to_fs(loc)
            if token is None:
                seen[field] = "ok" if fs.exists(p) else "not found"
            elif not fs.exists(p):
                seen[field] = "not visible (a file the driver wrote there is missing)"
            else:
                with fs.open(p, "r") as f:
                    seen[field] = "ok" if f.read() == token else "another file at the same path"
        except FileNotFoundError:
            seen[field] = "not found"
        except Exception as e:  # credentials, endpoint, permissions: reported, not raised
            seen[field] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "seen": seen}


def check_shared_paths(cfg, paths, tracking_uri: str, timeout_s: float = 60.0) -> int:
    """Raise SharedStorageError unless every need is visible from every alive node. Returns the number of
    nodes checked (1: nothing to check). Nodes an autoscaler adds later are assumed to mount the same."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return len(nodes)
    name = f"{MARKER}{uuid.uuid4().hex}"
    wanted = {n.field: n for n in needs(cfg, paths, tracking_uri)}
    written, items, problems = [], [], {}
    for i, need in enumerate(wanted.values()):
        if not need.writes:
            items.append((need.field, need.path, None))
            continue
        loc, token = _marker_location(need, f"{name}-{i}"), uuid.uuid4().hex
        try:
            fs, p = fsspec.core.url_to_fs(loc)
            with fs.open(p, "w") as f:
                f.write(token)
            written.append((fs, p))
            items.append((need.field, loc, token))
        except Exception as e:
            problems[need.field] = (need.path, f"the driver cannot write there ({type(e).__name__}: {e})")
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    try:
        refs = {
            n["NodeID"]: probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(items)
            for n in nodes
        }
        _, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        for node_id, ref in refs.items():
            if ref in pending:
                problems.setdefault("(nodes)", ("", f"node {node_id[:12]} did not answer within {timeout_s:g} s"))
                continue
            answer = ray.get(ref)
            for field, seen in answer["seen"].items():
                if seen != "ok" and field not in problems:
                    problems[field] = (wanted[field].path, f"{seen} on node {answer['host']} ({node_id[:12]})")
    finally:
        for fs, p in written:
            try:
                fs.rm(p)
            except Exception:
                pass
    if problems:
        raise SharedStorageError(_message(problems, len(nodes)))
    return len(nodes)


def _message(problems: dict, n_nodes: int) -> str:
    lines = [f"this cluster has {n_nodes} nodes, and a path the job needs is not the same on all of them:"]
    for field, (path, why) in problems.items():
        lines.append(f"  {field}={path}: {why}")
    lines.append(
        f"Fix: put the job's storage where every node sees it: set {ENV}=s3://<bucket>/<prefix> on the head "
        "(the default root for the cache, checkpoints and outputs; cluster.yaml does this), or pass "
        "--precompute.cache_dir / --train.storage_path as s3:// URIs or paths on a mount every node shares; "
        "give models and data as hub ids or s3:// URIs, and MLflow as a tracking server "
        "(--mlflow.tracking_uri=http://<head>:5000)."
    )
    return "\n".join(lines)
