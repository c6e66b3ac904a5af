"""Where rows come from: JSONL/JSON/Parquet files or directories (local or any fsspec URI),
`hf:<dataset id>[:split]`, or an in-memory `datasets.Dataset`; and their fingerprints."""
from __future__ import annotations

import fsspec

from bco_ray.builtin import resolve_data

_EXT = (".jsonl", ".json", ".parquet")


def files_of(spec: str) -> list[str]:
    """The data files a spec names (a file, or the files of a directory), as URIs/paths."""
    spec = resolve_data(spec)
    fs, path = fsspec.core.url_to_fs(spec)
    if not fs.exists(path):
        raise FileNotFoundError(f"data source {spec!r} does not exist")
    files = sorted(p for p in fs.find(path) if p.endswith(_EXT)) if fs.isdir(path) else [path]
    if not files:
        raise FileNotFoundError(f"data source {spec!r} has no .jsonl/.json/.parquet files")
    proto = spec.split("://")[0] + "://" if "://" in spec else ""
    return [proto + f if proto and not f.startswith(proto) else f for f in files]


def _hf(spec: str):
    import datasets
    name, _, split = spec[3:].partition(":")
    return datasets.load_dataset(name, split=split or "train")


def read_source(spec, ray_remote_args: dict | None = None):
    """A Ray Dataset of raw rows. JSON lines come as a `text` column (parsed by the scoring actors, so a
    row's fields keep their Python types); Parquet and Hugging Face datasets come as columns.
    ray_remote_args: the read tasks' resource asks (the pass sizes them to the cluster)."""
    import ray.data
    if not isinstance(spec, str):                     # a datasets.Dataset handed over in memory
        return ray.data.from_huggingface(spec)
    if spec.startswith("hf:"):
        return ray.data.from_huggingface(_hf(spec))
    files = files_of(spec)
    if all(f.endswith(".parquet") for f in files):
        return ray.data.read_parquet(files, ray_remote_args=ray_remote_args)
    if any(f.endswith(".parquet") for f in files):
        raise ValueError(f"data source {spec!r} mixes Parquet and JSON files; use one format per source")
    return ray.data.read_text(files, ray_remote_args=ray_remote_args)


def source_fingerprint(spec) -> str:
    from bco_ray.precompute.cache import fingerprint_path
    if not isinstance(spec, str):
        return f"datasets:{getattr(spec, '_fingerprint', id(spec))}"
    if spec.startswith("hf:"):
        return f"hf:{spec}:{_hf(spec)._fingerprint}"
    return ":".join(fingerprint_path(f) for f in files_of(spec))
