"""How bench/train.py cuts rows into optimizer steps and micro-batches (packed, the trainer's padded
`length_bucketed`, or a bench-only token budget), and the padding each layout costs (lengths only, no model)."""

from __future__ import annotations

import argparse

import numpy as np


def bucketed(lengths: list[int], window: int, budget: int, seed: int) -> list[list[int]]:
    """ours' micro-batches: token-budget batches within each window of rows, in shuffled order."""
    from bco_ray.precompute.batching import budget_batches

    out = []
    for lo in range(0, len(lengths), window):
        out += [[lo + i for i in b] for b in budget_batches(lengths[lo : lo + window], budget)]
    order = np.random.default_rng(seed).permutation(len(out))
    return [out[i] for i in order]


def step_plans(a, layout: str, lengths: list[int], labels) -> list:
    """Each optimizer step of ours: (row indices of the step, its micro-batches as row-index lists; None =
    packed by the trainer's own code at run time)."""
    if layout == "budget":
        return [(b, [b]) for b in bucketed(lengths, a.window, a.micro_batch_tokens, a.seed)]
    if layout == "packed":  # each step's rows as today's trainer takes them (the same rows per step), packed
        return [(rows, None) for rows, _ in step_plans(a, "trainer", lengths, labels)]
    from bco_ray.train.batching import length_bucketed  # today's trainer: fixed rows, re-cut by length

    mbs = a.micro_batch_size
    ids = np.empty(len(lengths), dtype=object)
    ids[:] = [np.zeros(n, dtype=np.int64) for n in lengths]
    stream = (
        {"input_ids": ids[lo : lo + mbs], "label": np.asarray(labels)[lo : lo + mbs], "idx": np.arange(lo, lo + mbs)}
        for lo in range(0, len(lengths) - mbs + 1, mbs)
    )
    micro = [d["idx"].tolist() for d in length_bucketed(stream, a.bucket_window, a.seed)]
    g = a.gradient_accumulation_steps
    return [(sum(micro[i : i + g], []), micro[i : i + g]) for i in range(0, len(micro) - g + 1, g)]


def padding_report(a, n: int = 4096) -> dict:
    """Computed ÷ real tokens of the trainer's micro-batches on two length distributions (lengths only, no
    model): rows of 512–1024 and of 50–400 tokens, packed (the default) and today's fixed-row padded
    micro-batches (`length_bucketed`, and in dataset order), at this run's micro-batch settings."""
    out = {}
    for lo, hi in ((512, 1024), (50, 400)):
        rng = np.random.default_rng(a.seed)
        lengths = rng.integers(lo, hi + 1, size=n).tolist()
        labels = (rng.random(n) < 0.5).tolist()
        b = argparse.Namespace(**{**vars(a), "micro_batch_tokens": a.micro_batch_size * hi})
        fig = {}
        for layout, window in (("packed", None), ("trainer", a.bucket_window), ("trainer", 1)):
            b.bucket_window = window or a.bucket_window
            plans = step_plans(b, layout, lengths, labels)
            real = sum(lengths[i] for p in plans for i in p[0])
            if layout == "packed":  # the trainer's packs (one rank: no empty packs)
                from bco_ray.data.packing import plan_step

                computed = sum(
                    sum(lengths[p[0][i]] for i in pack) or 2
                    for p in plans
                    for pack in plan_step(
                        [[lengths[i] for i in p[0]]],
                        [[1] * len(p[0])],
                        b.micro_batch_tokens,
                        a.chunk_size,
                        0,
                        a.micro_batch_size,
                    )[0]
                )
            else:
                computed = sum(len(m) * max(lengths[i] for i in m) for p in plans for m in p[1])
            fig["packed" if layout == "packed" else f"fixed_rows_window{window}"] = round(computed / real, 4)
        out[f"{lo}-{hi}"] = fig
        print(
            f"PADDING rows {lo}-{hi} tokens, {a.micro_batch_size} rows per micro-batch: computed/real tokens "
            + ", ".join(f"{k} {v}" for k, v in fig.items()),
            flush=True,
        )
    return out
