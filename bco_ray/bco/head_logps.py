"""Summed completion log-probs from a model's final hidden states, without a float32 [batch, seq, vocab] tensor:
only the positions that predict completion tokens go through the output head, in checkpointed chunks of
`chunk_size` tokens, each chunk's log-softmax computed once (`TokenLogps`). The output head is the LM head plus
the family's logit post-processing (`LogitHead`). Used by bco_ray/bco/logprobs.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from bco_ray.bco.liger import INSTALL_HINT, liger_installed, liger_runs_on, liger_token_logps

log = logging.getLogger(__name__)
LIGER_ATTR = "_bco_ray_liger_kernel"  # set in a transformers model's own __dict__ by use_liger_kernel


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


def summed_head_logps(
    lm_head,
    h: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    n_rows: int,
    chunk_size: int,
    n_chunks: int | None = None,
) -> torch.Tensor:
    """Σ log p(target) per row of the hidden states `h` [N, H] (row `rows[i]` of `n_rows`), the head run in
    checkpointed chunks of `chunk_size` states. `n_chunks`: how many chunks to run (the most any rank needs,
    known on the host for packed batches); None: agreed with the other ranks where ZeRO-3 needs it."""
    out = torch.zeros(n_rows, dtype=torch.float32, device=h.device)
    if isinstance(lm_head, LogitHead) and lm_head.liger and torch.is_grad_enabled():  # training: Liger chunks
        return out.index_add(0, rows, lm_head.liger_logps(h, targets))  # (and recomputes) the head itself
    needs_grad = torch.is_grad_enabled() and h.requires_grad
    if n_chunks is None:
        n_chunks = _chunks_in_lockstep(-(-h.shape[0] // chunk_size), lm_head, h.device)
    for start in range(0, n_chunks * chunk_size, chunk_size):  # chunks past the end are empty
        hs, ts = h[start : start + chunk_size], targets[start : start + chunk_size]
        lp = (
            checkpoint(_chunk_logps, lm_head, hs, ts, use_reentrant=False)
            if needs_grad
            else _chunk_logps(lm_head, hs, ts)
        )
        out = out.index_add(0, rows[start : start + chunk_size], lp)
    return out


def _chunks_in_lockstep(n_chunks: int, lm_head, device: torch.device) -> int:
    """Under DeepSpeed ZeRO-3 each call of the head gathers its partitioned weight: a collective every rank
    must join. Ranks with fewer completion tokens then run empty chunks, so all make the same number of
    calls (forward and recomputed backward alike). One small all-reduce per micro-batch, under ZeRO-3 only."""
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
    liger: bool = False  # score with Liger Kernel's fused linear cross-entropy (bco_ray/bco/liger.py)

    def liger_logps(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) per hidden state through Liger Kernel, with the same post-processing."""
        assert self.softcap is None, "Liger's soft-capping is not used (bco_ray/bco/liger.py)"
        scale = (self.multiply or 1.0) / (self.divide or 1.0)
        bias = getattr(self.lm_head, "bias", None)
        return liger_token_logps(self.lm_head.weight, bias, h, targets, None if scale == 1.0 else scale)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.multiply is None and self.divide is None and self.softcap is None:
            return logits  # the log-prob kernel reads the model's dtype and computes in float32
        logits = logits.float()
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return cfg


def logit_head(model: nn.Module) -> LogitHead:
    """The model's output embeddings plus the logit post-processing its config declares (known families), and
    whether this model instance scores it with Liger Kernel (`use_liger_kernel`)."""
    cfg = text_config(model)
    head = model.get_output_embeddings()

    def value(name: str, neutral: float) -> float | None:
        v = getattr(cfg, name, None) if cfg is not None else None
        return None if v is None or isinstance(v, bool) or float(v) in (neutral, 0.0) else float(v)

    softcap = value("final_logit_softcapping", 0.0)
    return LogitHead(
        head,
        multiply=value("logit_scale", 1.0),
        divide=value("logits_scaling", 1.0),
        softcap=softcap,
        # not a LoRA-wrapped head, a soft-capped one, nor one ZeRO-3 partitions (bco_ray/bco/liger.py says why)
        liger=bool(hf_model(model).__dict__.get(LIGER_ATTR))
        and type(head) is nn.Linear
        and softcap is None
        and not any(hasattr(p, "ds_id") for p in head.parameters()),
    )


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_liger_kernel(model: nn.Module, device: torch.device) -> bool:
    """Score this model instance's output head in training with Liger Kernel (bco_ray/bco/liger.py) where Triton
    runs (`liger_runs_on`); the plain path otherwise, with a warning. Returns whether it will."""
    if not liger_installed():
        raise RuntimeError(f"model.liger_kernel=true but liger-kernel is not installed: {INSTALL_HINT}")
    ok = liger_runs_on(device)
    if ok:
        log.info("model.liger_kernel: the output head's log-probs by Liger Kernel on %s", device)
    else:
        log.warning("model.liger_kernel: Triton does not run on %s; the output head uses the plain path", device)
    hf_model(model).__dict__[LIGER_ATTR] = ok
    return ok
