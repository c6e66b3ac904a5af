"""The policy update: `PolicyUpdater` owns the DeepSpeed engine, δ, the logging window's metric sums and the LR
schedule, and takes one optimizer step's typed micro-batches at a time (`update`); `train_step` is the step
itself. Its clients: the offline epoch loop (bco_ray/train/recipe.py) and any loop that builds its own batches."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import ray.train
import torch

from bco_ray.bco.loss import RunningMean
from bco_ray.config.schema import TrainConfig
from bco_ray.train import hooks
from bco_ray.train.batches import Batch, PackedBatch
from bco_ray.train.divergence import check_device
from bco_ray.train.ds_config import deepspeed_config, use_bf16
from bco_ray.train.evaluate import evaluate
from bco_ray.train.forward import micro_batch_loss
from bco_ray.train.jit_builds import init_distributed
from bco_ray.train.metrics import WindowSums
from bco_ray.train.spec import WorkerSpec
from bco_ray.train.throughput import flop_shape, peak_flops, train_flops


@dataclass(frozen=True)
class StepSchedule:
    """Steps are fixed up front from the row count, so every rank runs the same number of them."""

    micro_per_epoch: int  # micro-batches of one epoch, whole optimizer steps only
    total_steps: int
    warmup: int

    @classmethod
    def of(cls, t: TrainConfig, train_rows: int, world: int) -> StepSchedule:
        steps_per_epoch = train_rows // world // t.micro_batch_size // t.gradient_accumulation_steps
        if steps_per_epoch == 0:
            raise ValueError(
                f"{train_rows} training rows give no full optimizer step with "
                f"{world} workers × micro_batch_size {t.micro_batch_size} × gradient_accumulation_steps "
                f"{t.gradient_accumulation_steps}; lower them or add data"
            )
        total_steps = steps_per_epoch * t.num_epochs if t.max_steps < 0 else t.max_steps
        return cls(
            steps_per_epoch * t.gradient_accumulation_steps, total_steps, math.ceil(t.warmup_ratio * total_steps)
        )


def train_step(
    engine, micro_batches: list[Batch], delta: RunningMean, sums: WindowSums, beta: float, chunk_size: int, shape=None
):
    """One optimizer step on a DeepSpeed engine: for each micro-batch, the BCO forward and loss (δ updated first,
    metrics added to `sums`), backward, and the engine's step (DeepSpeed steps the optimizer at the accumulation
    boundary: the batch that closes the step). Returns the step's gradient norm (a tensor or float)."""
    norm = None
    for batch in micro_batches:
        if isinstance(batch, PackedBatch):  # a packed step has a variable number of packs: say which one closes it
            engine.set_gradient_accumulation_boundary(batch.closes_step)
        flops = train_flops(shape, *batch.work) if shape else 0.0
        # Through the engine (not engine.module): ZeRO-3 counts micro-steps in the engine's forward.
        loss = micro_batch_loss(engine, batch, delta, beta, chunk_size, sums=sums, flops=flops)
        # A packed loss carries its own 1 / (rows in the step) weights: no division by the accumulation steps.
        engine.backward(loss, scale_wrt_gas=batch.divide_by_gas)
        if engine.zero_optimization_stage() == 0 and engine.is_gradient_accumulation_boundary():
            norm = _grad_norm(engine.module)  # DeepSpeed reports no global norm at ZeRO-0
        engine.step()
    return norm if norm is not None else engine.get_global_grad_norm()


class PolicyUpdater:
    """One worker's policy, DeepSpeed engine, δ, metric sums and LR schedule; `rows`: the training rows the step
    schedule is fixed from (the pass's split, or an online loop's own count)."""

    def __init__(self, spec: WorkerSpec, rows: int):
        import deepspeed  # the workers' (slow to import): not wherever this module is imported
        from transformers import get_scheduler

        from bco_ray.train.policy import build_policy

        t = self.t = spec.cfg.train
        self.spec, self.times = spec, {"entered": time.time()}
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.on_gpu = t.use_gpu and torch.cuda.is_available()
        self.device = ray.train.torch.get_device() if self.on_gpu else torch.device("cpu")
        torch.manual_seed(t.seed)
        init_distributed("nccl" if self.on_gpu else "gloo")
        self.times["joined"] = time.time()
        self.schedule = s = StepSchedule.of(t, rows, self.world)
        model = build_policy(spec.cfg, spec.models.policy, self.on_gpu)
        self.times["model"] = time.time()
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(t, self.world, self.on_gpu),
            lr_scheduler=lambda opt: get_scheduler(
                t.lr_scheduler, opt, num_warmup_steps=s.warmup, num_training_steps=s.total_steps
            ),
        )
        self.times["engine_ready_at"] = time.time()
        self.shape = flop_shape(self.engine.module)  # the one MFU definition: bco_ray/train/throughput.py
        # Dense peak of this GPU in the training dtype ($BCO_RAY_PEAK_TFLOPS overrides); None: no MFU
        dtype = "bf16" if use_bf16(t, self.on_gpu) else "fp32"
        self.peak_flops = peak_flops(torch.cuda.get_device_name(), dtype) if self.on_gpu else None
        self.delta = RunningMean(device=self.device)  # on the device: no host sync per micro-batch
        self.sums, self.t_window = WindowSums(self.device), time.time()
        self.step, self.grad_norm = 0, 0.0

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def update(self, micro_batches: list[Batch], reduce: bool = True) -> dict:
        """One optimizer step on its micro-batches (the last one closes it). With `reduce`, the logging window's
        metrics (one all-reduce and host read; the window starts again), else {}."""
        lr = self.lr
        for batch in micro_batches:
            hooks.run_before(self.step + 1, batch)
        t = self.t
        self.grad_norm = train_step(self.engine, micro_batches, self.delta, self.sums, t.beta, self.chunk, self.shape)
        self.step += 1
        hooks.run_step_end(hooks.StepEnd(self.step, self.rank, self.world, self.spec.storage_dir, micro_batches))
        return self.metrics(lr) if reduce else {}

    @property
    def chunk(self) -> int:
        return self.spec.cfg.precompute.logp_chunk_size

    def metrics(self, lr: float) -> dict:
        """The window's BCO metrics over all ranks, δ, LR, grad norm, throughput and MFU; the window starts again."""
        m = self.sums.reduce()
        elapsed = max(time.time() - self.t_window, 1e-9)
        flops = m.pop("flops")
        if self.peak_flops:  # model FLOPs (bco_ray/train/throughput.py) per second, per GPU, over peak
            m["mfu"] = flops / elapsed / self.world / self.peak_flops
        m.update(
            {
                "delta": float(self.delta.mean),
                "learning_rate": lr,
                "grad_norm": float(self.grad_norm or 0.0),
                "tokens_per_second": m.pop("tokens") / elapsed,
                "samples_per_second": (m["count/chosen"] + m["count/rejected"]) / elapsed,
            }
        )
        self.sums.reset()
        self.t_window = time.time()
        return m

    def check_finite(self) -> None:
        """Raise Diverged unless the window's sums and the weights are finite on every rank (divergence.py)."""
        check_device(self.step, self.sums.sums, self.engine.module)

    def evaluate(self, batches: list[dict]) -> dict:
        """Eval metrics of the policy on `batches` (bco_ray/train/evaluate.py), δ as it is."""
        spec, module = self.spec, self.engine.module
        return evaluate(module, batches, self.delta, spec.cfg, spec.models.pad_id, self.device, self.rank, self.world)

    def save_checkpoint(self, d: str, position: dict) -> None:
        """Every rank's engine state (weights, optimizer, LR schedule), δ, step and RNG into directory `d`, with the
        caller's `position` (its data position and anything else it resumes from: picklable values)."""
        state = {"delta": self.delta.state_dict(), "step": self.step, "rng": torch.get_rng_state(), **position}
        self.engine.save_checkpoint(d, tag="ds", client_state=state)

    def load_checkpoint(self, d: str) -> dict:
        """A `save_checkpoint` directory back into the engine, δ, step and RNG; returns the saved state (with the
        caller's position)."""
        _, state = self.engine.load_checkpoint(d, tag="ds")
        self.delta.load_state_dict(state["delta"])
        self.step = state["step"]
        torch.set_rng_state(state["rng"])
        return state

    def export_weights(self, out_dir: str, lora_merged: bool | None = None) -> None:
        """The policy in Hugging Face format into `out_dir` on rank 0 (every rank calls it: ZeRO-3 shards are
        gathered); with LoRA, the adapter, and the merged model in `merged/` if `lora_merged` (default: the
        config's `train.lora.save_merged`)."""
        from bco_ray.train.policy import save_final_model

        t = self.t
        merged = t.lora.enabled and (t.lora.save_merged if lora_merged is None else lora_merged)
        save_final_model(
            self.engine.module, out_dir, self.spec.models.tokenizer, self.rank, t.zero_stage, lora_merged=merged
        )


def _grad_norm(model) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
