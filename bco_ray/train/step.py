"""One BCO forward on a micro-batch: policy log-probs → rewards → δ update (all ranks) → per-row losses.
Plain torch, no Ray: the same function runs in a Ray Train worker and in the unit tests."""
from __future__ import annotations

import numpy as np
import torch

from bco_ray.bco.logprobs import policy_completion_logps
from bco_ray.bco.loss import RunningMean, bco_losses


def collate(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token ids of a micro-batch (columns from the precomputed Parquet) into tensors."""
    seqs = [np.asarray(s, dtype=np.int64) for s in batch["input_ids"]]
    n = max(len(s) for s in seqs)
    ids = np.full((len(seqs), n), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), n), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return {
        "input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
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


def length_bucketed(batches, window: int, seed: int):
    """Re-cut a stream of equal-size micro-batches: every `window` of them is pooled, sorted by length and
    cut again into micro-batches of the same size (whose order is then shuffled), so that rows of similar
    length are padded together. Rows per micro-batch stay fixed, so every rank still runs in lockstep."""
    rng = np.random.default_rng(seed)
    buf: list[dict] = []

    def flush():
        size = len(buf[0]["label"])
        pooled = {k: _ragged([x for b in buf for x in b[k]]) if k == "input_ids" else
                  np.concatenate([b[k] for b in buf]) for k in buf[0]}
        order = np.argsort([len(x) for x in pooled["input_ids"]], kind="stable")
        cuts = [order[i:i + size] for i in range(0, len(order), size)]
        for j in rng.permutation(len(cuts)):
            yield {k: v[cuts[j]] for k, v in pooled.items()}

    for b in batches:
        buf.append(b)
        if len(buf) == window:
            yield from flush()
            buf = []
    if buf:
        yield from flush()


def bco_forward(model, batch: dict[str, torch.Tensor], delta: RunningMean, beta: float,
                chunk_size: int = 1024, update_delta: bool = True):
    """(per-row losses, rewards, policy log-probs). With update_delta, δ first absorbs this micro-batch's
    rewards from every rank (as the reference does before computing the loss)."""
    logps = policy_completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["prompt_len"],
                                    chunk_size)
    if update_delta:
        delta.update(beta * (logps.detach() - batch["ref_logps"]))
    losses, rewards = bco_losses(logps, batch["ref_logps"], batch["label"], batch["udm_weight"], beta, delta.mean)
    return losses, rewards, logps
