"""Evaluation on the eval split: no δ update, metrics from all ranks (loss, rewards, accuracy, ROC AUC)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from bco_ray.train.batches import collate
from bco_ray.train.forward import bco_forward
from bco_ray.train.metrics import WindowSums


def read_batches(eval_shard, batch_size: int) -> list[dict]:
    """The eval split is small and scored at every eval: the recipe reads its shard once, into memory."""
    return list(eval_shard.iter_batches(batch_size=batch_size, batch_format="numpy"))


def table_batches(table, batch_size: int) -> list[dict]:
    """The same batches from an in-memory pyarrow Table of precomputed rows (`BCOTrainer.evaluate`)."""
    cols = ["input_ids", "prompt_len", "label", "ref_logps", "udm_weight"]
    return [
        {c: table.slice(i, batch_size).column(c).to_pylist() for c in cols}
        for i in range(0, table.num_rows, batch_size)
    ]


@torch.no_grad()
def evaluate(model, batches: list[dict], delta, cfg, pad_id: int, device, rank: int, world: int) -> dict[str, float]:
    """`batches`: the whole (small) eval split, on every rank (read_batches / table_batches). Each rank scores
    micro-batches j with j % world == rank. All ranks run the same number of forwards (ZeRO-3 gathers need
    every rank): a rank with no batch left repeats its last one and drops the result."""
    was_training = model.training
    model.eval()
    n_rounds = (len(batches) + world - 1) // world
    sums, margins, labels = WindowSums(device), [], []
    for r in range(n_rounds):
        j = r * world + rank
        raw = batches[min(j, len(batches) - 1)]
        batch = collate(raw, pad_id).to(device)
        losses, rewards, logps = bco_forward(
            model, batch, delta, cfg.train.beta, cfg.precompute.logp_chunk_size, update_delta=False
        )
        if j < len(batches):
            sums.add(losses, rewards, logps, batch.label, 0)
            margins.append((rewards - delta.mean).float().cpu().numpy())
            labels.append(batch.label.cpu().numpy())
    if was_training:
        model.train()
    m = sums.reduce()
    local = (np.concatenate(margins) if margins else np.zeros(0), np.concatenate(labels) if labels else np.zeros(0))
    gathered = [local]
    if dist.is_available() and dist.is_initialized() and world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
    z = np.concatenate([g[0] for g in gathered])
    y = np.concatenate([g[1] for g in gathered]).astype(bool)
    out = {f"eval/{k}": v for k, v in m.items() if k not in ("tokens", "flops")}
    out["eval/accuracy"] = float(((z > 0) == y).mean()) if len(y) else float("nan")
    from sklearn.metrics import roc_auc_score  # here: the workers that never evaluate skip its ~1 s import

    out["eval/auc"] = float(roc_auc_score(y, z)) if 0 < y.sum() < len(y) else float("nan")
    return out
