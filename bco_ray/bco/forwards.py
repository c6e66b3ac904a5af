"""The two ways to score a batch (bco_ray/bco/logprobs.py picks one per model instance): the light path
(backbone hidden states, then the chunked head of bco_ray/bco/head_logps.py) and the model's own forward
(logits over the completion span only), each with the MoE load-balancing loss when the config asks for it."""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bco_ray.bco.head_logps import (
    completion_logps,
    completion_positions,
    hf_model,
    logit_head,
    text_config,
    token_logps,
)


# ---------------------------------------------------------------- MoE auxiliary (load-balancing) loss
def router_aux_loss_enabled(model: nn.Module) -> bool:
    """True when the model config asks for the MoE load-balancing loss (`output_router_logits`), as the
    reference trainer checks (`aux_loss_enabled = model.config.output_router_logits`)."""
    cfg = text_config(model)
    return bool(getattr(cfg, "output_router_logits", False)) if cfg is not None else False


def router_aux_loss_coef(model: nn.Module) -> float:
    """The weight the reference trainer gives the MoE auxiliary loss: `router_aux_loss_coef` when the config
    enables `output_router_logits`, else 0."""
    if not router_aux_loss_enabled(model):
        return 0.0
    return float(getattr(text_config(model), "router_aux_loss_coef", 0.0) or 0.0)


def light_aux_loss(model: nn.Module, router_logits, attention_mask: torch.Tensor) -> torch.Tensor:
    """The family's own `load_balancing_loss_func`, called as its ForCausalLM forward calls it."""
    hf = hf_model(model)
    fn = getattr(sys.modules.get(type(hf).__module__), "load_balancing_loss_func", None)
    if fn is None or router_logits is None:
        raise TypeError(f"{type(hf).__name__}: no load_balancing_loss_func / router logits for the light path")
    return fn(router_logits, hf.num_experts, hf.num_experts_per_tok, attention_mask)


# ---------------------------------------------------------------- the two ways to score a batch
def light_forward(model: nn.Module, input_ids, attention_mask, want_aux: bool):
    """Backbone hidden states [B, T, H] (and the MoE aux loss when asked)."""
    kwargs = {"output_router_logits": True} if want_aux else {}
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    aux = light_aux_loss(model, getattr(out, "router_logits", None), attention_mask) if want_aux else None
    return out.last_hidden_state, aux


def light_logps(model, input_ids, attention_mask, prompt_len, chunk_size, want_aux):
    hidden, aux = light_forward(model, input_ids, attention_mask, want_aux)
    seq_len = attention_mask.sum(dim=1)
    return completion_logps(hidden, logit_head(model), input_ids, prompt_len, seq_len, chunk_size), aux


def _supports_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(hf_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def _gather_logps(logits: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, targets: torch.Tensor):
    return token_logps(logits[rows, pos], targets)


def full_logps(model, input_ids, attention_mask, prompt_len, chunk_size, want_aux):
    """The model's own forward. Its logits stay in the model's dtype and cover only the completion span
    (`logits_to_keep`, where the model takes it); the float32 log-softmax runs in checkpointed chunks."""
    seq_len = attention_mask.sum(dim=1)
    rows, pos = completion_positions(input_ids, prompt_len, seq_len)
    T = input_ids.shape[1]
    kwargs = {"output_router_logits": True} if want_aux else {}
    if _supports_logits_to_keep(model):
        first_predictor = int(pos.min()) - 1 if pos.numel() else T - 1
        kwargs["logits_to_keep"] = T - first_predictor
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    logits = out.logits
    offset = T - logits.shape[1]  # logits[:, j] belong to position offset + j
    src, targets = pos - 1 - offset, input_ids[rows, pos]
    res = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=logits.device)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    for s in range(0, rows.shape[0], chunk_size):
        args = (logits, rows[s : s + chunk_size], src[s : s + chunk_size], targets[s : s + chunk_size])
        lp = checkpoint(_gather_logps, *args, use_reentrant=False) if needs_grad else _gather_logps(*args)
        res = res.index_add(0, rows[s : s + chunk_size], lp)
    return res, (getattr(out, "aux_loss", None) if want_aux else None)
