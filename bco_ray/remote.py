"""Models on object storage: `model.policy` / `model.reference` / `model.tokenizer` / `udm.embedding_model` as an
`s3://...` (any fsspec URI, `bco_ray.storage.is_remote`), for transformers' `from_pretrained`, which reads only
local directories and hub ids.

`local_model_dir(uri)` copies the directory once per node into a local cache and returns the local path; hub
ids and local paths come back unchanged. The cache entry is keyed by the URI and the listing of its objects
(names, sizes, ETags): a changed object is a new entry, an unchanged one is never downloaded again. A download
goes into a temporary directory next to the entry and is renamed into place when complete, under a file lock:
another process on the node waits for it and never sees a half directory. `weights=False` copies everything
but the weight files (config, tokenizer, generation config): what the driver's checks and a tokenizer need.
Hidden names (`.cache/`, `.gitattributes`, the completion marker below) are not copied.

`MARKER` is the object `BCOTrainer` writes last when it uploads a saved model (bco_ray/api/_io.py): the writer
skips an upload only when its marker is there. Readers need no marker: a config only names an upload once its
marker is written, and a re-upload writes the same bytes under the same content-addressed name.

The cache root is `$BCO_RAY_REMOTE_CACHE`, default `~/.cache/bco-ray/remote`; old entries are not removed.
No Ray import here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import fsspec
from filelock import FileLock

from bco_ray.storage import is_remote

CACHE_ENV = "BCO_RAY_REMOTE_CACHE"
MARKER = ".bco-ray-complete"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "LastModified", "last_modified", "mtime", "updated")


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV, "").strip()
    return Path(root).expanduser() if root else Path.home() / ".cache" / "bco-ray" / "remote"


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def listing(uri: str, weights: bool = True) -> dict[str, tuple[int, str]]:
    """{relative name: (size, version)} of the objects under `uri` that a download copies."""
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    out = {}
    for path, info in fs.find(root, detail=True).items():
        rel = path[len(root) :].lstrip("/")
        if not rel or _is_hidden(rel) or (not weights and rel.endswith(WEIGHT_SUFFIXES)):
            continue
        version = next((str(info[k]) for k in _VERSION_KEYS if info.get(k) is not None), "")
        out[rel] = (int(info.get("size") or 0), version)
    return out


def cache_key(uri: str, files: dict[str, tuple[int, str]], weights: bool) -> str:
    blob = json.dumps({"uri": uri.rstrip("/"), "weights": weights, "files": sorted(files.items())})
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def local_model_dir(path: str, weights: bool = True) -> str:
    """A local directory holding the model (or tokenizer) at `path`: `path` itself unless it is remote."""
    if not is_remote(path):
        return path
    return str(fetch_dir(path, weights=weights))


def fetch_dir(uri: str, weights: bool = True, root: Path | None = None) -> Path:
    """The cached local copy of the directory at `uri`, downloaded first if this node has none for its
    current listing. FileNotFoundError when nothing is there."""
    files = listing(uri, weights)
    if not files:
        raise FileNotFoundError(f"{uri}: no objects under this prefix")
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(uri, files, weights)
    dest = root / key
    if dest.is_dir():
        return dest
    with FileLock(str(root / f".{key}.lock")):
        if dest.is_dir():  # another process on this node finished it while we waited
            return dest
        _download(uri, files, root, dest)
        if listing(uri, weights) != files:  # replaced in place meanwhile (same sizes, new ETags): not this entry
            shutil.rmtree(dest, ignore_errors=True)
            raise OSError(f"{uri} changed while it was downloaded; try again")
    return dest


def _download(uri: str, files: dict[str, tuple[int, str]], root: Path, dest: Path) -> None:
    fs, base = fsspec.core.url_to_fs(uri)
    base = base.rstrip("/")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=root))
    try:
        for rel, (size, _) in files.items():
            local = tmp / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{base}/{rel}", str(local))
            if local.stat().st_size != size:
                raise OSError(
                    f"{uri}/{rel} changed while it was downloaded ({local.stat().st_size} bytes, "
                    f"listed {size}); try again"
                )
        os.chmod(tmp, 0o755)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(s for s, _ in files.values())
    # one direct line (not `print`, which Ray Train's workers echo twice; not a logger, unconfigured there)
    sys.stderr.write(f"[bco-ray] downloaded {uri} ({len(files)} files, {total / 1e6:.1f} MB) to {dest}\n")
    sys.stderr.flush()


def missing_model_files(uri: str, needed: tuple[str, ...] = ("config.json",)) -> str | None:
    """None when one of `needed` is under the remote `uri`; else why not, in a few words."""
    try:
        fs, root = fsspec.core.url_to_fs(uri)
        root = root.rstrip("/")
        fs.invalidate_cache(root)
        if any(fs.exists(f"{root}/{name}") for name in needed):
            return None
        return f"there is no {' or '.join(needed)} under it"
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, bucket: reported with the field
        first = str(e).splitlines()[0][:200] if str(e) else ""
        return f"cannot read it ({type(e).__name__}: {first})"
