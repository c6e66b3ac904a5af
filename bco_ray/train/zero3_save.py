"""The full state dict of a ZeRO-3 model on rank 0 only, gathered one module's own parameters at a time.

This is what DeepSpeed's `engine.save_16bit_model` does (`_zero3_consolidated_16bit_state_dict`), from the
module alone and without writing a torch pickle: every rank joins each gather (a collective), rank 0 copies
the layer to CPU, and the layer is partitioned again before the next one. No rank ever holds the whole
model on its device; rank 0 holds it once, in CPU memory, to write the safetensors file."""

from __future__ import annotations

import deepspeed
import torch


def consolidated_state_dict(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """`model.state_dict()` with ZeRO-3 partitions gathered, on rank 0; None on the other ranks. Must be
    called on every rank. Shared (tied) parameters stay one tensor under each of their names."""
    state: dict[str, torch.Tensor] | None = {} if rank == 0 else None
    first_key: dict[int, str] = {}

    def visit(module: torch.nn.Module, prefix: str) -> None:
        params = list(module.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if state is not None:
                for name, p in module.named_parameters(recurse=False):
                    pid = getattr(p, "ds_id", id(p))
                    if pid in first_key:
                        state[prefix + name] = state[first_key[pid]]
                    else:
                        state[prefix + name] = p.detach().cpu().clone()
                        first_key[pid] = prefix + name
                for name, b in module.named_buffers(recurse=False):
                    if b is not None and name not in module._non_persistent_buffers_set:
                        state[prefix + name] = b.detach().cpu().clone()
        for name, child in module.named_children():
            visit(child, prefix + name + ".")

    visit(model, "")
    return state
