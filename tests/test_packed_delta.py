"""δ in packed training follows the reference's definition (trl 1.13's BCOTrainer): each micro-batch's rewards
are absorbed before that micro-batch's losses, whatever the packs. Fast tier: a plain tiny model, one process.

The training loop's own packed path (`packed_micro_batches` over a stand-in for the Ray Data shard, then
`micro_batch_loss` per pack) against the reference computed per right-padded micro-batch, at three budgets:
every micro-batch of the step in one pack, groups of micro-batches, and micro-batches split across packs
(their δ from a no-grad pass first). Per-row losses, δ, the logged loss and the step's gradient agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bco_ray.bco.logprobs import policy_completion_logps
from bco_ray.bco.loss import RunningMean, bco_losses
from bco_ray.config.schema import TrainConfig
from bco_ray.data.packing import micro_batch_groups
from bco_ray.train.batches import collate
from bco_ray.train.batching import packed_micro_batches
from bco_ray.train.forward import micro_batch_loss
from bco_ray.train.metrics import WindowSums

ROWS, GAS, STEPS, BETA, PAD, CHUNK = 4, 2, 2, 0.1, 2, 16
MB_TOKENS = 4 * 40  # the most tokens a micro-batch has (rows of 4 to 40 tokens)


def test_groups_hold_whole_micro_batches_alike_on_every_rank():
    lengths = [[10, 10, 10, 10, 10, 10, 40, 40], [5, 5, 30, 30, 5, 5, 5, 5]]  # 2 ranks, micro-batches of 2 rows
    assert micro_batch_groups(lengths, 1000, 2) == [(0, 4, False)]
    # per micro-batch, the most tokens of any rank: 20, 60, 20, 80
    assert micro_batch_groups(lengths, 100, 2) == [(0, 3, False), (3, 1, False)]
    assert micro_batch_groups(lengths, 80, 2) == [(0, 2, False), (2, 1, False), (3, 1, False)]
    assert micro_batch_groups(lengths, 60, 2) == [(0, 1, False), (1, 1, False), (2, 1, False), (3, 1, True)]
    assert micro_batch_groups(lengths, 30, 2) == [(0, 1, False), (1, 1, True), (2, 1, False), (3, 1, True)]


class _Shard:
    def __init__(self, batches):
        self.batches = batches

    def iter_batches(self, batch_size, batch_format, drop_last, prefetch_batches=1):
        yield from self.batches


def _model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bco_ray.builtin import ASSETS

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Qwen2ForCausalLM(Qwen2Config.from_pretrained(ASSETS / "tiny-qwen2"))


def _split() -> list[dict]:
    rng = np.random.default_rng(7)
    out = []
    for _ in range(STEPS * GAS):
        lengths = rng.integers(4, 40, size=ROWS)
        ids = np.empty(ROWS, dtype=object)
        ids[:] = [rng.integers(3, 512, size=L) for L in lengths]
        plen = np.array([rng.integers(1, L // 2) for L in lengths])
        out.append(
            {
                "input_ids": ids,
                "prompt_len": plen,
                "label": np.arange(ROWS) % 2 == 0,
                "ref_logps": (-(lengths - plen) * np.log(512) + rng.normal(0, 20, ROWS)).astype(np.float32),
                "udm_weight": rng.uniform(0.5, 2.0, ROWS).astype(np.float32),
            }
        )
    return out


def _reference(model, split):
    """Per step: [per-row losses in micro-batch order], δ after the step, gradient of the mean loss."""
    delta, out = RunningMean(), []
    for s in range(STEPS):
        model.zero_grad()
        losses_of_step = []
        for k in range(GAS):
            b = collate(split[s * GAS + k], PAD)
            lp = policy_completion_logps(model, b.input_ids, b.attention_mask, b.prompt_len, CHUNK)
            delta.update(BETA * (lp.detach() - b.ref_logps))
            losses, _ = bco_losses(lp, b.ref_logps, b.label, b.udm_weight, BETA, delta.mean)
            (losses.sum() / (ROWS * GAS)).backward()
            losses_of_step.append(losses.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        out.append((torch.cat(losses_of_step), float(delta.mean), grads))
    return out


def _packed(model, split, budget):
    t = TrainConfig(micro_batch_size=ROWS, gradient_accumulation_steps=GAS, micro_batch_tokens=budget)
    delta, sums, out, packs = RunningMean(), WindowSums(), [], []
    model.zero_grad()
    batches = packed_micro_batches(_Shard(split), t, 0, 1, 0, PAD, torch.device("cpu"), CHUNK)
    for batch in batches:
        packs.append(batch.tensors["rows"])
        micro_batch_loss(model, batch, delta, BETA, CHUNK, sums=sums).backward()
        if batch.closes_step:
            out.append(
                (sums.reduce()["loss"], float(delta.mean), {n: p.grad.clone() for n, p in model.named_parameters()})
            )
            sums.reset()
            model.zero_grad()
    return out, packs


@pytest.fixture(scope="module")
def reference():
    model, split = _model(), _split()
    return model, split, _reference(model, split)


# the whole step in one pack; whole micro-batches, one or two per pack; micro-batches split across packs
@pytest.mark.parametrize("budget", [GAS * MB_TOKENS, 2 * MB_TOKENS - 1, MB_TOKENS // 2])
def test_packed_loss_delta_and_gradient_follow_the_reference(reference, budget):
    model, split, ref = reference
    got, packs = _packed(model, split, budget)
    if budget == GAS * MB_TOKENS:
        assert len(packs) == STEPS
    elif budget == MB_TOKENS // 2:
        assert len(packs) > STEPS * GAS  # δ of each micro-batch from the no-grad pass first
    for (ref_losses, ref_delta, ref_grads), (loss, d, grads) in zip(ref, got, strict=True):
        assert loss == pytest.approx(float(ref_losses.mean()), abs=1e-6)
        assert d == pytest.approx(ref_delta, rel=1e-6)
        worst = max(float((grads[n] - g).abs().max()) for n, g in ref_grads.items())
        assert worst < 1e-5, worst
