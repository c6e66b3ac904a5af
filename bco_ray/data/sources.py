"""Where rows come from: JSONL/JSON/Parquet files or directories (local or any fsspec URI),
a Hugging Face Hub dataset `hf:<id>[@revision][/subset][:split]`, or an in-memory `datasets.Dataset`; and
their fingerprints. Rows are read by bco_ray/data/reader.py (the driver's check) and bco_ray/precompute/read.py
(the pass), one reader for both.

Hub datasets are pinned: the revision (default: the repo's default branch) is resolved once to its commit SHA,
which is what the rows are read at and what the precompute cache key holds, so a branch that moves is never a
stale cache hit. They are read as a stream (`datasets.load_dataset(..., streaming=True)`): nothing is
downloaded whole to the driver first, whatever the dataset's size."""

from __future__ import annotations

import re
from dataclasses import dataclass

from bco_ray.data.fingerprint import fingerprint_path, hub_sha
from bco_ray.data.reader import files_of

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


def source_fingerprint(spec) -> str:
    if not isinstance(spec, str):
        return f"datasets:{getattr(spec, '_fingerprint', id(spec))}"
    if spec.startswith("hf:"):  # the resolved commit, never a branch name
        h = parse_hf(spec)
        return f"hf:{h.repo_id}@{resolved_sha(h)}/{h.subset or ''}:{h.split}"
    return ":".join(fingerprint_path(f, etags=True) for f in files_of(spec))
