"""One BCO forward on a typed micro-batch (bco_ray/train/batches.py): policy log-probs → rewards → δ update (all
ranks) → per-row losses. Plain torch, no Ray: the same functions run in a Ray Train worker and in the unit tests."""

from __future__ import annotations

import sys

import torch

from bco_ray.bco.logprobs import packed_completion_logps, policy_completion_logps, router_aux_loss_coef
from bco_ray.bco.loss import RunningMean, bco_losses, reward_sums
from bco_ray.train.batches import Batch, PackedBatch


def is_deepspeed_engine(model) -> bool:
    """Whether `model` is a DeepSpeed engine (without importing DeepSpeed: no engine exists unless it is)."""
    engine_cls = getattr(sys.modules.get("deepspeed"), "DeepSpeedEngine", None)
    return engine_cls is not None and isinstance(model, engine_cls)


def _run_as_engine_forward(engine, fn):
    """`fn(engine.module)` run as the engine's own forward, i.e. through `engine()`.

    The log-probs call sub-modules of the model (backbone, then the LM head in chunks); called on
    `engine.module` they skip what `DeepSpeedEngine.forward` does around the model: advance ZeRO-3's
    micro-step counter and hook DeepSpeed's backward prologue onto the output. Skipped, ZeRO-3 with gradient
    accumulation silently keeps only the last micro-batch's gradient of each step
    (tests/test_engine_update.py). So for this one call the model's `forward` is `fn`, run by `engine()`."""
    module = engine.module

    def forward():
        del module.forward  # inside fn, the model's own forward is its class's again
        return fn(module)

    module.forward = forward
    try:
        return engine()
    finally:
        module.__dict__.pop("forward", None)


def bco_forward(
    model,
    batch: Batch,
    delta: RunningMean,
    beta: float,
    chunk_size: int = 1024,
    update_delta: bool = True,
    return_aux: bool = False,
):
    """(per-row losses, rewards, policy log-probs), and with return_aux a fourth value, the MoE term. `model` is a causal LM or, in training, the
    DeepSpeed engine that wraps it (pass the engine itself, not `engine.module`: the forward must run through
    it). With update_delta, δ first absorbs this micro-batch's rewards from every rank (as the reference does
    before computing the loss); a packed batch's rows each use δ after their own micro-batch, and one with
    `delta_done` uses δ as it is (`absorb_first` absorbed it).

    The MoE term is `router_aux_loss_coef × aux_loss` when the model config enables `output_router_logits` (as
    the reference trainer does), else 0: add it to the mean loss (`batch.loss`)."""
    is_packed = isinstance(batch, PackedBatch)

    def logps_of(m):
        if is_packed:
            return packed_completion_logps(m, batch.tensors, chunk_size, return_aux_loss=True)
        return policy_completion_logps(
            m, batch.input_ids, batch.attention_mask, batch.prompt_len, chunk_size, return_aux_loss=True
        )

    engine = is_deepspeed_engine(model)
    logps, aux = _run_as_engine_forward(model, logps_of) if engine else logps_of(model)
    shift = delta.mean
    if update_delta and is_packed and not batch.delta_done:
        rewards = beta * (logps - batch.ref_logps)
        shift = delta.absorb(reward_sums(rewards, batch.mb, batch.n_mb, batch.valid))[batch.mb]
    elif update_delta and not is_packed:
        shift = delta.update(beta * (logps.detach() - batch.ref_logps))
    losses, rewards = bco_losses(logps, batch.ref_logps, batch.label, batch.udm_weight, beta, shift)
    if not return_aux:
        return losses, rewards, logps
    module = model.module if engine else model
    return losses, rewards, logps, (router_aux_loss_coef(module) * aux if aux is not None else 0.0)


@torch.no_grad()
def absorb_first(model, packs: list[PackedBatch], delta: RunningMean, beta: float, chunk_size: int) -> None:
    """δ absorbs one micro-batch packed into several `packs` before any of their losses: a no-grad forward of
    each pack (on the model itself, as evaluation does: no engine micro-step, nothing to back-propagate)."""
    module = model.module if is_deepspeed_engine(model) else model
    sums = 0
    for b in packs:
        logps = packed_completion_logps(module, b.tensors, chunk_size)
        sums = sums + reward_sums(beta * (logps - b.ref_logps), torch.zeros_like(b.mb), 1, b.valid)
    delta.absorb(sums)


def micro_batch_loss(
    model, batch: Batch, delta: RunningMean, beta: float, chunk_size: int = 1024, sums=None, flops: float = 0.0
) -> torch.Tensor:
    """The loss to back-propagate for one micro-batch of a training step, δ updated first (`batch.loss`: how it is
    scaled into the step's gradient). `sums` (a `WindowSums`) accumulates the metrics on the device."""
    if isinstance(batch, PackedBatch) and batch.absorb_first:
        absorb_first(model, batch.absorb_first, delta, beta, chunk_size)
    losses, rewards, logps, aux = bco_forward(model, batch, delta, beta, chunk_size, return_aux=True)
    if sums is not None:
        tokens = batch.work[0]
        sums.add(losses, rewards, logps, batch.label, tokens, batch.computed_tokens, valid=batch.valid, flops=flops)
    return batch.loss(losses, aux)
