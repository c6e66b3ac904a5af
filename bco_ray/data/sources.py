"""Where rows come from: JSONL/JSON/Parquet files or directories (local or any fsspec URI),
a Hugging Face Hub dataset `hf:<id>[@revision][/subset][:split]`, or an in-memory `datasets.Dataset`; and
their fingerprints.

Hub datasets are pinned: the revision (default: the repo's default branch) is resolved once to its commit SHA,
which is what the rows are read at and what the precompute cache key holds, so a branch that moves is never a
stale cache hit. They are read as a stream (`datasets.load_dataset(..., streaming=True)`): nothing is
downloaded whole to the driver first, whatever the dataset's size."""

from __future__ import annotations

import re
from dataclasses import dataclass

import fsspec

from bco_ray.builtin import resolve_data
from bco_ray.data.fingerprint import fingerprint_path, hub_sha

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


_HF_PART = re.compile(r"^[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class HfSpec:
    """`hf:<id>[@revision][/subset][:split]`: id `name` or `org/name`; with no revision a third path part is the
    subset (`hf:org/name/subset:split`); a revision is one name or a commit SHA (no '/')."""

    repo_id: str
    revision: str | None
    subset: str | None
    split: str


def parse_hf(spec: str) -> HfSpec:
    body, _, split = spec[3:].partition(":")
    split = split or "train"
    if "@" in body:
        repo_id, _, rest = body.partition("@")
        revision, _, subset = rest.partition("/")
    else:
        parts = body.split("/")
        repo_id, revision, subset = "/".join(parts[:2]), None, "/".join(parts[2:])
    ok = (
        0 < len(repo_id.split("/")) <= 2
        and all(_HF_PART.match(x) for x in repo_id.split("/"))
        and (revision is None or _HF_PART.match(revision))
        and (not subset or _HF_PART.match(subset))
        and _HF_PART.match(split)
        and ".." not in spec
    )
    if not ok:
        raise ValueError(
            f"data source {spec!r}: expected hf:<id>[@revision][/subset][:split], e.g. "
            "hf:org/name:train, hf:org/name@v1.0/default:test or hf:org/name/subset:train "
            "(names of letters, digits, '.', '_', '-'; no '..')"
        )
    return HfSpec(repo_id, revision or None, subset or None, split)


def resolved_sha(h: HfSpec) -> str:
    """The commit SHA `h.revision` (default branch when None) points at now."""
    sha = hub_sha(h.repo_id, h.revision, "dataset")
    if sha is None:
        raise FileNotFoundError(
            f"hf:{h.repo_id}: cannot resolve revision {h.revision or '(default branch)'} to a "
            "commit (no hub access and not in the local Hugging Face cache); check the id, "
            "HF_TOKEN for a private or gated dataset, or HF_HUB_OFFLINE"
        )
    return sha


def hf_rows(spec: str, sha: str | None = None):
    """The rows of a hub dataset at its resolved commit, as a stream (`datasets.IterableDataset`)."""
    import datasets

    h = parse_hf(spec)
    return datasets.load_dataset(h.repo_id, h.subset, split=h.split, revision=sha or resolved_sha(h), streaming=True)


def read_source(spec, ray_remote_args: dict | None = None):
    """A Ray Dataset of raw rows. JSON lines come as a `text` column (parsed by the scoring actors, so a
    row's fields keep their Python types); Parquet and Hugging Face datasets come as columns.
    ray_remote_args: the read tasks' resource asks (the pass sizes them to the cluster)."""
    import ray.data

    if not isinstance(spec, str):  # a datasets.Dataset handed over in memory
        return ray.data.from_huggingface(spec)
    if spec.startswith("hf:"):
        # Not ray.data.from_huggingface: for a hub dataset it reads the Parquet export of the *latest* revision
        # (the datasets-server API), whatever revision the stream was opened at. One streamed read task instead.
        return ray.data.read_datasource(_stream_datasource(hf_rows(spec)), ray_remote_args=ray_remote_args)
    files = files_of(spec)
    if all(f.endswith(".parquet") for f in files):
        return ray.data.read_parquet(files, ray_remote_args=ray_remote_args)
    if any(f.endswith(".parquet") for f in files):
        raise ValueError(f"data source {spec!r} mixes Parquet and JSON files; use one format per source")
    return ray.data.read_text(files, ray_remote_args=ray_remote_args)


def _stream_datasource(stream, batch_size: int = 4096):
    """A Ray Data datasource of one read task that streams a `datasets.IterableDataset` (opened at its pinned
    commit on the driver) in Arrow batches."""
    import pyarrow as pa
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    def read():
        for batch in stream.with_format("arrow").iter(batch_size=batch_size):
            yield batch if isinstance(batch, pa.Table) else pa.Table.from_pydict(batch)

    class StreamDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None  # a stream: unknown until read

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [ReadTask(read, meta, per_task_row_limit=per_task_row_limit)]

    return StreamDatasource()


def source_fingerprint(spec) -> str:
    if not isinstance(spec, str):
        return f"datasets:{getattr(spec, '_fingerprint', id(spec))}"
    if spec.startswith("hf:"):  # the resolved commit, never a branch name
        h = parse_hf(spec)
        return f"hf:{h.repo_id}@{resolved_sha(h)}/{h.subset or ''}:{h.split}"
    return ":".join(fingerprint_path(f, etags=True) for f in files_of(spec))
