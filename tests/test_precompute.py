"""The precompute pass: cache keys, atomic commits, streaming through many blocks, token-budget batching."""

from __future__ import annotations

import dataclasses
import json
import random

from bco_ray.config.schema import load_config
from bco_ray.data.fingerprint import fingerprint_path
from bco_ray.models import Paths
from bco_ray.precompute.batching import budget_batches
from bco_ray.precompute.cache import Cache, cache_key
from bco_ray.precompute.pipeline import key_parts


# ------------------------------------------------------------------ token-budget batching
def padding_fraction(lengths: list[int], batches: list[list[int]]) -> tuple[int, int]:
    """(real tokens, padded tokens) when each batch is padded to its longest row."""
    return sum(lengths), sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_budget_batches_respect_budget_and_cut_padding():
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(8, 40), rng.randint(200, 512)]) for _ in range(512)]
    batches = budget_batches(lengths, token_budget=4096)
    assert sorted(i for b in batches for i in b) == list(range(512))  # every row exactly once
    assert all(len(b) * max(lengths[i] for i in b) <= 4096 for b in batches)
    real, padded = padding_fraction(lengths, batches)
    fixed = [list(range(i, min(i + 16, 512))) for i in range(0, 512, 16)]  # dataset order, 16 rows
    real2, padded2 = padding_fraction(lengths, fixed)
    assert real == real2
    waste, waste_fixed = 1 - real / padded, 1 - real2 / padded2
    assert waste < 0.1 < 0.4 < waste_fixed, (waste, waste_fixed)


def test_a_row_longer_than_the_budget_gets_its_own_batch():
    assert budget_batches([10, 5000, 10], token_budget=100) == [[0, 2], [1]]


# ------------------------------------------------------------------ cache key
def _files(tmp_path):
    model = tmp_path / "ref"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "model.safetensors").write_bytes(b"\0" * 100)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    emb = tmp_path / "emb"
    emb.mkdir()
    (emb / "model.safetensors").write_bytes(b"\1" * 10)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completion": "c", "label": True}) + "\n")
    return Paths(policy=str(model), reference=str(model), tokenizer=str(tok), embedder=str(emb), pad_id=0), data


def test_cache_key_changes_with_every_input(tmp_path):
    paths, data = _files(tmp_path)
    cfg = load_config(overrides={"data": {"train": str(data), "eval": None}})
    key = lambda c=cfg, p=paths: cache_key(key_parts(c, p))  # noqa: E731
    base = key()
    assert key() == base  # deterministic
    changed = {}

    def with_cfg(section, **kw):
        return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **kw)})

    changed["max_length"] = key(with_cfg("data", max_length=2048))
    changed["max_prompt_length"] = key(with_cfg("data", max_prompt_length=256))
    changed["seed"] = key(with_cfg("data", seed=7))
    changed["udm off"] = key(with_cfg("udm", enabled=False))
    changed["sample size"] = key(with_cfg("udm", prompt_sample_size=64))
    changed["min ratio"] = key(with_cfg("udm", min_density_ratio=0.2))
    changed["max ratio"] = key(with_cfg("udm", max_density_ratio=5.0))
    changed["dtype"] = key(with_cfg("model", dtype="bfloat16"))
    changed["padded"] = key(with_cfg("precompute", packed=False))
    padded_parts = key_parts(with_cfg("precompute", packed=False), paths)
    assert "packed" not in padded_parts and key_parts(cfg, paths)["packed"] is True  # padded: the key it always had
    (tmp_path / "ref" / "model.safetensors").write_bytes(b"\0" * 99 + b"\1")  # new reference weights
    changed["reference weights"] = key()
    (tmp_path / "ref" / "model.safetensors").write_bytes(b"\0" * 100)
    assert key() == base
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"chat_template": "y"}')  # new chat template
    changed["chat template"] = key()
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    data.write_text(data.read_text() + json.dumps({"prompt": "q", "completion": "d", "label": False}) + "\n")
    changed["dataset"] = key()
    data.write_text(json.dumps({"prompt": "p", "completion": "c", "label": True}) + "\n")
    (tmp_path / "emb" / "model.safetensors").write_bytes(b"\2" * 10)
    changed["embedding model"] = key()
    assert key(with_cfg("train", lr=1.0)) == changed["embedding model"]  # training settings: irrelevant
    for what, k in changed.items():
        assert k != base, what
    assert fingerprint_path("org/some-model", "abc") == "id:org/some-model@abc"  # hub ids: id + revision


# ------------------------------------------------------------------ atomic commit
def test_an_uncommitted_attempt_is_never_trusted(tmp_path):
    cache = Cache(str(tmp_path), "k1")
    assert cache.complete() is None
    attempt = cache.new_attempt()
    (tmp_path / "k1" / attempt / "part-0.parquet").write_bytes(b"half a file")  # the pass dies here
    assert cache.complete() is None
    again = Cache(str(tmp_path), "k1")  # the next run starts anew
    attempt2 = again.new_attempt()
    assert attempt2 != attempt
    again.write_json(f"{again.key_dir}/{attempt2}/summary.json", {"rows": 1})
    again.commit(attempt2, {"train": "t"})
    assert again.complete()["attempt"] == attempt2
    assert not list(tmp_path.glob("k1/COMPLETE.json.tmp*"))  # the marker was renamed in
    (tmp_path / "k1" / attempt2 / "summary.json").unlink()  # marker without its data
    assert again.complete() is None
    again.invalidate()
    assert not (tmp_path / "k1" / "COMPLETE.json").exists()
