"""Fast checks of the embedded default assets (bco_ray/assets, bco_ray/builtin.py)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may touch the hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import importlib.util
import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from bco_ray.builtin import (
    ASSETS,
    BUILTIN_EMBEDDER,
    BUILTIN_EVAL,
    BUILTIN_MODEL,
    BUILTIN_TRAIN,
    materialize_tiny_model,
    resolve_data,
    resolve_embedder,
    resolve_model,
    tokenizer_path,
)


def _load_gen():
    spec = importlib.util.spec_from_file_location("arith_gen", ASSETS / "arithmetic" / "gen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


GEN = _load_gen()


def _rows(split):
    with open(resolve_data(BUILTIN_TRAIN if split == "train" else BUILTIN_EVAL)) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(tokenizer_path())


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return Path(resolve_model(BUILTIN_MODEL, tmp_path_factory.mktemp("cache")))


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_special_tokens_and_size(tok):
    assert len(tok) == 512
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert tok.model_max_length == 2048 and tok.padding_side == "right"
    for t in ("<|im_start|>", "<|im_end|>"):
        assert len(tok(t, add_special_tokens=False).input_ids) == 1


def test_tokenizer_adds_no_special_tokens(tok):
    text = "What is 2 + 3?\nAnswer:"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok(text).input_ids == ids
    assert not set(ids) & set(tok.all_special_ids)


def test_tokenizer_round_trips_dataset(tok):
    for row in _rows("eval") + _rows("train")[:500]:
        for text in (row["prompt"], row["completion"], row["prompt"] + row["completion"]):
            assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    )
    assert tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_model_dir_tokenizer_matches_bundled(tok, tiny_model_dir):
    # transformers may pick a model-type specific tokenizer class there; it must agree.
    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(other) == len(tok)
    assert (other.bos_token_id, other.eos_token_id, other.pad_token_id) == (0, 1, 2)
    for row in _rows("eval")[:100]:
        text = row["prompt"] + row["completion"]
        assert other(text).input_ids == tok(text, add_special_tokens=False).input_ids


# ------------------------------------------------------------------ dataset
@pytest.mark.parametrize("split,n", [("train", 3000), ("eval", 400)])
def test_dataset_schema_and_labels(split, n):
    rows = _rows(split)
    assert len(rows) == n
    by_family = defaultdict(list)
    for row in rows:
        assert set(row) == {"prompt", "completion", "label"}
        assert isinstance(row["prompt"], str) and isinstance(row["completion"], str)
        assert isinstance(row["label"], bool)
        family, truth = GEN.solve(row["prompt"])  # re-derive the true result
        assert (GEN.completion_number(row["completion"]) == truth) == row["label"], row
        by_family[family].append(row["label"])
    share = sum(r["label"] for r in rows) / n
    assert 0.4 < share < 0.6
    if split == "train":  # the two classes' prompt distributions differ
        rates = {f: sum(v) / len(v) for f, v in by_family.items()}
        assert max(rates.values()) > 0.7 and min(rates.values()) < 0.3, rates


def test_generator_is_reproducible(tmp_path, monkeypatch):
    monkeypatch.setattr(GEN, "HERE", tmp_path)
    GEN.main()
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (ASSETS / "arithmetic" / name).read_bytes()


def test_resolve_data_passthrough():
    assert Path(resolve_data(BUILTIN_EVAL)).is_absolute()
    assert resolve_data("data/mine.jsonl") == "data/mine.jsonl"


# -------------------------------------------------------------------- model
def test_tiny_model_deterministic_and_loadable(tmp_path, tiny_model_dir):
    again = materialize_tiny_model(tmp_path / "again", seed=0)
    a, b = load_file(tiny_model_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert materialize_tiny_model(again) == again  # complete dest is reused
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert 100_000 <= model.num_parameters() <= 5_000_000
    assert model.config.vocab_size == 512
    out = model(torch.tensor([[0, 5, 6, 7]]))
    assert out.logits.shape == (1, 4, 512)


def test_resolve_model_passthrough(tmp_path):
    assert resolve_model("Qwen/Qwen2.5-0.5B", tmp_path) == "Qwen/Qwen2.5-0.5B"
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------- embedder
def test_builtin_embedder_offline():
    path = resolve_embedder(BUILTIN_EMBEDDER)
    assert Path(path).is_dir()
    etok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    with torch.no_grad():
        hidden = model(**etok(["What is 2 + 3?"], return_tensors="pt")).last_hidden_state
    assert hidden.shape[-1] == 384
    assert resolve_embedder("some/other-model") == "some/other-model"
