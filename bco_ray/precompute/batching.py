"""Token-budget micro-batches: sort a window of rows by length and cut it so that
rows × longest-row stays under the budget, which keeps padding low."""

from __future__ import annotations


def budget_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Indices grouped into batches with len(batch) * max(len) <= token_budget (a row longer than
    the budget gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > token_budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches
