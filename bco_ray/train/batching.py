"""The training loop's micro-batches of one epoch, padded or packed, from the whole ordered split.

Every rank reads the whole ordered split and takes rows [rank·m, (rank+1)·m) of each global batch of
world·m rows (m = micro_batch_size), so every rank's data position at a checkpoint means the same rows after a
restart. Padded: each such slice is a micro-batch (optionally re-cut by length, `length_bucketed`). Packed:
the slices of an optimizer step's `gradient_accumulation_steps` global batches are that rank's rows of the
step, packed to `micro_batch_tokens` in packs of whole micro-batches where they fit (bco_ray/data/packing.py);
all ranks' rows are known, so every rank
plans the same number of packs with no communication. Positions are counted in micro-batches of m rows in
both modes (checkpoints record the same `micro_in_epoch`)."""

from __future__ import annotations

import numpy as np
import torch

from bco_ray.data.packing import collate_packed, plan_step_groups, to_device
from bco_ray.train.step import _ragged, collate, length_bucketed
from bco_ray.train.throughput import row_work

PREFETCH = 2  # global batches Ray Data prepares ahead of the one being trained on


def _take(batches: list[dict], lo: int, hi: int) -> dict:
    """Rows [lo, hi) of each global batch, concatenated (a ragged `input_ids` column stays 1-D)."""
    return {
        k: _ragged([x for b in batches for x in b[k][lo:hi]])
        if k == "input_ids"
        else np.concatenate([b[k][lo:hi] for b in batches])
        for k in batches[0]
    }


def global_batches(shard, micro_batch_size: int, world: int):
    return shard.iter_batches(
        batch_size=micro_batch_size * world, batch_format="numpy", drop_last=True, prefetch_batches=PREFETCH
    )


def rank_batches(shard, micro_batch_size: int, rank: int, world: int):
    """This rank's rows [rank·m, (rank+1)·m) of each global batch of world·m rows (module docstring)."""
    lo, hi = rank * micro_batch_size, (rank + 1) * micro_batch_size
    for b in global_batches(shard, micro_batch_size, world):
        yield {k: v[lo:hi] for k, v in b.items()}


def padded_micro_batches(shard, t, rank: int, world: int, epoch: int, skip: int, pad_id: int, device):
    """(batch on device, row ids, micro-batches of m rows it completes, last of its step) of this rank."""
    raws = rank_batches(shard, t.micro_batch_size, rank, world)
    if t.bucket_window > 1:
        raws = length_bucketed(raws, t.bucket_window, t.seed + epoch)
    for i, raw in enumerate(raws):
        if i < skip:  # resuming mid-epoch: these were trained already
            continue
        batch = {k: v.to(device) for k, v in collate(raw, pad_id).items()}
        batch["work"] = row_work([len(s) for s in raw["input_ids"]], raw["prompt_len"])
        batch["tokens"] = batch["work"][0]
        yield batch, raw["row_id"] if "row_id" in raw else None, 1, (i + 1) % t.gradient_accumulation_steps == 0


def packed_micro_batches(
    shard, t, rank: int, world: int, skip: int, pad_id: int, device, chunk_size: int, budget: int | None = None
):
    """As `padded_micro_batches`, packed: each optimizer step's rows of this rank in packs of `budget` tokens
    (default `t.micro_batch_tokens`) holding whole micro-batches where they fit (`plan_step_groups`), as many
    packs on every rank; the last pack of a step completes its gradient_accumulation_steps units."""
    m, gas = t.micro_batch_size, t.gradient_accumulation_steps
    budget = t.micro_batch_tokens if budget is None else budget
    buf, done = [], 0
    for b in global_batches(shard, m, world):
        buf.append(b)
        if len(buf) < gas:
            continue
        step, buf = buf, []
        done += gas
        if done <= skip:  # resuming: this step was trained already
            continue
        by_rank = [_take(step, r * m, (r + 1) * m) for r in range(world)]
        packs, n_chunks, groups = plan_step_groups(
            [[len(s) for s in x["input_ids"]] for x in by_rank],
            [x["prompt_len"] for x in by_rank],
            budget,
            chunk_size,
            rank,
            m,
        )
        mine = by_rank[rank]
        batches = [_pack(mine, p, g, pad_id, m, gas, nc, device) for p, g, nc in zip(packs, groups, n_chunks)]
        for j, batch in enumerate(batches):
            first = j == 0 or groups[j - 1] != groups[j]
            if groups[j][2]:  # a micro-batch split across packs: δ absorbs it first (step.absorb_first)
                batch["delta_done"] = True
                if first:
                    batch["absorb_first"] = [x for x, g in zip(batches, groups) if g == groups[j]]
            last = j == len(batches) - 1
            yield batch, (mine["row_id"] if "row_id" in mine else None) if last else None, gas if last else 0, last


def _pack(rows: dict, idx: list, group: tuple, pad_id: int, m: int, gas: int, n_chunks: int, device) -> dict:
    """One pack on the device, its rows' micro-batch index within the group (`mb`) and the group's `n_mb`."""
    batch = to_device(collate_packed(rows, idx, pad_id, m * gas, n_chunks), device)
    batch["work"] = (batch["tokens"], batch["sum_len_sq"], batch["completion_tokens"])
    mb = np.asarray([i // m - group[0] for i in idx] or [0], dtype=np.int64)
    batch["mb"], batch["n_mb"] = torch.from_numpy(mb).to(device), group[1]
    return batch


def set_boundary(engine, batch: dict, last: bool) -> None:
    """Packed steps have a variable number of packs: tell the engine which one closes the step."""
    if "position_ids" in batch:
        engine.set_gradient_accumulation_boundary(last)


def backward(engine, batch: dict, loss: torch.Tensor) -> None:
    """Packed losses carry their own 1 / (rows in the step) weights: no division by the accumulation steps."""
    engine.backward(loss, scale_wrt_gas="position_ids" not in batch)
