"""Attention that never crosses rows of a packed sequence, for any of transformers' attention back-ends.

A packed micro-batch is one sequence [1, T] of several rows back to back, `position_ids` restarting at 0 on
each row. The model's attention implementation is wrapped once (`install`) under the name
`bco_packed_<base>`: called without `bco_segments` it *is* the base implementation (padded batches, the
model's own forward, generation: same function, same mask). Called with `bco_segments` (the (start, end) of
every row, host ints computed when the pack was collated) it attends within each row only:

* flash_attention_2 / 3: the varlen kernel, from the `cu_seq_lens_q/k` and `max_length_q/k` kwargs the
  caller passes along (what transformers' own packed path computes from `position_ids`, here without the
  device→host read it needs for `max_length`);
* any other base (sdpa, eager, the family's own eager with soft-capping): the base function once per row on
  that row's slice of queries, keys and values, causal (and sliding-window where the layer has one). Exact:
  the same kernel on the same numbers as a batch of one row, and O(Σ len²) work, not O(T²).

The packed call passes a 1×1×1×1 placeholder as `attention_mask`: transformers returns a 4-D mask as is,
so it builds no [T, T] mask and runs no packed-sequence detection (which reads the device)."""

from __future__ import annotations

import sys

import torch
from torch import nn

PREFIX = "bco_packed_"
FLASH = ("flash_attention_2", "flash_attention_3")


def _base_function(base: str, module: nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":  # each family has its own eager function (Gemma2's soft-capping lives there)
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _segment_mask(n: int, window: int | None, base: str, like: torch.Tensor):
    """The causal (sliding-window) mask of one row for `base`; None where sdpa's `is_causal` is exact."""
    if base == "sdpa" and (window is None or window >= n):
        return None
    i = torch.arange(n, device=like.device)
    keep = i[None, :] <= i[:, None]
    if window is not None:
        keep = keep & (i[:, None] - i[None, :] < window)
    if base == "sdpa":
        return keep[None, None]
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    return torch.where(keep, zero, torch.finfo(like.dtype).min)[None, None]


def _make(base: str):
    def attention(module, query, key, value, attention_mask, *args, bco_segments=None, **kwargs):
        fn = _base_function(base, module)
        if bco_segments is None:
            return fn(module, query, key, value, attention_mask, *args, **kwargs)
        if base in FLASH:
            return fn(module, query, key, value, None, *args, **kwargs)
        window = kwargs.get("sliding_window")
        outs = []
        for s, e in bco_segments:
            mask = _segment_mask(e - s, window, base, query)
            o, _ = fn(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], mask, *args, **kwargs)
            outs.append(o)
        return torch.cat(outs, dim=1), None

    attention.__name__ = f"{PREFIX}{base}"
    return attention


def _register(base: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = PREFIX + base
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make(base))
        if base in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def install(model: nn.Module) -> str:
    """Wrap the model's attention implementation (idempotent); returns the base implementation's name."""
    cfg = model.config
    current = cfg._attn_implementation or "eager"
    if current.startswith(PREFIX):
        return current.removeprefix(PREFIX)
    name = _register(current)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        cfg._attn_implementation = name
    return current


def packed_kwargs(model: nn.Module, batch: dict) -> dict:
    """The decoder kwargs of a packed batch: positions, the placeholder mask, row boundaries (and the varlen
    kwargs of the flash kernels)."""
    base = install(model)
    ids = batch["input_ids"]
    kw = {
        "position_ids": batch["position_ids"],
        "bco_segments": batch["segments"],
        "attention_mask": torch.ones((1, 1, 1, 1), dtype=torch.bool, device=ids.device),
    }
    if base in FLASH:
        kw.update(
            cu_seq_lens_q=batch["cu_seq_lens"],
            cu_seq_lens_k=batch["cu_seq_lens"],
            max_length_q=batch["max_len"],
            max_length_k=batch["max_len"],
        )
    return kw
