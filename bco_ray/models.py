"""Loading models and tokenizers: one from_pretrained path for hub ids, local dirs and the builtin tiny model."""
from __future__ import annotations

import logging

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name: str, on_gpu: bool) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return DTYPES[name]


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False):
    tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        log.warning("tokenizer %s has no pad token; using %r for padding", path, tok.pad_token)
    return tok


def load_causal_lm(path: str, *, dtype: torch.dtype, revision: str | None = None,
                   attn_implementation: str | None = "sdpa", trust_remote_code: bool = False):
    return AutoModelForCausalLM.from_pretrained(
        path, revision=revision, dtype=dtype, attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code)


def load_embedder(path: str, dtype: torch.dtype):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=dtype)
    return tok, model


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, L2-normalised (sentence-transformers' MiniLM recipe)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), p=2, dim=-1)
