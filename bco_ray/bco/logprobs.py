"""Summed completion log-probs equal to the model's own forward, without a float32 [batch, seq, vocab] tensor.

The reference computes `log_softmax(model(input_ids, attention_mask).logits)` and sums it over the completion
tokens. The light path here gives the same numbers with far less memory: the backbone runs once, then only
the positions that predict completion tokens go through the output head, in chunks of `chunk_size` tokens;
each chunk is recomputed in backward (activation checkpointing), so the peak extra memory is one chunk's
logits, whatever the batch and sequence length.

The output head is the LM head *plus the family's logit post-processing* (`LogitHead`): Gemma-style
`final_logit_softcapping`, Cohere's `logit_scale`, Granite's `logits_scaling`. Other families post-process
otherwise (Falcon-H1's `lm_head_multiplier`, vocabulary slicing, remote code, future versions), so the first call on each model instance runs a cheap probe (two short
rows) comparing the light path with the model's own forward logits (and MoE auxiliary loss); where they
differ, or the light path cannot run, that model instance is scored with its full forward instead
(`logits_to_keep` limits the logits to the completion span, and the float32 log-softmax is still chunked).

Here: the probe and the entry points (`policy_completion_logps`, `packed_completion_logps`). The chunked head
is bco_ray/bco/head_logps.py; the two forwards (and the MoE auxiliary loss) are bco_ray/bco/forwards.py.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from bco_ray.bco.forwards import (
    full_logps,
    hf_model,
    light_aux_loss,
    light_forward,
    light_logps,
    router_aux_loss_coef,  # noqa: F401 - re-exported: part of this module's API
    router_aux_loss_enabled,
)
from bco_ray.bco.head_logps import (  # noqa: F401 - completion_logps, completion_positions, token_logps: re-exported
    completion_logps,
    completion_positions,
    logit_head,
    summed_head_logps,
    token_logps,
)
from bco_ray.bco.packed_attention import packed_kwargs

log = logging.getLogger(__name__)

# Where the probe's verdict is cached: in the instance's own __dict__ (never looked up through wrappers).
_VERDICT_ATTR = "_bco_ray_light_logps_ok"
_PROBE_LEN = 8


# ---------------------------------------------------------------- the once-per-model check
@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode (no dropout, no gradient checkpointing) for the probe; every module's own flag restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _close(a: torch.Tensor, b: torch.Tensor, ref_dtype: torch.dtype) -> bool:
    """|a - b| within the rounding of the model's dtype (1e-4 in float32); b is the reference."""
    eps = torch.finfo(ref_dtype).eps if ref_dtype.is_floating_point else 0.0
    tol = 1e-4 + 4 * eps * (1.0 + float(b.abs().max()))
    return a.shape == b.shape and bool(torch.isfinite(a).all()) and float((a - b).abs().max()) <= tol


def _probe_vocab(model: nn.Module) -> int:
    """How many token ids the probe may use (sizes from module attributes: valid under ZeRO-3 too)."""
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError):
        head = model.get_output_embeddings()
        return int(getattr(head, "out_features", None) or head.weight.shape[0])


def _probe(model: nn.Module, device: torch.device) -> bool:
    """Does the light path reproduce the model's own forward (log-softmax of the logits, and the MoE aux
    loss when enabled) on two short rows, one right-padded? A model with no usable forward of its own
    (a bare backbone + head) is scored with the light path."""
    vocab = _probe_vocab(model)
    ids = ((torch.arange(2 * _PROBE_LEN, device=device) * 7919 + 11) % vocab).view(2, _PROBE_LEN)
    mask = torch.ones_like(ids)
    mask[1, _PROBE_LEN // 2 + 1 :] = 0
    want_aux = router_aux_loss_enabled(model)
    name = type(hf_model(model)).__name__
    kwargs = {"output_router_logits": True} if want_aux else {}
    with torch.no_grad(), _eval_mode(model):
        try:
            full = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
            ref, ref_aux = full.logits, (getattr(full, "aux_loss", None) if want_aux else None)
        except Exception as e:  # noqa: BLE001 - nothing to compare with
            log.warning("%s: its forward failed on the log-prob probe (%s); using backbone + head", name, e)
            return True
        try:
            hidden, aux = light_forward(model, ids, mask, want_aux)
            light = logit_head(model)(hidden).float()
        except Exception as e:  # noqa: BLE001 - the light path cannot run: the full forward will
            log.warning("%s: backbone + head path failed (%s); log-probs use the model's full forward", name, e)
            return False
    keep = mask.bool()
    ok = light.shape == ref.shape and _close(light[keep].log_softmax(-1), ref[keep].float().log_softmax(-1), ref.dtype)
    if ok and want_aux:
        ok = ref_aux is not None and aux is not None and _close(aux.float(), ref_aux.float(), ref_aux.dtype)
    if not ok:
        log.warning(
            "%s: backbone + head log-probs differ from the model's own logits; using its full forward "
            "(more memory: logits over the completion span)",
            name,
        )
    return ok


def light_path_ok(model: nn.Module, device: torch.device | None = None) -> bool:
    """Whether this model instance is scored with the light path; probed on first use, then cached on it."""
    verdict = model.__dict__.get(_VERDICT_ATTR)
    if verdict is None:
        if device is None:
            device = next(iter(model.parameters())).device
        verdict = _probe(model, device)
        model.__dict__[_VERDICT_ATTR] = verdict
    return verdict


def policy_completion_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: torch.Tensor,
    chunk_size: int = 1024,
    *,
    return_aux_loss: bool = False,
):
    """Summed completion log-probs per row (float32 [B]) of a Hugging Face causal LM on a right-padded batch:
    equal to `log_softmax(model(input_ids, attention_mask).logits)` gathered at the completion tokens
    (positions prompt_len <= t < attention_mask.sum(1)) and summed.

    `model` may be a transformers model or a PEFT wrapper of one (under DeepSpeed, pass `engine.module`).
    The first call on a model instance runs a short probe (see the module docstring); its verdict is cached.

    MoE models: with `return_aux_loss=True` it returns `(logps, aux_loss)`, where `aux_loss` is the model's
    load-balancing loss from this same forward (a scalar tensor, in the graph) when the model config enables
    `output_router_logits`, else None. The reference trainer adds it to the loss, so a training step does::

        logps, aux = policy_completion_logps(model, ids, mask, prompt_len, return_aux_loss=True)
        loss = bco_losses(logps, ...)[0].mean()
        if aux is not None:
            loss = loss + router_aux_loss_coef(model) * aux
    """
    ok = light_path_ok(model, input_ids.device)
    want_aux = return_aux_loss and router_aux_loss_enabled(model)
    score = light_logps if ok else full_logps
    logps, aux = score(model, input_ids, attention_mask, prompt_len, chunk_size, want_aux)
    return (logps, aux) if return_aux_loss else logps


# ---------------------------------------------------------------- packed batches (bco_ray/data/packing.py)
def packed_completion_logps(model: nn.Module, batch: dict, chunk_size: int = 1024, *, return_aux_loss: bool = False):
    """`policy_completion_logps` of a packed batch: rows back to back in one sequence [1, T], attention within
    each row (`packed_attention`), completion positions, targets and row ids computed when it was collated.
    Nothing here reads the device: no host synchronisation (tests/test_no_host_sync.py), except inside Liger
    Kernel's head where `model.liger_kernel` turns it on (bco_ray/bco/liger.py)."""
    hf = hf_model(model)
    ok = light_path_ok(model, batch["input_ids"].device)
    want_aux = return_aux_loss and router_aux_loss_enabled(model)
    kw = packed_kwargs(hf, batch)
    if want_aux:
        kw["output_router_logits"] = True
    n_rows, src, tgt, rows = batch["prompt_len"].shape[0], batch["comp_src"], batch["comp_tgt"], batch["comp_row"]
    if ok:
        out = model.get_decoder()(input_ids=batch["input_ids"], use_cache=False, **kw)
        aux = light_aux_loss(model, getattr(out, "router_logits", None), None) if want_aux else None
        h = out.last_hidden_state[0].index_select(0, src)
        logps = summed_head_logps(logit_head(model), h, tgt, rows, n_rows, chunk_size, batch.get("n_chunks"))
    else:
        out = model(input_ids=batch["input_ids"], use_cache=False, **kw)
        aux = getattr(out, "aux_loss", None) if want_aux else None
        logits = out.logits[0].index_select(0, src)
        logps = summed_head_logps(nn.Identity(), logits, tgt, rows, n_rows, chunk_size, -(-src.shape[0] // chunk_size))
    return (logps, aux) if return_aux_loss else logps
