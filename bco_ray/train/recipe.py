"""The BCO training recipe one Ray Train worker runs (bco_ray/train/loop.py drives it):

setup   process group, step schedule, policy, DeepSpeed engine
resume  the latest checkpoint's engine, δ, data position and RNG
train   evaluate at step 0, then epochs of micro-batches: BCO forward, backward, step;
        after each optimizer step: log / evaluate / checkpoint
save    final evaluation and the final model in Hugging Face format; a run that diverges (a non-finite loss,
        grad norm or weight: bco_ray/train/divergence.py) stops and saves its last good checkpoint's model
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import deepspeed
import ray.train
import torch
import torch.distributed as dist
from transformers import get_scheduler

from bco_ray.config.schema import TrainConfig, load_config
from bco_ray.console import console
from bco_ray.tracking.step_logger import StepLogger
from bco_ray.tracking.throughput import peak_flops as gpu_peak_flops
from bco_ray.train.batching import backward, packed_micro_batches, padded_micro_batches, set_boundary
from bco_ray.train.device_stats import DeviceRunningMean, DeviceWindowSums
from bco_ray.train.divergence import Diverged, check_device, check_values, last_good_checkpoint
from bco_ray.train.ds_config import deepspeed_config, use_bf16
from bco_ray.train.evaluate import evaluate, read_batches
from bco_ray.train.jit_builds import pin_jit_builds
from bco_ray.train.policy import build_policy, save_final_model
from bco_ray.train.snapshots import save_snapshot
from bco_ray.train.step import micro_batch_loss
from bco_ray.train.switches import inject_failure_if_due, inject_nan_if_due, record_rows
from bco_ray.train.throughput import flop_shape, train_flops


@dataclass(frozen=True)
class StepSchedule:
    """Steps are fixed up front from the pass's row count, so every rank runs the same number of them."""

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


class BCORecipe:
    """One worker's run. `config` is the dict run.py hands every worker: the config overrides ("cfg"), the
    pass's row count, the policy/tokenizer paths, pad id, storage dir, MLflow run and timing of the fit."""

    def __init__(self, config: dict):
        self.t_entry = time.time()
        self.config = config
        self.cfg = load_config(overrides=config["cfg"])
        self.t = self.cfg.train
        self.ctx = ray.train.get_context()
        self.rank, self.world = self.ctx.get_world_rank(), self.ctx.get_world_size()
        self.on_gpu = self.t.use_gpu and torch.cuda.is_available()
        self.device = ray.train.torch.get_device() if self.on_gpu else torch.device("cpu")
        self.storage_dir = config["storage_dir"]
        self.step, self.epoch, self.skip = 0, 0, 0  # skip: micro-batches of this epoch already trained
        self.grad_norm, self.step_rows = 0.0, []

    # ------------------------------------------------------------------ setup / resume
    def setup(self) -> None:
        """Process group, step schedule, policy and DeepSpeed engine (with its LR schedule)."""
        t = self.t
        torch.manual_seed(t.seed)
        pin_jit_builds()
        deepspeed.init_distributed(dist_backend="nccl" if self.on_gpu else "gloo")
        t_dist = time.time()
        self.schedule = StepSchedule.of(t, self.config["train_rows"], self.world)
        model = build_policy(self.cfg, self.config["policy_path"], self.on_gpu)
        t_model = time.time()
        s = self.schedule
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(t, self.world, self.on_gpu),
            lr_scheduler=lambda opt: get_scheduler(
                t.lr_scheduler, opt, num_warmup_steps=s.warmup, num_training_steps=s.total_steps
            ),
        )
        self.shape = flop_shape(self.engine.module)  # the one MFU definition: bco_ray/train/throughput.py
        # Dense peak of this GPU in the training dtype (H100 PCIe/NVL; fp32: TF32; $BCO_RAY_PEAK_TFLOPS); None: no MFU
        dtype = "bf16" if use_bf16(t, self.on_gpu) else "fp32"
        self.peak_flops = gpu_peak_flops(torch.cuda.get_device_name(), dtype) if self.on_gpu else None
        self.timings = {"engine_ready_at": time.time(), "train": 0.0, "eval": 0.0, "save": 0.0}
        if self.rank == 0:
            ready = self.timings["engine_ready_at"]
            console(
                f"[bco-ray] worker group ready: {ready - self.config['fit_started_at']:.1f} s after "
                f"fit (in the worker: {t_dist - self.t_entry:.1f} s to join the process group, "
                f"{t_model - t_dist:.1f} s to load the policy, {ready - t_model:.1f} s to build the engine)"
            )
        self.delta = DeviceRunningMean(self.device)  # on the device: no host sync per micro-batch

    def resume(self) -> bool:
        """Restore the latest checkpoint, if any. False: this run name had finished already; its final model was
        reported again and there is nothing to train."""
        ckpt = ray.train.get_checkpoint()
        if not ckpt:
            return True
        with ckpt.as_directory() as d:
            if os.path.exists(os.path.join(d, "final.json")):
                _report_finished(d, self.rank)
                return False
            self._load(d)
        if self.rank == 0:
            console(
                f"[bco-ray] resumed from checkpoint at step {self.step} (epoch {self.epoch}, "
                f"δ={float(self.delta.mean):.6f})"
            )
        return True

    def _load(self, d: str) -> None:
        """A checkpoint's engine (weights, optimizer, LR schedule), δ, data position and RNG."""
        _, client = self.engine.load_checkpoint(d, tag="ds")
        self.delta.load_state_dict(client["delta"])
        self.step, self.epoch, self.skip = client["step"], client["epoch"], client["micro_in_epoch"]
        torch.set_rng_state(client["rng"])

    # ------------------------------------------------------------------ the epoch loop
    def train(self) -> None:
        """Evaluate at step 0 (every eval curve starts at the reference), then epochs until the last step;
        max_steps may run past num_epochs."""
        self._open_streams()
        self.t_train = time.time()
        if self.eval_ds is not None and self.step == 0 and self.cfg.eval.at_start:
            self.logger.log(self._evaluate(), 0)
            self.timings["eval"] += time.time() - self.t_train
            self.t_window = time.time()
        while self.step < self.schedule.total_steps:
            self.train_epoch()
            self.skip = 0
            self.epoch += 1
        self.timings["train"] = time.time() - self.t_train - self.timings["eval"]

    def _open_streams(self) -> None:
        t = self.t
        self.logger = StepLogger(self.config.get("mlflow"), self.rank, buffered=t.save_steps > 0)
        self.pad_id = self.config["pad_id"]
        self.window, self.t_window = DeviceWindowSums(self.device), time.time()
        self.token_budget = (
            t.micro_batch_tokens if t.micro_batch_tokens >= 0 else t.micro_batch_size * self.cfg.data.max_length
        )
        self.chunk = self.cfg.precompute.logp_chunk_size
        self.shard = ray.train.get_dataset_shard("train")  # the whole ordered split: see batching.rank_batches
        self.eval_ds = ray.train.get_dataset_shard("eval") if self.config.get("has_eval") else None
        self.eval_batches = None  # read once, at the first eval

    def _micro_batches(self):
        """(batch, row ids, micro-batch units, last of the optimizer step) from this epoch's `skip` on."""
        args = (self.shard, self.t, self.rank, self.world)
        if self.token_budget > 0:
            return packed_micro_batches(*args, self.skip, self.pad_id, self.device, self.chunk, self.token_budget)
        return padded_micro_batches(*args, self.epoch, self.skip, self.pad_id, self.device)

    def train_epoch(self) -> None:
        """This rank's micro-batches of one epoch; resuming mid-epoch, the first `skip` were trained already."""
        micro, step_at_start, s = self.skip, self.step, self.schedule
        for batch, row_ids, units, last in self._micro_batches():
            if micro >= s.micro_per_epoch or self.step >= s.total_steps:
                break
            if self.t.record_rows and row_ids is not None:
                self.step_rows.extend(row_ids.tolist())
            lr = self.scheduler.get_last_lr()[0]
            self.train_micro_batch(batch, last)
            micro += units
            if last:
                self.end_step(micro, lr)
        if self.step == step_at_start and self.skip == 0:
            raise RuntimeError(
                f"rank {self.rank}: the training shard yielded no full micro-batch in epoch {self.epoch}"
            )

    def train_micro_batch(self, batch: dict, last: bool) -> None:
        """BCO forward, backward and engine step (DeepSpeed steps the optimizer at the accumulation boundary)."""
        engine = self.engine
        inject_nan_if_due(self.t.inject_nan_at_step, self.step + 1, batch)
        set_boundary(engine, batch, last)
        # Through the engine (not engine.module): ZeRO-3 counts micro-steps in the engine's forward.
        loss = micro_batch_loss(
            engine,
            batch,
            self.delta,
            self.t.beta,
            self.chunk,
            sums=self.window,
            flops=train_flops(self.shape, *batch["work"]),
        )
        backward(engine, batch, loss)
        if self.t.zero_stage == 0 and engine.is_gradient_accumulation_boundary():
            self.grad_norm = _grad_norm(engine.module)  # DeepSpeed reports no global norm at ZeRO-0
        engine.step()

    def end_step(self, micro: int, lr: float) -> None:
        """After optimizer step `self.step + 1`: the testing switches, then log / evaluate / checkpoint as due."""
        t, total = self.t, self.schedule.total_steps
        inject_failure_if_due(
            t.inject_failure_at_step,
            self.step + 1,
            micro,
            t.gradient_accumulation_steps,
            self.rank,
            self.world,
            self.storage_dir,
        )
        self.step += 1
        if t.record_rows:
            record_rows(self.storage_dir, self.rank, self.step, self.step_rows)
            self.step_rows = []
        if self.step % t.logging_steps == 0 or self.step == total:
            self.log_step(micro, lr)
        eval_due = self.eval_ds is not None and t.eval_steps > 0 and self.step % t.eval_steps == 0
        save_due = t.save_steps > 0 and self.step % t.save_steps == 0
        if (eval_due or save_due) and self.step < total:  # nothing non-finite is evaluated or checkpointed
            check_device(self.step, self.window.sums, self.engine.module)
        if eval_due and self.step < total:
            self.evaluate_mid_run()
        if save_due and self.step < total:
            at_end = micro >= self.schedule.micro_per_epoch
            self.checkpoint({"step": self.step}, 0 if at_end else micro, self.epoch + 1 if at_end else self.epoch)

    # ------------------------------------------------------------------ log / evaluate / checkpoint
    def log_step(self, micro: int, lr: float) -> None:
        """The window's BCO metrics (one host sync), δ, LR, epoch, grad norm, throughput and MFU."""
        m = self.window.reduce()
        elapsed = max(time.time() - self.t_window, 1e-9)
        flops = m.pop("flops")
        if self.peak_flops:  # model FLOPs (bco_ray/train/throughput.py) per second, per GPU, over peak
            m["mfu"] = flops / elapsed / self.world / self.peak_flops
        grad_norm = self.grad_norm if self.t.zero_stage == 0 else self.engine.get_global_grad_norm() or 0.0
        m.update(
            {
                "delta": float(self.delta.mean),
                "learning_rate": lr,
                "epoch": self.epoch + micro / self.schedule.micro_per_epoch,
                "grad_norm": float(grad_norm),
                "tokens_per_second": m.pop("tokens") / elapsed,
                "samples_per_second": (m["count/chosen"] + m["count/rejected"]) / elapsed,
            }
        )
        self.logger.log(m, self.step)
        check_values(self.step, loss=m["loss"], grad_norm=m["grad_norm"])  # read here anyway: no extra sync
        self.window.reset()
        self.t_window = time.time()

    def _evaluate(self) -> dict:
        if self.eval_batches is None:
            self.eval_batches = read_batches(self.eval_ds, self.t.micro_batch_size)
        return evaluate(
            self.engine.module, self.eval_batches, self.delta, self.cfg, self.pad_id, self.device, self.rank, self.world
        )

    def evaluate_mid_run(self) -> None:
        """Eval metrics at this step and, for the driver's generation pass, a snapshot of the policy."""
        t_eval = time.time()
        self.logger.log(self._evaluate(), self.step)
        if self.cfg.eval.generate:
            save_snapshot(
                self.engine.module,
                self.storage_dir,
                self.step,
                self.config["tokenizer_path"],
                self.rank,
                self.t.zero_stage,
                self.t.lora.enabled,
            )
        self.t_window += time.time() - t_eval  # evaluation time is not training throughput
        self.timings["eval"] += time.time() - t_eval

    def checkpoint(self, metrics: dict, micro_in_epoch: int, epoch: int) -> None:
        """Every rank's DeepSpeed state, δ, data position and RNG; Ray merges the ranks' files into one
        checkpoint directory on the run's storage and keeps the last `keep_checkpoints`."""
        with tempfile.TemporaryDirectory() as d:
            self.engine.save_checkpoint(
                d,
                tag="ds",
                client_state={
                    "delta": self.delta.state_dict(),
                    "step": self.step,
                    "epoch": epoch,
                    "micro_in_epoch": micro_in_epoch,
                    "rng": torch.get_rng_state(),
                },
            )
            node_id = (
                self.ctx.get_node_id() if hasattr(self.ctx, "get_node_id") else ray.get_runtime_context().get_node_id()
            )
            with open(os.path.join(d, f"rank{self.rank}.json"), "w") as f:
                json.dump({"rank": self.rank, "node_id": node_id, "step": self.step}, f)
            self.logger.flush()
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(d),
                checkpoint_dir_name=f"checkpoint_step{self.step:07d}",
            )
        # Reports are registered by the controller asynchronously: wait, so that a worker dying right
        # after this point still restarts from this checkpoint (not from the previous one).
        ray.train.get_all_reported_checkpoints()

    # ------------------------------------------------------------------ final save
    def save_diverged(self, e: Diverged) -> None:
        """After a divergence: the last good checkpoint's state back in the engine, and its model saved as the
        final one, with final.json's `diverged` saying where and why (the driver publishes it, then fails the
        run). Without a checkpoint, final.json alone: no model."""
        self.logger.flush()
        ckpt = last_good_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                self._load(d)
        diverged = {"step": e.step, "what": e.what, "checkpoint": ckpt.path if ckpt else None}
        if self.rank == 0:
            console(f"[bco-ray] {e}; the final model is {f'step {self.step}' if ckpt else 'none (no checkpoint)'}")
        self.save_final(diverged)

    def save_final(self, diverged: dict | None = None) -> None:
        """Final evaluation, then the model in Hugging Face format and final.json as the run's last report."""
        t = self.t
        if diverged is None:  # the final step's update may have made the weights non-finite
            check_device(self.step, self.window.sums, self.engine.module)
        final = {"step": self.step, "delta": float(self.delta.mean)}
        if diverged:
            final["diverged"] = diverged
        if self.eval_ds is not None and diverged is None:
            t_eval = time.time()
            ev = self._evaluate()
            self.logger.log(ev, self.step)
            final.update(ev)
            self.timings["eval"] += time.time() - t_eval
        self.logger.flush()
        with tempfile.TemporaryDirectory() as d:
            t_save = time.time()
            if diverged is None or diverged["checkpoint"]:
                save_final_model(
                    self.engine.module,
                    os.path.join(d, "model"),
                    self.config["tokenizer_path"],
                    self.rank,
                    t.zero_stage,
                    lora_merged=t.lora.enabled and t.lora.save_merged,
                )
            self.timings["save"] = time.time() - t_save
            final["timings"] = self.timings
            if self.rank == 0:
                with open(os.path.join(d, "final.json"), "w") as f:
                    json.dump(final, f)
            ray.train.report(
                final,
                checkpoint=ray.train.Checkpoint.from_directory(d) if self.rank == 0 else None,
                checkpoint_dir_name=f"final_step{self.step:07d}",
            )
        if dist.is_initialized():
            dist.barrier()


# ---------------------------------------------------------------------- small helpers
def _grad_norm(model) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _report_finished(d: str, rank: int) -> None:
    """Re-running a finished run name: report its final model again instead of training from scratch."""
    with open(os.path.join(d, "final.json")) as f:
        final = json.load(f)
    with tempfile.TemporaryDirectory() as out:
        if rank == 0:
            if os.path.isdir(os.path.join(d, "model")):  # a run that diverged before any checkpoint has none
                shutil.copytree(os.path.join(d, "model"), os.path.join(out, "model"))
            shutil.copy(os.path.join(d, "final.json"), out)
            console(f"[bco-ray] run already finished at step {final.get('step')}; nothing to train")
        ray.train.report(
            final,
            checkpoint=ray.train.Checkpoint.from_directory(out) if rank == 0 else None,
            checkpoint_dir_name=f"final_step{final.get('step', 0):07d}_again",
        )
