"""`udm.embedding_func`: a user's embedding callable (+ its tokenizer), cloudpickled by `BCOTrainer` into its
inputs directory as `<inputs>/udm/embedding_func-<content hash>.pkl`.

Unpickling runs code. So the scoring actors load such a file only when it is what `BCOTrainer` wrote for this
run: a local file (never an fsspec URI: shared object stores are where someone else could put one), named
`embedding_func-<16 hex>.pkl` in a `udm` directory, whose content still hashes to that name (a file changed
after it was written is refused). Anything else is an error before any Ray work (`check_embedding_func`)."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

from bco_ray.errors import InputError

_NAME = re.compile(r"^embedding_func-([0-9a-f]{16})\.pkl$")


class EmbeddingFuncError(InputError, ValueError):
    """udm.embedding_func names a file bco-ray will not unpickle."""


def check_embedding_func(path: str) -> Path:
    """The resolved path of a pickle `BCOTrainer` wrote, or EmbeddingFuncError naming what is wrong."""
    from bco_ray.data.fingerprint import fingerprint_path
    fix = ("; it is set by BCOTrainer(embedding_func=...), which writes <inputs_dir>/udm/embedding_func-<hash>.pkl "
           "itself (loading a pickle runs code, so bco-ray loads only that file)")
    if "://" in path:
        raise EmbeddingFuncError(f"udm.embedding_func {path!r} is a URI: only a local file is unpickled{fix}")
    p = Path(path).resolve()
    m = _NAME.match(p.name)
    if not m or p.parent.name != "udm":
        raise EmbeddingFuncError(f"udm.embedding_func {path!r} is not an inputs/udm/embedding_func-<hash>.pkl "
                                 f"file{fix}")
    if not p.is_file():
        raise EmbeddingFuncError(f"udm.embedding_func {path!r} does not exist{fix}")
    if fingerprint_path(str(p))[:16] != m.group(1):
        raise EmbeddingFuncError(f"udm.embedding_func {path!r} changed after it was written (its content no "
                                 f"longer matches the hash in its name){fix}")
    return p


def load_embedding_func(path: str) -> dict:
    """{"func", "tokenizer"} from a file `check_embedding_func` accepts (checked again where it is loaded)."""
    p = check_embedding_func(path)
    with open(p, "rb") as f:
        obj = pickle.load(f)      # noqa: S301 - a file this run's BCOTrainer wrote, checked above
    if not isinstance(obj, dict) or not {"func", "tokenizer"} <= set(obj):
        raise EmbeddingFuncError(f"udm.embedding_func {path!r} does not hold a {{'func', 'tokenizer'}} record")
    return obj
