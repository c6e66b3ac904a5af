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
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

# Where the probe's verdict is cached: in the instance's own __dict__ (never looked up through wrappers).
_VERDICT_ATTR = "_bco_ray_light_logps_ok"
_PROBE_LEN = 8


# ---------------------------------------------------------------- the light path's building blocks
class TokenLogps(torch.autograd.Function):
    """log p(target) per row of a [n, vocab] logits tile, in float32, with one pass over the tile in forward
    (`log_softmax(dtype=float32)`, then a gather) and only the row's log-sum-exp kept for backward, where the
    gradient, onehot(target) - softmax, is rebuilt from the logits in one elementwise pass (as fused
    linear-cross-entropy kernels do). The float32 [n, vocab] tile of log-probs is freed before it returns."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = targets.unsqueeze(-1)
        lp = torch.log_softmax(logits, dim=-1, dtype=torch.float32).gather(-1, t).squeeze(-1)
        lse = logits.gather(-1, t).squeeze(-1).float() - lp
        ctx.save_for_backward(logits, targets, lse)
        return lp

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        g = torch.exp(logits.float() - lse.unsqueeze(-1)).mul_(-grad.unsqueeze(-1))
        g.scatter_add_(-1, targets.unsqueeze(-1), grad.unsqueeze(-1))
        return g.to(logits.dtype), None


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[target] per row, float32 (see `TokenLogps`)."""
    return TokenLogps.apply(logits, targets)


def _chunk_logps(lm_head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return token_logps(lm_head(hidden), targets)


def completion_positions(input_ids: torch.Tensor, prompt_len: torch.Tensor, seq_len: torch.Tensor):
    """(row, pos) of every hidden state that predicts a completion token.

    The token at position t (prompt_len <= t < seq_len) is predicted by the hidden state at t-1.
    """
    t = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    mask = (t >= prompt_len.unsqueeze(1)) & (t < seq_len.unsqueeze(1)) & (t > 0)
    rows, pos = mask.nonzero(as_tuple=True)
    return rows, pos


def completion_logps(
    hidden: torch.Tensor,
    lm_head,
    input_ids: torch.Tensor,
    prompt_len: torch.Tensor,
    seq_len: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """sum_{t in [prompt_len, seq_len)} log p(input_ids[t] | input_ids[:t]) per row, float32.

    hidden: [B, T, H] final hidden states (after the final norm); lm_head: maps hidden states to logits
    (an nn.Linear, or a `LogitHead` that adds the family's post-processing).
    Padding (positions >= seq_len) never contributes.
    """
    rows, pos = completion_positions(input_ids, prompt_len, seq_len)
    h = hidden[rows, pos - 1]
    targets = input_ids[rows, pos]
    return summed_head_logps(lm_head, h, targets, rows, input_ids.shape[0], chunk_size)


def summed_head_logps(lm_head, h: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int,
                      chunk_size: int, n_chunks: int | None = None) -> torch.Tensor:
    """Σ log p(target) per row of the hidden states `h` [N, H] (row `rows[i]` of `n_rows`), the head run in
    checkpointed chunks of `chunk_size` states. `n_chunks`: how many chunks to run (the most any rank needs,
    known on the host for packed batches); None: agreed with the other ranks where ZeRO-3 needs it."""
    out = torch.zeros(n_rows, dtype=torch.float32, device=h.device)
    needs_grad = torch.is_grad_enabled() and h.requires_grad
    if n_chunks is None:
        n_chunks = _chunks_in_lockstep(-(-h.shape[0] // chunk_size), lm_head, h.device)
    for start in range(0, n_chunks * chunk_size, chunk_size):   # chunks past the end are empty
        hs, ts = h[start:start + chunk_size], targets[start:start + chunk_size]
        lp = checkpoint(_chunk_logps, lm_head, hs, ts, use_reentrant=False) if needs_grad \
            else _chunk_logps(lm_head, hs, ts)
        out = out.index_add(0, rows[start:start + chunk_size], lp)
    return out


def _chunks_in_lockstep(n_chunks: int, lm_head, device: torch.device) -> int:
    """Under DeepSpeed ZeRO-3 each call of the head gathers its partitioned weight: a collective every rank
    must join. Ranks with fewer completion tokens then run empty chunks, so all make the same number of
    calls (forward and recomputed backward alike). One small all-reduce per micro-batch, under ZeRO-3 only."""
    import torch.distributed as dist
    head = lm_head.lm_head if isinstance(lm_head, LogitHead) else lm_head
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return n_chunks
    if not any(hasattr(p, "ds_id") for p in head.parameters()):
        return n_chunks
    t = torch.tensor([n_chunks], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


@dataclass(frozen=True)
class LogitHead:
    """The LM head followed by a family's logit post-processing, in float32, in the transformers order:
    `logits * multiply` (Cohere `logit_scale`), `logits / divide` (Granite `logits_scaling`), then
    `cap * tanh(logits / cap)` (Gemma-style `final_logit_softcapping`). Post-processing runs on the float32
    logits (transformers runs it in the model's dtype: identical in float32, more accurate in bf16)."""
    lm_head: nn.Module
    multiply: float | None = None
    divide: float | None = None
    softcap: float | None = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.multiply is None and self.divide is None and self.softcap is None:
            return logits           # the log-prob kernel reads the model's dtype and computes in float32
        logits = logits.float()
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return cfg


def logit_head(model: nn.Module) -> LogitHead:
    """The model's output embeddings plus the logit post-processing its config declares (known families)."""
    cfg = _text_config(model)

    def value(name: str, neutral: float) -> float | None:
        v = getattr(cfg, name, None) if cfg is not None else None
        return None if v is None or isinstance(v, bool) or float(v) in (neutral, 0.0) else float(v)

    return LogitHead(model.get_output_embeddings(), multiply=value("logit_scale", 1.0),
                     divide=value("logits_scaling", 1.0), softcap=value("final_logit_softcapping", 0.0))


# ---------------------------------------------------------------- MoE auxiliary (load-balancing) loss
def router_aux_loss_enabled(model: nn.Module) -> bool:
    """True when the model config asks for the MoE load-balancing loss (`output_router_logits`), as the
    reference trainer checks (`aux_loss_enabled = model.config.output_router_logits`)."""
    cfg = _text_config(model)
    return bool(getattr(cfg, "output_router_logits", False)) if cfg is not None else False


def router_aux_loss_coef(model: nn.Module) -> float:
    """The weight the reference trainer gives the MoE auxiliary loss: `router_aux_loss_coef` when the config
    enables `output_router_logits`, else 0."""
    if not router_aux_loss_enabled(model):
        return 0.0
    return float(getattr(_text_config(model), "router_aux_loss_coef", 0.0) or 0.0)


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _light_aux_loss(model: nn.Module, router_logits, attention_mask: torch.Tensor) -> torch.Tensor:
    """The family's own `load_balancing_loss_func`, called as its ForCausalLM forward calls it."""
    hf = _hf_model(model)
    fn = getattr(sys.modules.get(type(hf).__module__), "load_balancing_loss_func", None)
    if fn is None or router_logits is None:
        raise TypeError(f"{type(hf).__name__}: no load_balancing_loss_func / router logits for the light path")
    return fn(router_logits, hf.num_experts, hf.num_experts_per_tok, attention_mask)


# ---------------------------------------------------------------- the two ways to score a batch
def _light_forward(model: nn.Module, input_ids, attention_mask, want_aux: bool):
    """Backbone hidden states [B, T, H] (and the MoE aux loss when asked)."""
    kwargs = {"output_router_logits": True} if want_aux else {}
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    aux = _light_aux_loss(model, getattr(out, "router_logits", None), attention_mask) if want_aux else None
    return out.last_hidden_state, aux


def _light_logps(model, input_ids, attention_mask, prompt_len, chunk_size, want_aux):
    hidden, aux = _light_forward(model, input_ids, attention_mask, want_aux)
    seq_len = attention_mask.sum(dim=1)
    return completion_logps(hidden, logit_head(model), input_ids, prompt_len, seq_len, chunk_size), aux


def _supports_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(_hf_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def _gather_logps(logits: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, targets: torch.Tensor):
    return token_logps(logits[rows, pos], targets)


def _full_logps(model, input_ids, attention_mask, prompt_len, chunk_size, want_aux):
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
    offset = T - logits.shape[1]                 # logits[:, j] belong to position offset + j
    src, targets = pos - 1 - offset, input_ids[rows, pos]
    res = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=logits.device)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    for s in range(0, rows.shape[0], chunk_size):
        args = (logits, rows[s:s + chunk_size], src[s:s + chunk_size], targets[s:s + chunk_size])
        lp = checkpoint(_gather_logps, *args, use_reentrant=False) if needs_grad else _gather_logps(*args)
        res = res.index_add(0, rows[s:s + chunk_size], lp)
    return res, (getattr(out, "aux_loss", None) if want_aux else None)


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
    mask[1, _PROBE_LEN // 2 + 1:] = 0
    want_aux = router_aux_loss_enabled(model)
    name = type(_hf_model(model)).__name__
    kwargs = {"output_router_logits": True} if want_aux else {}
    with torch.no_grad(), _eval_mode(model):
        try:
            full = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
            ref, ref_aux = full.logits, (getattr(full, "aux_loss", None) if want_aux else None)
        except Exception as e:  # noqa: BLE001 - nothing to compare with
            log.warning("%s: its forward failed on the log-prob probe (%s); using backbone + head", name, e)
            return True
        try:
            hidden, aux = _light_forward(model, ids, mask, want_aux)
            light = logit_head(model)(hidden).float()
        except Exception as e:  # noqa: BLE001 - the light path cannot run: the full forward will
            log.warning("%s: backbone + head path failed (%s); log-probs use the model's full forward", name, e)
            return False
    keep = mask.bool()
    ok = light.shape == ref.shape and _close(light[keep].log_softmax(-1), ref[keep].float().log_softmax(-1),
                                             ref.dtype)
    if ok and want_aux:
        ok = ref_aux is not None and aux is not None and _close(aux.float(), ref_aux.float(), ref_aux.dtype)
    if not ok:
        log.warning("%s: backbone + head log-probs differ from the model's own logits; using its full forward "
                    "(more memory: logits over the completion span)", name)
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


def policy_completion_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            prompt_len: torch.Tensor, chunk_size: int = 1024, *, return_aux_loss: bool = False):
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
    score = _light_logps if ok else _full_logps
    logps, aux = score(model, input_ids, attention_mask, prompt_len, chunk_size, want_aux)
    return (logps, aux) if return_aux_loss else logps


# ---------------------------------------------------------------- packed batches (bco_ray/data/packing.py)
def packed_completion_logps(model: nn.Module, batch: dict, chunk_size: int = 1024, *, return_aux_loss: bool = False):
    """`policy_completion_logps` of a packed batch: rows back to back in one sequence [1, T], attention within
    each row (`packed_attention`), completion positions, targets and row ids computed when it was collated.
    Nothing here reads the device: no host synchronisation (tests/test_no_host_sync.py)."""
    from bco_ray.bco.packed_attention import packed_kwargs
    hf = _hf_model(model)
    ok = light_path_ok(model, batch["input_ids"].device)
    want_aux = return_aux_loss and router_aux_loss_enabled(model)
    kw = packed_kwargs(hf, batch)
    if want_aux:
        kw["output_router_logits"] = True
    n_rows, src, tgt, rows = batch["prompt_len"].shape[0], batch["comp_src"], batch["comp_tgt"], batch["comp_row"]
    if ok:
        out = model.get_decoder()(input_ids=batch["input_ids"], use_cache=False, **kw)
        aux = _light_aux_loss(model, getattr(out, "router_logits", None), None) if want_aux else None
        h = out.last_hidden_state[0].index_select(0, src)
        logps = summed_head_logps(logit_head(model), h, tgt, rows, n_rows, chunk_size, batch.get("n_chunks"))
    else:
        out = model(input_ids=batch["input_ids"], use_cache=False, **kw)
        aux = getattr(out, "aux_loss", None) if want_aux else None
        logits = out.logits[0].index_select(0, src)
        logps = summed_head_logps(nn.Identity(), logits, tgt, rows, n_rows, chunk_size, -(-src.shape[0] // chunk_size))
    return (logps, aux) if return_aux_loss else logps
