"""Hugging Face Hub data specs `hf:<id>[@revision][/subset][:split]` and hub revisions in the cache key.

There is no hub access here: the hub's answer (`HfApi.repo_info(...).sha`) comes from a fake that a test can
move, like a branch receiving a commit, and `datasets.load_dataset` is replaced by a recorder. What is checked
is what bco-ray asks of them: the revision resolved to a commit once, rows read at that commit as a stream, a
cache key that changes when the branch moves and stays when it does not."""

from __future__ import annotations

import json
import types

import pytest

from bco_ray.config.schema import load_config
from bco_ray.data import fingerprint, sources
from bco_ray.precompute import cache

SHA1, SHA2 = "1" * 40, "2" * 40


@pytest.fixture
def hub(monkeypatch):
    """A fake hub: `heads[(repo_type, repo_id, revision)]` is the commit a revision points at now."""
    import huggingface_hub

    heads: dict = {}
    calls: list = []

    def repo_info(self, repo_id, revision=None, repo_type=None, **kw):
        calls.append((repo_type, repo_id, revision))
        key = (repo_type, repo_id, revision or "main")
        if key not in heads:
            raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo_id} not found")
        return types.SimpleNamespace(sha=heads[key])

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return types.SimpleNamespace(heads=heads, calls=calls)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("hf:org/name", ("org/name", None, None, "train")),
        ("hf:org/name:test", ("org/name", None, None, "test")),
        ("hf:imdb:train", ("imdb", None, None, "train")),
        ("hf:org/name/subset:validation", ("org/name", None, "subset", "validation")),
        ("hf:org/name@v1.0:train", ("org/name", "v1.0", None, "train")),
        ("hf:org/name@" + SHA1 + "/default:test", ("org/name", SHA1, "default", "test")),
    ],
)
def test_hf_spec_parses(spec, expected):
    h = sources.parse_hf(spec)
    assert (h.repo_id, h.revision, h.subset, h.split) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "hf:",
        "hf:org/../etc:train",
        "hf:org/name@:train",
        "hf:org/name@a/b/c:train",
        "hf:a/b/c/d:train",
        "hf:org/na me:train",
        "hf:org/name:tr ain",
    ],
)
def test_bad_hf_spec_names_the_form(spec):
    with pytest.raises(ValueError, match=r"hf:<id>\[@revision\]\[/subset\]\[:split\]"):
        sources.parse_hf(spec)


def test_rows_are_read_at_the_resolved_commit_as_a_stream(hub, monkeypatch):
    import datasets

    seen = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: seen.append((a, kw)) or "stream")
    hub.heads[("dataset", "org/fb", "main")] = SHA1
    assert sources.hf_rows("hf:org/fb/en:test") == "stream"
    assert seen == [(("org/fb", "en"), {"split": "test", "revision": SHA1, "streaming": True})]
    hub.heads[("dataset", "org/fb", "v2")] = SHA2
    sources.hf_rows("hf:org/fb@v2:train")
    assert seen[-1] == (("org/fb", None), {"split": "train", "revision": SHA2, "streaming": True})


def test_cache_key_follows_the_commit_not_the_branch(hub, tmp_path):
    """The data part of the key names the commit: a branch that moves is a new key, never a stale hit."""
    hub.heads[("dataset", "org/fb", "main")] = SHA1
    cfg = load_config(overrides=["--data.train=hf:org/fb:train", "--data.eval=none", "--udm.enabled=false"])
    first = sources.source_fingerprint(cfg.data.train)
    assert first == f"hf:org/fb@{SHA1}/:train" and "main" not in first
    assert sources.source_fingerprint("hf:org/fb:train") == first  # same commit: same key part
    hub.heads[("dataset", "org/fb", "main")] = SHA2  # a new commit on main
    assert sources.source_fingerprint("hf:org/fb:train") == f"hf:org/fb@{SHA2}/:train"
    assert cache.cache_key({"train": first}) != cache.cache_key({"train": sources.source_fingerprint(cfg.data.train)})
    with pytest.raises(FileNotFoundError, match="cannot resolve revision"):
        sources.source_fingerprint("hf:org/missing:train")


def test_hub_model_ids_are_fingerprinted_by_commit(hub, tmp_path, monkeypatch):
    hub.heads[("model", "org/policy", "main")] = SHA1
    hub.heads[("model", "org/policy", "v1")] = SHA2
    assert fingerprint.fingerprint_path("org/policy") == f"hub:org/policy@{SHA1}"
    assert fingerprint.fingerprint_path("org/policy", "v1") == f"hub:org/policy@{SHA2}"
    # Offline: the local Hugging Face cache's ref for the revision; unknown everywhere: id@revision as before.
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "models--org--policy" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(SHA2)
    assert fingerprint.fingerprint_path("org/policy") == f"hub:org/policy@{SHA2}"
    assert fingerprint.fingerprint_path("org/other", "dev") == "id:org/other@dev"
    assert fingerprint.fingerprint_path(str(tmp_path / "no" / "such" / "dir")).startswith("id:")  # a path, not an id


def test_a_hub_stream_is_checked_and_read_by_the_one_reader(hub, monkeypatch):
    """An hf: split is one read unit at the commit resolved once: the driver's check counts its rows (it used to
    crash on an import), and the pass's datasource (Ray's public Datasource API) is one read task that yields
    every row once, checked and unpaired, in the read's one schema."""
    import datasets

    from bco_ray.data.checks import check_source
    from bco_ray.precompute.read import rows_datasource

    rows = [{"prompt": f"p{i}", "completion": f" c{i}", "label": i % 2 == 0} for i in range(10)]
    opened = []
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda *a, **kw: opened.append(kw["revision"]) or datasets.Dataset.from_list(rows).to_iterable_dataset(),
    )
    hub.heads[("dataset", "org/fb", "main")] = SHA1
    rep = check_source("hf:org/fb:train", "error")
    assert (rep.rows, rep.labels.desirable, rep.labels.undesirable, rep.complete) == (10, 5, 5, True)
    assert rep.fingerprint == f"hf:org/fb@{SHA1}/:train" and [u.sha for u in rep.units] == [SHA1]
    hub.heads[("dataset", "org/fb", "main")] = SHA2  # the branch moves after the check: the pass reads SHA1
    tasks = rows_datasource(rep.units, "error").get_read_tasks(8)
    assert len(tasks) == 1
    out = [r for b in tasks[0]() for r in b.to_pylist()]
    assert [(json.loads(r["prompt"]), json.loads(r["completion"]), r["label"]) for r in out] == [
        (r["prompt"], r["completion"], r["label"]) for r in rows
    ]
    assert opened == [SHA1, SHA1]
