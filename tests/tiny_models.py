"""The tests' one tiny transformer shape: 2 layers, width 32, 4 heads (2 KV heads), random weights from a seed.
`tiny_kwargs` gives any family's config arguments (Qwen2, Llama, Gemma2, Cohere share them), `tiny_qwen2` a model.
The builtin assets (bco_ray/assets/tiny-qwen2) are a different, larger shape: the jobs' default model."""

from __future__ import annotations

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny_kwargs(vocab_size: int, max_position_embeddings: int = 64, initializer_range: float = 0.2, **extra) -> dict:
    """Config arguments of the tiny shape (`extra` overrides or adds any of them)."""
    return {
        **SHAPE,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": initializer_range,
        **extra,
    }


def tiny_qwen2(vocab_size: int = 50, *, seed: int = 0, tie: bool = True, attn: str = "eager", **extra):
    """A tiny random Qwen2 in eval mode, its weights drawn after `torch.manual_seed(seed)`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**tiny_kwargs(vocab_size, **extra), tie_word_embeddings=tie, attn_implementation=attn)
    return Qwen2ForCausalLM(cfg).eval()
