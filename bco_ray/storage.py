"""Where a job keeps what it writes: the output directory, the precompute cache and Ray Train's checkpoints.

Defaults never point inside the working directory `ray job submit` uploads (Ray extracts it into a per-node
package cache and deletes it when that cache fills). `$BCO_RAY_STORAGE`, when set (cluster.yaml sets it on
the head to an `s3://` prefix), is the root of every default location:

    precompute.cache_dir  None → $BCO_RAY_STORAGE/cache     else <output_dir>/cache
    train.storage_path    None → $BCO_RAY_STORAGE/ray       else <output_dir>/ray
    output_dir (relative) → $BCO_RAY_STORAGE/<output_dir> when that is a local (mounted) path; else under
                            ~/bco-ray in a submitted job, else the current directory

`output_dir` is the driver's own directory (run summaries, a copy of the final model): the final model's
shared copy lives with the checkpoints. The job resolves them once (bco_ray/job/locations.py); what is here
(URI helpers, the output directory's base) is what every tier uses. No Ray import here.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "BCO_RAY_STORAGE"
_JOB_DIR_MARKERS = ("/runtime_resources/working_dir_files/", "/_ray_pkg_")


def is_remote(uri: str | None) -> bool:
    """An object-store or other fsspec URI (s3://, gs://, ...), as opposed to a path on this machine."""
    return bool(uri) and "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def join(root: str, *parts: str) -> str:
    """`root/part/...` for a local path or a URI."""
    return "/".join([root.rstrip("/"), *parts]) if is_remote(root) else str(Path(local_path(root), *parts))


def in_job_working_dir(path: str | os.PathLike) -> bool:
    """True for a path inside a working directory Ray uploaded for a job (its package cache)."""
    p = str(Path(path).resolve()) + "/"
    return any(m in p for m in _JOB_DIR_MARKERS)


def storage_root() -> str | None:
    root = os.environ.get(ENV, "").strip()
    return root or None


def resolve_output_dir(output_dir: str) -> Path:
    """An absolute output directory: a relative one goes under a local $BCO_RAY_STORAGE, else ~/bco-ray when
    running in a submitted job's uploaded working directory, else the current directory."""
    out = Path(output_dir).expanduser()
    if not out.is_absolute():
        root = storage_root()
        if root and not is_remote(root):
            base = Path(local_path(root))
        elif in_job_working_dir(Path.cwd()):
            base = Path.home() / "bco-ray"
        else:
            base = Path.cwd()
        out = base / out
    return out.resolve()
