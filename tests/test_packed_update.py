"""An optimizer step with packed micro-batches equals the same step without packing (1 and 2 workers).

Packed: spawned gloo ranks on CPU run the training loop's own packed path — `packed_micro_batches` over a
stand-in for the Ray Data shard (every rank reads the whole ordered split), grouped into optimizer steps, then
the loop's step function `train_step` (boundary, `micro_batch_loss` with the device δ, backward unscaled,
`engine.step()`) — on a DeepSpeed engine built from
`deepspeed_config` (ZeRO-2 on one worker, ZeRO-3 on two). The rows of each step are 3 to 150 tokens long
with a 128-token budget: several packs per step, a row longer than the budget, and on two workers a rank
with fewer packs than the other (it runs empty packs).

Not packed (the reference, one process, no DeepSpeed): trl's definition, each micro-batch of all ranks
right-padded (`collate`); δ (`RunningMean`) absorbs its rewards of all ranks before its losses (so a packed
micro-batch split across packs must get its δ first: `absorb_first`), the step's loss is the mean over its
rows, clipping to max_grad_norm, `torch.optim.AdamW`.
Parameters after two steps agree to 1e-5 (the update itself is ~2e-4)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import contextlib

import numpy as np
import pytest
import torch
from test_zero3_lockstep import init_gloo_rank, record_error, run_ranks

# Several processes (DeepSpeed ranks on gloo) or a bench run: the full suite, not `make test-fast`.
pytestmark = pytest.mark.slow

ROWS, GAS, STEPS = 4, 2, 2  # micro_batch_size, gradient_accumulation_steps, optimizer steps
BUDGET, CHUNK = 128, 16
LR, BETA, MAX_GRAD_NORM, PAD_ID = 1e-4, 0.1, 0.5, 2  # lr: see tests/test_zero3_lockstep.py (Adam and rounding)
TOL = 1e-5
STAGE = {1: 2, 2: 3}  # ZeRO stage per world size
TIMEOUT_S = 240


def _model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bco_ray.builtin import ASSETS

    cfg = Qwen2Config.from_pretrained(ASSETS / "tiny-qwen2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Qwen2ForCausalLM(cfg)


def _split(world: int) -> list[dict]:
    """The ordered split as global batches of world·ROWS rows, STEPS·GAS of them."""
    rng = np.random.default_rng(world)
    out = []
    for _ in range(STEPS * GAS):
        n = world * ROWS
        lengths = rng.integers(3, 60, size=n)
        lengths[rng.integers(0, n)] = 150  # one row longer than the budget per global batch
        if world == 2:
            lengths[ROWS:] = rng.integers(3, 12, size=ROWS)  # rank 1's rows are short: fewer packs
        ids = np.empty(n, dtype=object)
        ids[:] = [rng.integers(3, 512, size=L) for L in lengths]
        plen = np.array([rng.integers(1, max(2, L // 2)) for L in lengths])
        out.append(
            {
                "input_ids": ids,
                "prompt_len": plen,
                "label": rng.random(n) < 0.5,
                "ref_logps": (-(lengths - plen) * np.log(512) + rng.normal(0, 3, n)).astype(np.float32),
                "udm_weight": rng.uniform(0.5, 2.0, n).astype(np.float32),
                "row_id": np.arange(n),
            }
        )
    return out


class _Shard:
    """What the loop reads from `ray.train.get_dataset_shard`: the whole ordered split, in global batches."""

    def __init__(self, batches):
        self.batches = batches

    def iter_batches(self, batch_size, batch_format, drop_last, prefetch_batches=1):
        assert all(len(b["label"]) == batch_size for b in self.batches) and batch_format == "numpy"
        yield from self.batches


def _train_config(world: int):
    from bco_ray.config.schema import TrainConfig

    return TrainConfig(
        zero_stage=STAGE[world],
        micro_batch_size=ROWS,
        gradient_accumulation_steps=GAS,
        lr=LR,
        beta=BETA,
        max_grad_norm=MAX_GRAD_NORM,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        bf16=False,
        micro_batch_tokens=BUDGET,
    )


def _worker(rank: int, port: int, out_dir: str, world: int) -> None:
    try:
        import deepspeed

        from bco_ray.bco.loss import RunningMean
        from bco_ray.train.batching import optimizer_steps, packed_micro_batches
        from bco_ray.train.ds_config import deepspeed_config
        from bco_ray.train.metrics import WindowSums
        from bco_ray.train.updater import train_step

        init_gloo_rank(rank, world, port)
        t = _train_config(world)
        model = _model()
        engine, *_ = deepspeed.initialize(
            model=model,
            config=deepspeed_config(t, world, on_gpu=False),
            model_parameters=[p for p in model.parameters() if p.requires_grad],
        )
        delta, packs = RunningMean(), []
        batches = packed_micro_batches(_Shard(_split(world)), t, rank, world, 0, PAD_ID, torch.device("cpu"), CHUNK)
        for step in optimizer_steps(batches):
            packs += [b.tensors["rows"] for b in step]
            train_step(engine, step, delta, WindowSums(), BETA, CHUNK)
        with (
            deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
            if t.zero_stage == 3
            else contextlib.nullcontext()
        ):
            params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        torch.save(
            {"params": params, "packs": packs, "delta": float(delta.mean), "steps": engine.global_steps},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        engine.destroy()
        torch.distributed.destroy_process_group()
    except BaseException:
        record_error(out_dir, rank)
        raise


def _reference(world: int):
    """Same rows, the reference's definition (trl 1.13's BCOTrainer on `world` processes): micro-batch k of a step
    is every rank's k-th slice of ROWS rows, right-padded; δ (`RunningMean`) absorbs all ranks' rewards of it,
    then its losses; the step's loss is the mean over its rows, clipping to max_grad_norm, `torch.optim.AdamW`.
    Returns (parameters, initial parameters, δ)."""
    from bco_ray.bco.logprobs import policy_completion_logps
    from bco_ray.bco.loss import RunningMean, bco_losses
    from bco_ray.train.batches import collate

    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    delta, split = RunningMean(), _split(world)
    for s in range(STEPS):
        for k in range(GAS):
            rows = split[s * GAS + k]  # the k-th micro-batch of every rank, ranks in order
            b = collate({c: v for c, v in rows.items() if c != "row_id"}, PAD_ID)
            lp = policy_completion_logps(model, b.input_ids, b.attention_mask, b.prompt_len, CHUNK)
            delta.update(BETA * (lp.detach() - b.ref_logps))
            losses, _ = bco_losses(lp, b.ref_logps, b.label, b.udm_weight, BETA, delta.mean)
            (losses.sum() / (world * ROWS * GAS)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, before, float(delta.mean)


@pytest.mark.timeout(TIMEOUT_S + 60)
@pytest.mark.parametrize("world", [1, 2])
def test_packed_step_equals_padded_step(world, tmp_path):
    codes, _ = run_ranks(tmp_path, target=_worker, timeout=TIMEOUT_S, world=world, args=(world,))
    errors = {f.name: f.read_text()[-3000:] for f in tmp_path.glob("*.err")}
    assert not errors and codes == [0] * world, (errors, codes)
    runs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    ref, before, ref_delta = _reference(world)
    assert runs[0]["steps"] == STEPS
    assert len(runs[0]["packs"]) > STEPS * GAS  # more forwards than padded micro-batches: real packing
    if world == 2:
        assert [len(r["packs"]) for r in runs] == [len(runs[0]["packs"])] * 2  # lockstep
        assert 0 in runs[1]["packs"]  # rank 1 ran an empty pack
    moved = max(float((ref[n] - before[n]).abs().max()) for n in ref)
    assert moved > 10 * TOL
    for r, run in enumerate(runs):
        diff = {n: float((run["params"][n] - ref[n]).abs().max()) for n in ref}
        worst = max(diff, key=diff.get)
        print(
            f"\n[world {world}, rank {r}] rows per pack {run['packs']}: max |packed - padded| {diff[worst]:.2g} "
            f"({worst}), update up to {moved:.2g}; δ {run['delta']:.6f} vs {ref_delta:.6f}"
        )
        assert diff[worst] <= TOL, f"{worst} differs by {diff[worst]:.3g}"
        assert run["delta"] == pytest.approx(ref_delta, rel=1e-6, abs=1e-6)
