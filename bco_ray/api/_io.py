"""Saving in-memory inputs (models, datasets, the UDM embedding function) where Ray workers can read them."""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import fsspec
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM

from bco_ray.api.config import BCOConfigWarning
from bco_ray.data.fingerprint import fingerprint_path
from bco_ray.remote import MARKER, local_model_dir
from bco_ray.storage import is_remote, join, local_path, resolve_output_dir, storage_root


def _is_peft_model(m) -> bool:
    return any(c.__name__ == "PeftModel" for c in type(m).__mro__)


def _cuda() -> bool:
    return torch.cuda.is_available()


def inputs_root(inputs_dir: str | os.PathLike | None, output_dir: str) -> str:
    """Where BCOTrainer saves in-memory inputs: `inputs_dir` (a local path, made absolute, or a URI such as
    s3://bucket/prefix); None: $BCO_RAY_STORAGE/inputs when that is set, else <output_dir>/inputs."""
    if inputs_dir:
        d = os.fspath(inputs_dir)
        return d.rstrip("/") if is_remote(d) else str(Path(local_path(d)).expanduser().resolve())
    root = storage_root()
    if root:
        return join(root, "inputs") if is_remote(root) else str(Path(local_path(root), "inputs").resolve())
    return str(resolve_output_dir(output_dir) / "inputs")


def _save_by_content(
    root: str | Path, name: str, write: Callable[[str], Any], suffix: str = "", directory: bool = False
) -> str:
    """`write(path)` into a temporary file (or directory) under root, then move it to
    <root>/<name>-<content hash><suffix>: saved once per content (the policy and an identical reference share
    one copy, a re-run reuses the precompute cache), and never seen half-written. A remote root (s3://...):
    written to a local temporary directory, then uploaded (`_upload`)."""
    if is_remote(str(root)):
        with tempfile.TemporaryDirectory(prefix=f"bco-ray-{name}-") as d:
            tmp = Path(d, name)
            if directory:
                tmp.mkdir()
            write(str(tmp))
            dest = join(str(root), f"{name}-{fingerprint_path(str(tmp))[:16]}{suffix}")
            _upload(tmp, dest)
        return dest
    root = Path(local_path(str(root)))
    root.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    else:
        fd, path = tempfile.mkstemp(prefix=f".{name}-", suffix=suffix, dir=root)
        os.close(fd)
        tmp = Path(path)
    try:
        write(str(tmp))
        dest = root / f"{name}-{fingerprint_path(str(tmp))[:16]}{suffix}"
        _publish(tmp, dest)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return str(dest)


def _upload(tmp: Path, dest: str) -> None:
    """A local file or directory to the object store at `dest`, unless it is complete there already (same
    content, by construction of its name). A file is one object, which S3 shows only once fully written. A
    directory has no atomic rename there: its files go first and the marker object (bco_ray.remote.MARKER)
    last, and a directory without its marker (an upload cut short) is uploaded again."""
    fs, base = fsspec.core.url_to_fs(dest)
    fs.invalidate_cache(base)
    if tmp.is_file():
        if not fs.exists(base):
            fs.put_file(str(tmp), base)
        return
    marker = f"{base}/{MARKER}"
    if fs.exists(marker):
        return
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for f in files:
        fs.put_file(str(f), f"{base}/{f.relative_to(tmp).as_posix()}")
    fs.pipe_file(marker, json.dumps({f.relative_to(tmp).as_posix(): f.stat().st_size for f in files}).encode())


def _publish(tmp: Path, dest: Path) -> None:
    """Move tmp to dest unless dest exists already (same content, by construction of its name)."""
    if dest.exists():
        return
    if tmp.is_dir():
        os.chmod(tmp, 0o755)
    else:
        os.chmod(tmp, 0o644)
    try:
        os.replace(tmp, dest)
    except OSError:
        if not dest.exists():  # lost a race to a concurrent writer of the same content, else fail
            raise


def _as_dataset(ds, split: str):
    if isinstance(ds, datasets.Dataset):
        return ds
    if isinstance(ds, datasets.DatasetDict):
        raise TypeError(f"{split}_dataset is a DatasetDict: pass one split, e.g. dataset['{split}']")
    if isinstance(ds, datasets.IterableDataset):
        return datasets.Dataset.from_list(list(ds))
    if isinstance(ds, list):
        return datasets.Dataset.from_list(ds)
    if isinstance(ds, dict):
        return datasets.Dataset.from_dict(ds)
    if type(ds).__name__ == "DataFrame":
        return datasets.Dataset.from_pandas(ds, preserve_index=False)
    raise TypeError(
        f"{split}_dataset must be a datasets.Dataset, a list of rows, a DataFrame or a data path, "
        f"got {type(ds).__name__}"
    )


def _read_parquet_dir(uri: str):
    fs, path = fsspec.core.url_to_fs(uri)
    return pq.read_table(path, filesystem=fs)


def _load_model_dir(path: str):
    path = local_model_dir(path)
    p = Path(path)
    if (p / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path)


def _lora(pc) -> dict:
    """A peft LoraConfig → bco-ray's train.lora."""
    if type(pc).__name__ != "LoraConfig":
        raise ValueError(
            f"peft_config must be a peft.LoraConfig (bco-ray trains LoRA adapters), got {type(pc).__name__}"
        )
    targets = pc.target_modules
    out: dict[str, Any] = {
        "enabled": True,
        "r": int(pc.r),
        "alpha": int(pc.lora_alpha),
        "dropout": float(pc.lora_dropout),
    }
    if isinstance(targets, str):  # trl's ModelConfig turns a one-item list into its item: "all-linear"
        if targets != "all-linear" and not targets.isidentifier():
            raise ValueError(
                f"peft_config.target_modules={targets!r}: a regex is not supported; list the modules or use 'all-linear'"
            )
        targets = [targets]
    if targets is not None:
        out["target_modules"] = sorted(targets)
    ignored = [
        k
        for k, default in (
            ("bias", "none"),
            ("modules_to_save", None),
            ("use_rslora", False),
            ("use_dora", False),
            ("layers_to_transform", None),
            ("init_lora_weights", True),
        )
        if getattr(pc, k, default) != default
    ]
    if ignored:
        warnings.warn(
            f"peft_config: {ignored} are not passed on (bco-ray's LoRA takes r, lora_alpha, lora_dropout "
            "and target_modules)",
            BCOConfigWarning,
            stacklevel=4,
        )
    return out


def _dumps_by_value(obj, cloudpickle, dump: Callable[[Any], bytes] | None = None) -> bytes:
    """cloudpickle `obj`, with the user's own modules (scripts, test files, a project not installed on the
    cluster) pickled by value, so the Ray actors need not import them. Installed packages and bco_ray stay
    references. `dump` (default cloudpickle.dumps) does the pickling."""
    installed = {
        os.path.realpath(p)
        for p in (
            sys.prefix,
            sys.base_prefix,
            sys.exec_prefix,
            *(sysconfig.get_paths().get(k) for k in ("stdlib", "purelib", "platlib")),
        )
        if p
    }
    local = []
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if not f or name == "__main__" or name.split(".")[0] in ("bco_ray", "cloudpickle"):
            continue
        real = os.path.realpath(f)
        if any(part in ("site-packages", "dist-packages") for part in Path(real).parts):
            continue
        if any(real.startswith(p + os.sep) for p in installed):
            continue
        local.append(mod)
    registered = []
    for mod in local:
        try:
            cloudpickle.register_pickle_by_value(mod)
            registered.append(mod)
        except (ValueError, TypeError):
            pass
    try:
        return (dump or cloudpickle.dumps)(obj)
    finally:
        for mod in registered:
            try:
                cloudpickle.unregister_pickle_by_value(mod)
            except (ValueError, TypeError):
                pass
