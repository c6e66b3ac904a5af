"""Model loading: the default attention setting lets transformers pick what each family supports (Gemma2 has
no SDPA), and an attention setting a model refuses fails before any Ray work with one clear message."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from bco_ray.builtin import tokenizer_path
from bco_ray.config.schema import Config, ModelConfig
from bco_ray.models import ModelLoadError, check_model_loads, load_causal_lm


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    """A tiny random Gemma2 (its vocabulary fits the bundled tokenizer), saved like a hub checkpoint."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    path = tmp_path_factory.mktemp("tiny-gemma2")
    cfg = Gemma2Config(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        final_logit_softcapping=30.0,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    Gemma2ForCausalLM(cfg).save_pretrained(path)
    for f in tokenizer_path().glob("*.json"):
        shutil.copyfile(f, path / f.name)
    return str(path)


def test_default_lets_transformers_pick():
    assert ModelConfig().attn_implementation == "auto"


def test_gemma2_loads_with_the_default(gemma2_dir):
    check_model_loads(gemma2_dir)  # default "auto"
    check_model_loads(gemma2_dir, attn_implementation=None)
    check_model_loads(gemma2_dir, attn_implementation="eager")
    model = load_causal_lm(gemma2_dir, dtype=torch.float32)
    assert type(model).__name__ == "Gemma2ForCausalLM"
    assert model.config._attn_implementation == "eager"  # what Gemma2 supports on CPU


def test_gemma2_refuses_sdpa_with_one_clear_message(gemma2_dir):
    with pytest.raises(ModelLoadError) as e:
        check_model_loads(gemma2_dir, attn_implementation="sdpa")
    msg = str(e.value)
    assert "\n" not in msg
    assert gemma2_dir in msg and "model.attn_implementation='sdpa'" in msg
    assert "model.attn_implementation=auto" in msg  # the fix
    assert "scaled_dot_product_attention" in msg  # transformers' reason, first sentence only


@pytest.mark.parametrize("attn", ["bogus", "flash_attention_2"])
def test_impossible_attention_setting(gemma2_dir, attn):
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ModelLoadError, match=rf"model\.attn_implementation='{attn}'.*model\.attn_implementation=auto"):
        check_model_loads(gemma2_dir, attn_implementation=attn)


def test_not_a_causal_lm(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path
    )
    with pytest.raises(ModelLoadError, match="cannot be built as a causal language model"):
        check_model_loads(str(tmp_path))
    with pytest.raises(ModelLoadError, match="cannot read its config"):
        check_model_loads(str(tmp_path / "missing"))


def test_resolve_paths_checks_attention_before_ray(gemma2_dir, tmp_path):
    from bco_ray.job.run import ModelError, resolve_paths

    cfg = Config(output_dir=str(tmp_path))
    cfg.model.policy = gemma2_dir
    cfg.udm.enabled = False
    paths, _ = resolve_paths(cfg)  # the default: fine
    assert paths.policy == gemma2_dir
    cfg.model.attn_implementation = "sdpa"
    with pytest.raises(ModelError, match=r"^model\.policy: .*model\.attn_implementation='sdpa'"):
        resolve_paths(cfg)
