"""Padding-free micro-batches: the rows of an optimizer step packed back to back up to a token budget.

An optimizer step still covers a fixed number of rows on every rank (`micro_batch_size` ×
`gradient_accumulation_steps`); only how they are cut into forwards changes. Consecutive whole micro-batches
share one pack of at most `micro_batch_tokens` tokens while they fit (as the reference's δ is updated once
per micro-batch, a pack must hold whole micro-batches to know its rows' δ; `micro_batch_groups`); a
micro-batch longer than the budget is packed first-fit-decreasing into several packs (a longer row is a
pack of its own), and its δ comes from a no-grad pass over those packs first (bco_ray/train/forward.py).
Every rank runs as many packs as the rank that needs the most (the others run empty packs: one two-token
dummy row of weight 0), so ZeRO's collectives stay in lockstep. Every rank reads the
whole ordered split (bco_ray/train/loop.py), so it knows every rank's rows and plans that count — and the
most output-head chunks any rank needs per pack — on the host, with no communication.

A pack row's loss weight is 1 / (its rank's rows in the step): with the engine's mean over ranks, the
step's loss is the mean over its rows however they were packed. Everything the forward needs from the
layout (positions restarting per row, row boundaries, completion positions, targets, row ids) is computed
here, in numpy, on the data path: the forward reads nothing back from the device."""

from __future__ import annotations

import numpy as np
import torch


def pad_right(seqs, pad_id: int, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids right-padded to the longest row (or `pad_to`): (input_ids, attention_mask), int64.
    The one padding helper: the padded micro-batches, the pass's reference and embedder batches, the benches."""
    n = pad_to or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[j, : len(s)] = 1
    return ids, mask


def ragged(rows: list) -> np.ndarray:
    """The one ragged helper: a 1-D object array of per-row arrays (numpy would build a 2-D array when all rows
    have the same length)."""
    out = np.empty(len(rows), dtype=object)
    out[:] = [np.asarray(r) for r in rows]
    return out


def pack_rows(lengths, budget: int) -> list[list[int]]:
    """Indices of `lengths` in packs of total length <= budget, first fit in decreasing length order (a row
    longer than the budget gets a pack of its own). Deterministic; rows keep their order within a pack."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(lengths[i])
        j = next((j for j, r in enumerate(room) if r >= n), None)
        if j is None:
            packs.append([i])
            room.append(budget - n)
        else:
            packs[j].append(i)
            room[j] -= n
    return [sorted(p) for p in packs]


def completion_tokens(length: int, prompt_len: int) -> int:
    """Tokens a row's log-prob sums over: positions max(prompt_len, 1) .. length - 1."""
    return max(0, int(length) - max(int(prompt_len), 1))


def micro_batch_groups(lengths: list, budget: int, micro_batch_size: int) -> list[tuple[int, int, bool]]:
    """(first micro-batch, micro-batches, split) of each forward group of a step, the same on every rank:
    consecutive whole micro-batches (`micro_batch_size` rows of every rank) while the group's tokens fit the
    budget on every rank; a micro-batch whose rows exceed the budget on some rank is a group of its own,
    `split` across several packs. δ is the running mean after each whole micro-batch (bco_ray/bco/loss.py),
    so a pack that never splits a micro-batch has all it needs for its rows' δ."""
    n_mb = -(-max(len(lr) for lr in lengths) // micro_batch_size)  # the last one may be partial
    mb_tokens = [
        max(int(sum(lr[k * micro_batch_size : (k + 1) * micro_batch_size])) for lr in lengths) for k in range(n_mb)
    ]
    groups: list[list] = []
    for k, tokens in enumerate(mb_tokens):
        if tokens > budget:
            groups.append([k, 1, True, tokens])
        elif groups and not groups[-1][2] and groups[-1][3] + tokens <= budget:
            groups[-1][1] += 1
            groups[-1][3] += tokens
        else:
            groups.append([k, 1, False, tokens])
    return [(g[0], g[1], g[2]) for g in groups]


def plan_step_groups(
    lengths: list, prompt_lens: list, budget: int, chunk_size: int, rank: int, micro_batch_size: int | None = None
):
    """(this rank's packs, output-head chunks of each pack, the group (`micro_batch_groups`) of each pack).
    `lengths[r]` / `prompt_lens[r]` are rank r's rows of the step, `micro_batch_size` rows per micro-batch
    (None: the step is one micro-batch). A group that fits is one pack of all its rows; a split group is its
    rows packed first-fit-decreasing. Every rank gets the same packs per group (empty ones appended) and the
    same chunk counts."""
    m = micro_batch_size or len(lengths[0])
    per_rank: list[list] = [[] for _ in lengths]
    group_of: list[tuple[int, int, bool]] = []
    for first, n_mb, split in micro_batch_groups(lengths, budget, m) if m else []:
        lo, hi = first * m, (first + n_mb) * m
        packs = [
            [[lo + i for i in p] for p in pack_rows(lr[lo:hi], budget)]
            if split
            else [list(range(lo, min(hi, len(lr))))]
            for lr in lengths
        ]
        n = max(len(p) for p in packs)
        for r, p in enumerate(packs):
            per_rank[r].extend(p + [[] for _ in range(n - len(p))])
        group_of.extend([(first, n_mb, split)] * n)

    def chunks(r, pack):
        c = sum(completion_tokens(lengths[r][i], prompt_lens[r][i]) for i in pack) if pack else 1
        return -(-c // chunk_size)

    n_chunks = [max(chunks(r, per_rank[r][j]) for r in range(len(lengths))) for j in range(len(group_of))]
    return per_rank[rank], n_chunks, group_of


def plan_step(lengths: list, prompt_lens: list, budget: int, chunk_size: int, rank: int, micro_batch_size=None):
    """(this rank's packs, output-head chunks of each pack): `plan_step_groups` without the groups."""
    packs, n_chunks, _ = plan_step_groups(lengths, prompt_lens, budget, chunk_size, rank, micro_batch_size)
    return packs, n_chunks


def collate_packed(rows: dict, idx: list[int], pad_id: int, rows_in_step: int, n_chunks: int | None = None) -> dict:
    """The packed micro-batch of rows `idx` of `rows` (numpy columns of this rank's step rows).

    Tensors: input_ids / position_ids [1, T], cu_seq_lens [R+1] (int32), comp_src / comp_tgt / comp_row [C]
    (the hidden state predicting each completion token, the token, its row), per row prompt_len, label,
    ref_logps, udm_weight, row_weight (1 / rows_in_step; 0 for the dummy row of an empty pack) and valid.
    Host values: segments ((start, end) per row), max_len, n_chunks and the counts `tokens`, `rows`,
    `sum_len_sq`, `completion_tokens` (for throughput figures)."""
    empty = not idx
    seqs = [np.asarray(rows["input_ids"][i], dtype=np.int64) for i in idx] or [np.full(2, pad_id, np.int64)]
    plen = np.asarray([rows["prompt_len"][i] for i in idx] or [1], dtype=np.int64)
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    ids = np.concatenate(seqs)
    pos = np.concatenate([np.arange(n) for n in lens])
    first = np.maximum(plen, 1)
    comp_row = np.concatenate([np.full(max(0, n - f), r) for r, (n, f) in enumerate(zip(lens, first))]).astype(np.int64)
    comp_t = np.concatenate([np.arange(f, n) for n, f in zip(lens, first)]).astype(np.int64)  # row-local position
    comp_abs = starts[comp_row] + comp_t
    weight = 0.0 if empty else 1.0 / rows_in_step
    out = {
        "input_ids": torch.from_numpy(ids[None]),
        "position_ids": torch.from_numpy(pos[None]),
        "cu_seq_lens": torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)),
        "comp_src": torch.from_numpy(comp_abs - 1),
        "comp_tgt": torch.from_numpy(ids[comp_abs]),
        "comp_row": torch.from_numpy(comp_row),
        "prompt_len": torch.from_numpy(plen),
        "row_weight": torch.full((len(seqs),), weight, dtype=torch.float32),
        "valid": torch.full((len(seqs),), 0.0 if empty else 1.0, dtype=torch.float32),
    }
    for k, dtype in (("label", bool), ("ref_logps", np.float32), ("udm_weight", np.float32)):
        if k in rows:  # training columns (the reference pass packs input_ids and prompt_len only)
            v = np.zeros(1, dtype=dtype) if empty else np.asarray([rows[k][i] for i in idx], dtype=dtype)
            out[k] = torch.as_tensor(v)
    out.update(
        segments=tuple((int(s), int(s + n)) for s, n in zip(starts, lens)),
        max_len=int(lens.max()),
        n_chunks=n_chunks,
        aux_weight=0.0 if empty else len(seqs) / rows_in_step,
        tokens=0 if empty else int(lens.sum()),
        rows=0 if empty else len(seqs),
        sum_len_sq=0 if empty else int((lens**2).sum()),
        completion_tokens=0 if empty else len(comp_row),
    )
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to `device` (pinned and copied non_blocking on a GPU); host values as they are."""
    cuda = device.type == "cuda"

    def move(v):
        if not isinstance(v, torch.Tensor):
            return v
        return v.pin_memory().to(device, non_blocking=True) if cuda else v.to(device)

    return {k: move(v) for k, v in batch.items()}
