"""Content fingerprints of inputs: a file or directory (local or any fsspec URI) by its bytes, a Hugging Face
Hub id by the commit its revision resolves to. The precompute cache key and the names of the files the Python API
writes are built from them."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import fsspec

log = logging.getLogger(__name__)

_FULL_HASH_LIMIT = 64 << 20  # files above this are fingerprinted by size + head/tail bytes


def _hash_file(fs, path: str, size: int) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f.read(1 << 20))
            f.seek(size - (1 << 20))
            h.update(f.read())
    h.update(str(size).encode())
    return h.hexdigest()


def _cached_ref(repo_id: str, revision: str | None, repo_type: str) -> str | None:
    """The commit a revision points at in the local Hugging Face cache (`refs/<revision>`), if it is there."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    ref = folder / "refs" / (revision or "main")
    if ref.is_file():
        return ref.read_text().strip() or None
    if revision and (folder / "snapshots" / revision).is_dir():  # a commit SHA already
        return revision
    return None


def hub_sha(repo_id: str, revision: str | None, repo_type: str = "model") -> str | None:
    """The commit SHA a hub revision (None: the default branch) points at now: asked of the hub
    (`HfApi.repo_info`, token from HF_TOKEN), or, offline or when the hub cannot be reached, the local cache's
    ref. None when neither knows it."""
    from huggingface_hub import HfApi, constants

    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type).sha
        except Exception as e:  # noqa: BLE001 - offline, unreachable, not found: try the cache
            log.info(
                "hub: cannot resolve %s %s@%s (%s: %s); trying the local cache",
                repo_type,
                repo_id,
                revision or "default",
                type(e).__name__,
                e,
            )
    return _cached_ref(repo_id, revision, repo_type)


def fingerprint_path(spec: str, revision: str | None = None, *, etags: bool = False) -> str:
    """Content fingerprint of a local/remote file or directory. A hub model id is identified by the commit
    its revision resolves to (a branch that moves gives a new fingerprint), or by id + revision where that
    commit cannot be known. `etags`: an object store's objects by ETag + size, as listed, without reading them
    back (cache keys of large remote inputs); off where the bytes themselves must be checked."""
    try:
        fs, path = fsspec.core.url_to_fs(spec)
        fs.invalidate_cache(path)  # s3fs & co. keep listings per instance: fingerprint what is there now
        exists = fs.exists(path)
    except (ValueError, ImportError):
        exists = False
    if not exists:
        sha = hub_sha(spec, revision) if _looks_like_hub_id(spec) else None
        return f"hub:{spec}@{sha}" if sha else f"id:{spec}@{revision or 'main'}"
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if "/." not in p[len(path) :])
    else:
        files = [path]
    h = hashlib.sha256()
    for p in files:
        info = fs.info(p)
        h.update(p[len(path) :].encode())
        etag = (info.get("ETag") or info.get("etag")) if etags else None
        if etag:  # object stores: the ETag changes with the content
            h.update(f"etag:{etag}:{info['size']}".encode())
        else:
            h.update(_hash_file(fs, p, int(info["size"])).encode())
    return h.hexdigest()


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return "://" not in spec and 1 <= len(parts) <= 2 and all(parts) and ".." not in spec and not spec.startswith("~")
