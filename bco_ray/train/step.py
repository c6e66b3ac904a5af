"""One BCO forward on a micro-batch: policy log-probs → rewards → δ update (all ranks) → per-row losses.
Plain torch, no Ray: the same function runs in a Ray Train worker and in the unit tests."""

from __future__ import annotations

import sys

import numpy as np
import torch

from bco_ray.bco.logprobs import packed_completion_logps, policy_completion_logps, router_aux_loss_coef
from bco_ray.bco.loss import RunningMean, bco_losses
from bco_ray.data.packing import is_packed, pad_right
from bco_ray.train.device_stats import reward_sums


def collate(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token ids of a micro-batch (columns from the precomputed Parquet) into tensors."""
    ids, mask = pad_right([np.asarray(s, dtype=np.int64) for s in batch["input_ids"]], pad_id)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "prompt_len": torch.as_tensor(np.asarray(batch["prompt_len"], dtype=np.int64)),
        "label": torch.as_tensor(np.asarray(batch["label"], dtype=bool)),
        "ref_logps": torch.as_tensor(np.asarray(batch["ref_logps"], dtype=np.float32)),
        "udm_weight": torch.as_tensor(np.asarray(batch["udm_weight"], dtype=np.float32)),
    }


def _ragged(rows: list) -> np.ndarray:
    """A 1-D object array of per-row arrays (numpy would build a 2-D array when all rows are equal)."""
    out = np.empty(len(rows), dtype=object)
    out[:] = [np.asarray(r) for r in rows]
    return out


def _stratified_cuts(lengths: np.ndarray, labels: np.ndarray, size: int) -> list[np.ndarray]:
    """Row indices of the micro-batches a window is re-cut into, each with its share of both labels.

    Each label's rows are sorted by length on their own; micro-batch j (of `size` rows, the last one
    possibly fewer) takes the j-th slice of the desirable rows and the j-th slice of the undesirable ones,
    the slices being the window's desirable / undesirable proportion of its rows (rounded so that the two
    add up to its size). Rows of similar length *ranks* within their label are padded together, and a
    micro-batch is single-label only where the window has fewer rows of a label than micro-batches."""
    n = len(lengths)
    ends = np.minimum(np.arange(size, n + size, size), n)  # cumulative rows at each micro-batch's end
    bounds = np.concatenate([[0], ends])
    desirable = np.flatnonzero(labels)
    d_bounds = len(desirable) * bounds // n  # desirable rows dealt up to each cut
    parts = [(desirable, d_bounds), (np.flatnonzero(~labels), bounds - d_bounds)]
    sorted_parts = [(rows[np.argsort(lengths[rows], kind="stable")], b) for rows, b in parts]
    return [np.concatenate([rows[b[j] : b[j + 1]] for rows, b in sorted_parts]) for j in range(len(ends))]


def length_bucketed(batches, window: int, seed: int):
    """Re-cut a stream of equal-size micro-batches to cut padding: every `window` of them (the last window
    may be partial) is pooled and cut again into as many micro-batches of the same size, of rows of similar
    length, whose order is then shuffled with `seed`. Each keeps the window's label mix (see
    `_stratified_cuts`): sorting the pool by length alone would give one-label micro-batches whenever
    completion length follows the label. Rows per micro-batch stay fixed, so every rank still runs in
    lockstep, and every row of the window comes out exactly once."""
    rng = np.random.default_rng(seed)
    buf: list[dict] = []

    def flush():
        size = len(buf[0]["label"])
        pooled = {
            k: _ragged([x for b in buf for x in b[k]]) if k == "input_ids" else np.concatenate([b[k] for b in buf])
            for k in buf[0]
        }
        lengths = np.array([len(x) for x in pooled["input_ids"]])
        cuts = _stratified_cuts(lengths, np.asarray(pooled["label"]).astype(bool), size)
        for j in rng.permutation(len(cuts)):
            yield {k: v[cuts[j]] for k, v in pooled.items()}

    for b in batches:
        buf.append(b)
        if len(buf) == window:
            yield from flush()
            buf = []
    if buf:
        yield from flush()


def _is_deepspeed_engine(model) -> bool:
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
    batch: dict[str, torch.Tensor],
    delta: RunningMean,
    beta: float,
    chunk_size: int = 1024,
    update_delta: bool = True,
    return_aux: bool = False,
):
    """(per-row losses, rewards, policy log-probs). `model` is a causal LM or, in training, the DeepSpeed
    engine that wraps it (pass the engine itself, not `engine.module`: the forward must run through it).
    With update_delta, δ first absorbs this micro-batch's rewards from every rank (as the reference does
    before computing the loss).

    `batch` is a right-padded batch (`collate`) or a packed one (`bco_ray.data.packing.collate_packed`);
    a packed batch needs a `DeviceRunningMean` δ (an empty pack's dummy row does not count). A packed
    batch holds whole micro-batches (`mb`: each row's index among its `n_mb`; none: the pack is one), and
    each row's loss uses δ after its own micro-batch; `delta_done`: δ absorbed this pack's rows already
    (`absorb_first`), use it as it is.

    With return_aux, a fourth value: the MoE load-balancing term to add to the mean loss,
    `router_aux_loss_coef × aux_loss` when the model config enables `output_router_logits` (as the reference
    trainer does), else 0."""
    packed = is_packed(batch)

    def logps_of(m):
        if packed:
            return packed_completion_logps(m, batch, chunk_size, return_aux_loss=True)
        return policy_completion_logps(
            m, batch["input_ids"], batch["attention_mask"], batch["prompt_len"], chunk_size, return_aux_loss=True
        )

    engine = _is_deepspeed_engine(model)
    logps, aux = _run_as_engine_forward(model, logps_of) if engine else logps_of(model)
    shift = delta.mean
    if update_delta and packed and not batch.get("delta_done"):
        mb = batch.get("mb", torch.zeros_like(batch["valid"], dtype=torch.long))
        shift = delta.absorb(reward_sums(beta * (logps - batch["ref_logps"]), mb, batch.get("n_mb", 1), batch["valid"]))
        shift = shift[mb]
    elif update_delta and not packed:
        delta.update(beta * (logps.detach() - batch["ref_logps"]))
        shift = delta.mean
    losses, rewards = bco_losses(logps, batch["ref_logps"], batch["label"], batch["udm_weight"], beta, shift)
    if not return_aux:
        return losses, rewards, logps
    module = model.module if engine else model
    return losses, rewards, logps, (router_aux_loss_coef(module) * aux if aux is not None else 0.0)


@torch.no_grad()
def absorb_first(model, batches: list[dict], delta, beta: float, chunk_size: int) -> None:
    """δ absorbs one micro-batch packed into several `batches` before any of their losses: a no-grad forward of
    each pack (on the model itself, as evaluation does: no engine micro-step, nothing to back-propagate)."""
    module = model.module if _is_deepspeed_engine(model) else model
    sums = 0
    for b in batches:
        logps = packed_completion_logps(module, b, chunk_size)
        sums = sums + reward_sums(beta * (logps - b["ref_logps"]), torch.zeros_like(b["mb"]), 1, b["valid"])
    delta.absorb(sums)


def micro_batch_loss(
    model, batch: dict, delta, beta: float, chunk_size: int = 1024, sums=None, flops: float = 0.0
) -> torch.Tensor:
    """The loss to back-propagate for one micro-batch of a training step, δ updated first.

    Packed: Σ row_weight · loss (row_weight = 1 / this rank's rows in the step, so the step's gradient is the
    mean over its rows however they were packed; back-propagate it unscaled, `engine.backward(loss,
    scale_wrt_gas=False)`) plus the MoE term weighted by the pack's share of the step's rows. Padded: the
    micro-batch's mean loss plus the MoE term, as before (the engine divides by the accumulation steps).
    `sums` (a `DeviceWindowSums`) accumulates the metrics on the device. The first pack of a micro-batch
    split across packs carries them all (`absorb_first`): δ absorbs the micro-batch before its first loss."""
    if "absorb_first" in batch:
        absorb_first(model, batch["absorb_first"], delta, beta, chunk_size)
    losses, rewards, logps, aux = bco_forward(model, batch, delta, beta, chunk_size, return_aux=True)
    if is_packed(batch):
        loss = (losses * batch["row_weight"]).sum() + aux * batch["aux_weight"]
        tokens, computed, valid = batch["tokens"], batch["input_ids"].shape[1], batch["valid"]
    else:
        loss = losses.mean() + aux
        tokens, computed, valid = batch.get("tokens", 0), batch["attention_mask"].numel(), None
    if sums is not None:
        sums.add(losses, rewards, logps, batch["label"], tokens, computed, valid=valid, flops=flops)
    return loss
