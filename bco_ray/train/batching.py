"""The training loop's micro-batches of one epoch, padded or packed, from the whole ordered split.

Every rank reads the whole ordered split and takes rows [rank·m, (rank+1)·m) of each global batch of
world·m rows (m = micro_batch_size), so every rank's data position at a checkpoint means the same rows after a
restart. Padded: each such slice is a micro-batch (optionally re-cut by length, `length_bucketed`). Packed:
the slices of an optimizer step's `gradient_accumulation_steps` global batches are that rank's rows of the
step, packed to `micro_batch_tokens` in packs of whole micro-batches where they fit (bco_ray/data/packing.py);
all ranks' rows are known, so every rank plans the same number of packs with no communication. Positions are
counted in micro-batches of m rows in both modes (checkpoints record the same `micro_in_epoch`)."""

from __future__ import annotations

import numpy as np

from bco_ray.data.packing import collate_packed, plan_step_groups, ragged
from bco_ray.train.batches import Batch, collate, packed

PREFETCH = 2  # global batches Ray Data prepares ahead of the one being trained on


def optimizer_steps(micro_batches):
    """Lists of micro-batches, one per optimizer step (each list ends with the batch that `closes_step`)."""
    step: list[Batch] = []
    for b in micro_batches:
        step.append(b)
        if b.closes_step:
            yield step
            step = []


def _take(batches: list[dict], lo: int, hi: int) -> dict:
    """Rows [lo, hi) of each global batch, concatenated (a ragged `input_ids` column stays 1-D)."""
    return {
        k: ragged([x for b in batches for x in b[k][lo:hi]])
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
    """This rank's right-padded micro-batches of an epoch on `device`, from micro-batch `skip` on."""
    raws = rank_batches(shard, t.micro_batch_size, rank, world)
    if t.bucket_window > 1:
        raws = length_bucketed(raws, t.bucket_window, t.seed + epoch)
    for i, raw in enumerate(raws):
        if i < skip:  # resuming mid-epoch: these were trained already
            continue
        yield collate(raw, pad_id, closes_step=(i + 1) % t.gradient_accumulation_steps == 0).to(device)


def packed_micro_batches(
    shard, t, rank: int, world: int, skip: int, pad_id: int, device, chunk_size: int, budget: int | None = None
):
    """As `padded_micro_batches`, packed: each optimizer step's rows of this rank in packs of `budget` tokens
    (default `t.micro_batch_tokens`) holding whole micro-batches where they fit (`plan_step_groups`), as many
    packs on every rank; the last pack of a step closes it."""
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
        yield from _packs(by_rank[rank], packs, n_chunks, groups, pad_id, m, gas, device)


def _packs(mine: dict, packs: list, n_chunks: list, groups: list, pad_id: int, m: int, gas: int, device):
    """One step's packs of this rank's rows `mine`; a micro-batch split across packs has δ absorbed first."""
    batches = []
    for j, (idx, group, nc) in enumerate(zip(packs, groups, n_chunks)):
        mb = [i // m - group[0] for i in idx] or [0]  # each row's micro-batch within the pack's group
        ids = mine["row_id"][idx] if "row_id" in mine else None
        tensors = collate_packed(mine, idx, pad_id, m * gas, nc)
        batches.append(packed(tensors, device, mb, group[1], j == len(packs) - 1, ids))
    for j, batch in enumerate(batches):
        if groups[j][2]:  # a micro-batch split across packs (forward.absorb_first)
            batch.delta_done = True
            if j == 0 or groups[j - 1] != groups[j]:
                batch.absorb_first = [x for x, g in zip(batches, groups) if g == groups[j]]
    return batches


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
            k: ragged([x for b in buf for x in b[k]]) if k == "input_ids" else np.concatenate([b[k] for b in buf])
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
