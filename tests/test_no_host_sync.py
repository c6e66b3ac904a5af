"""No host synchronisation inside a packed micro-batch (outside logging steps).

A dispatch mode counts every operation that makes the host wait for the device: reading a scalar
(`.item()`, `int()`, `float()`, `bool()`: `aten._local_scalar_dense` / `is_nonzero` / `equal`), `nonzero`
and boolean-mask indexing (output sizes that depend on the data), device→host copies; and, because on a CPU
run a tensor's `.tolist()`, `.numpy()`, `.cpu()` and `.item()` need no dispatch, those Tensor methods are
counted too. Inside: the training step's forward (`micro_batch_loss`: packed log-probs, δ update, BCO loss,
metric sums on the device) and backward on a tiny Qwen2 in float32, after one warm-up micro-batch (the
once-per-model light-path probe reads the device by design). The counter is shown to work: today's padded
micro-batch and the logging step's `reduce()` do trip it."""

from __future__ import annotations

import contextlib
from collections import Counter

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, Qwen2Config

from bco_ray.bco.loss import RunningMean
from bco_ray.data.packing import collate_packed, plan_step
from bco_ray.train.batches import collate, packed
from bco_ray.train.forward import micro_batch_loss
from bco_ray.train.metrics import WindowSums

from tiny_models import tiny_kwargs

aten = torch.ops.aten
SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.item.default,
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.masked_select.default,
}
TENSOR_METHODS = ("tolist", "numpy", "cpu", "item")


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self.counts[str(func)] += 1
        elif func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        ):
            self.counts["index with a boolean mask"] += 1
        elif func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            dst = kwargs.get("device") if func is aten._to_copy.default else args[0].device
            if dst is not None and torch.device(dst).type == "cpu" and src.device.type != "cpu":
                self.counts["device→host copy"] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs():
    mode = SyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in TENSOR_METHODS}

    def counted(name):
        def method(self, *a, **k):
            mode.counts[f"Tensor.{name}"] += 1
            return originals[name](self, *a, **k)

        return method

    for name in TENSOR_METHODS:
        setattr(torch.Tensor, name, counted(name))
    try:
        with mode:
            yield mode.counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _setup():
    cfg = Qwen2Config(**tiny_kwargs(128, 256, 0.02))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    rng = np.random.default_rng(0)
    lengths = [7, 60, 33, 12, 90, 25, 41, 8]
    ids = np.empty(len(lengths), dtype=object)
    ids[:] = [rng.integers(3, 128, n) for n in lengths]
    rows = {
        "input_ids": ids,
        "prompt_len": np.array([3, 20, 5, 4, 30, 10, 1, 2]),
        "label": np.arange(8) % 2 == 0,
        "ref_logps": rng.normal(-100, 5, 8).astype(np.float32),
        "udm_weight": np.ones(8, np.float32),
    }
    return model, rows, lengths


def test_a_packed_micro_batch_never_synchronises_the_host():
    model, rows, lengths = _setup()
    packs, n_chunks = plan_step([lengths], [rows["prompt_len"]], 100, 16, 0)
    cpu = torch.device("cpu")
    batches = [packed(collate_packed(rows, p, 0, 8, c), cpu, [0] * len(p), 1, False) for p, c in zip(packs, n_chunks)]
    batches.append(packed(collate_packed(rows, [], 0, 8, 1), cpu, [0], 1, True))  # an empty pack too
    assert len(batches) >= 4
    delta, sums = RunningMean(), WindowSums()
    micro_batch_loss(model, batches[0], delta, 0.1, 16, sums).backward()  # warm-up: the probe
    with count_syncs() as counts:
        for b in batches[1:]:
            micro_batch_loss(model, b, delta, 0.1, 16, sums).backward()
    assert not counts, f"host synchronisations inside packed micro-batches: {dict(counts)}"
    with count_syncs() as counts:  # a logging step reads them
        m = sums.reduce()
        float(delta.mean)
    assert counts and m["count/chosen"] + m["count/rejected"] == sum(len(p) for p in packs)
    assert np.isfinite(m["loss"]) and m["tokens"] == sum(lengths)


def test_the_counter_sees_the_padded_path_synchronise():
    model, rows, _ = _setup()
    batch = collate(rows, 0)
    delta = RunningMean()
    micro_batch_loss(model, batch, delta, 0.1, 16).backward()
    with count_syncs() as counts:
        micro_batch_loss(model, batch, delta, 0.1, 16).backward()
    assert counts["aten.nonzero.default"] >= 1  # completion positions found on the device
