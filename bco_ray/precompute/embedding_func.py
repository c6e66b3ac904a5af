"""`udm.embedding_func`: a user's embedding callable (+ its tokenizer), cloudpickled by `BCOTrainer` into its
inputs directory as `<inputs>/udm/embedding_func-<content hash>.pkl`.

Unpickling runs code. So the scoring actors load such a file only when it is what `BCOTrainer` wrote for this
run: a file (local, or an object under an s3:// inputs_dir) named `embedding_func-<16 hex>.pkl` in a `udm`
directory, whose content still hashes to that name (a file changed after it was written is refused; a remote
one is copied to a local temporary file first, and that copy is what is checked and unpickled). Anything else
is an error before any Ray work (`check_embedding_func`)."""

from __future__ import annotations

import pickle
import re
import tempfile
from pathlib import Path

import fsspec

from bco_ray.data.fingerprint import fingerprint_path
from bco_ray.errors import InputError
from bco_ray.storage import is_remote

_NAME = re.compile(r"^embedding_func-([0-9a-f]{16})\.pkl$")


class EmbeddingFuncError(InputError, ValueError):
    """udm.embedding_func names a file bco-ray will not unpickle."""


def check_embedding_func(path: str) -> Path | str:
    """The resolved path (or the URI) of a pickle `BCOTrainer` wrote, or EmbeddingFuncError naming what is
    wrong."""
    fix = (
        "; it is set by BCOTrainer(embedding_func=...), which writes <inputs_dir>/udm/embedding_func-<hash>.pkl "
        "itself (loading a pickle runs code, so bco-ray loads only that file)"
    )
    remote = is_remote(path)
    p = path.rstrip("/") if remote else Path(path.removeprefix("file://")).resolve()
    parent, _, name = str(p).rpartition("/")
    m = _NAME.match(name)
    if not m or parent.rpartition("/")[2] != "udm":
        raise EmbeddingFuncError(
            f"udm.embedding_func {path!r} is not an inputs/udm/embedding_func-<hash>.pkl file{fix}"
        )
    fs, fs_path = fsspec.core.url_to_fs(str(p))
    if not fs.isfile(fs_path):
        raise EmbeddingFuncError(f"udm.embedding_func {path!r} does not exist{fix}")
    if fingerprint_path(str(p))[:16] != m.group(1):
        raise EmbeddingFuncError(
            f"udm.embedding_func {path!r} changed after it was written (its content no "
            f"longer matches the hash in its name){fix}"
        )
    return p


def load_embedding_func(path: str) -> dict:
    """{"func", "tokenizer"} from a file `check_embedding_func` accepts (checked again where it is loaded)."""
    p = check_embedding_func(path)
    if isinstance(p, str):  # remote: check and unpickle one local copy, not the object twice
        with tempfile.TemporaryDirectory(prefix="bco-ray-udm-") as d:
            local = Path(d, "udm", p.rpartition("/")[2])
            local.parent.mkdir()
            with fsspec.open(p, "rb") as src:
                local.write_bytes(src.read())
            return load_embedding_func(str(local))
    with open(p, "rb") as f:
        obj = pickle.load(f)  # noqa: S301 - a file this run's BCOTrainer wrote, checked above
    if not isinstance(obj, dict) or not {"func", "tokenizer"} <= set(obj):
        raise EmbeddingFuncError(f"udm.embedding_func {path!r} does not hold a {{'func', 'tokenizer'}} record")
    return obj


def on_actor_device(cpu_tensor, is_parameter: bool, requires_grad: bool):
    """Unpickling a tensor of the embedding model that lived on a GPU where BCOTrainer ran: on this actor's GPU
    when it has one, else on CPU (BCOTrainer pickles such tensors through here, bco_ray/api/_embedding.py)."""
    import torch

    t = cpu_tensor.to("cuda") if torch.cuda.is_available() else cpu_tensor
    return torch.nn.Parameter(t, requires_grad=requires_grad) if is_parameter else t


def as_is(x):
    """Unpickling a DDP / DataParallel wrapper of the embedding model: the model inside it."""
    return x
