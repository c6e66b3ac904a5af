"""The offline BCO recipe one Ray Train worker runs (bco_ray/train/loop.py drives it), a client of the policy
update (bco_ray/train/updater.py):

setup   the PolicyUpdater (process group, step schedule, policy, DeepSpeed engine), the data and the logger
resume  the latest checkpoint's engine, δ, data position, RNG and metric history
train   evaluate at step 0, then epochs: each optimizer step's micro-batches → updater.update → log / evaluate /
        checkpoint as due
save    final evaluation and the final model in Hugging Face format; a run that diverges (a non-finite loss,
        grad norm or weight: bco_ray/train/divergence.py) stops and saves its last good checkpoint's model
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time

import ray.train
import torch.distributed as dist

from bco_ray.console import console
from bco_ray.tracking.step_logger import StepLogger
from bco_ray.train.batching import optimizer_steps, packed_micro_batches, padded_micro_batches
from bco_ray.train.divergence import Diverged, check_values, last_good_checkpoint
from bco_ray.train.evaluate import read_batches
from bco_ray.train.snapshots import save_snapshot
from bco_ray.train.spec import WorkerSpec
from bco_ray.train.updater import PolicyUpdater


class BCORecipe:
    """One worker's offline run over the pass's train split, from the `WorkerSpec` the driver built."""

    def __init__(self, spec: WorkerSpec):
        self.spec, self.cfg, self.t = spec, spec.cfg, spec.cfg.train
        self.epoch, self.skip = 0, 0  # skip: micro-batches of this epoch already trained
        self.timings = {"train": 0.0, "eval": 0.0, "save": 0.0}

    def setup(self) -> None:
        """The updater, this rank's data streams and the step logger."""
        self.updater = up = PolicyUpdater(self.spec, self.spec.train_rows)
        self.rank, self.world, self.schedule = up.rank, up.world, up.schedule
        self.timings["engine_ready_at"] = times = up.times["engine_ready_at"]
        if self.rank == 0:
            console(
                f"[bco-ray] worker group ready: {times - self.spec.fit_started_at:.1f} s after fit (in the worker: "
                f"{up.times['joined'] - up.times['entered']:.1f} s to join the process group, "
                f"{up.times['model'] - up.times['joined']:.1f} s to load the policy, "
                f"{times - up.times['model']:.1f} s to build the engine)"
            )
        mlflow = dataclasses.asdict(self.spec.mlflow) if self.spec.mlflow else None
        self.logger = StepLogger(mlflow, self.rank, buffered=self.t.save_steps > 0)
        self.shard = ray.train.get_dataset_shard("train")  # the whole ordered split: see batching.rank_batches
        self.eval_ds = ray.train.get_dataset_shard("eval") if self.spec.has_eval else None
        self.eval_batches = None  # read once, at the first eval

    def resume(self) -> bool:
        """Restore the latest checkpoint, if any. False: this run name had finished already; its final model was
        reported again and there is nothing to train."""
        state = restore_latest(self.updater)
        if not state:
            return state is not None
        self.epoch, self.skip = state["epoch"], state["micro_in_epoch"]
        self.logger.history = state.get("history", [])
        if self.rank == 0:
            console(
                f"[bco-ray] resumed from checkpoint at step {self.updater.step} (epoch {self.epoch}, "
                f"δ={float(self.updater.delta.mean):.6f})"
            )
        return True

    def train(self) -> None:
        """Evaluate at step 0 (every eval curve starts at the reference), then epochs until the last step;
        max_steps may run past num_epochs."""
        t_train = time.time()
        if self.eval_ds is not None and self.updater.step == 0 and self.cfg.eval.at_start:
            self.logger.log(self._evaluate(), 0)
        while self.updater.step < self.schedule.total_steps:
            self.train_epoch()
            self.skip = 0
            self.epoch += 1
        self.timings["train"] = time.time() - t_train - self.timings["eval"]

    def _micro_batches(self):
        t, args = self.t, (self.shard, self.t, self.rank, self.world)
        budget = t.micro_batch_tokens if t.micro_batch_tokens >= 0 else t.micro_batch_size * self.cfg.data.max_length
        if budget > 0:
            chunk = self.cfg.precompute.logp_chunk_size
            return packed_micro_batches(*args, self.skip, self.spec.models.pad_id, self.updater.device, chunk, budget)
        return padded_micro_batches(*args, self.epoch, self.skip, self.spec.models.pad_id, self.updater.device)

    def train_epoch(self) -> None:
        """This rank's optimizer steps of one epoch; resuming mid-epoch, the first `skip` micro-batches were
        trained already."""
        up, t, s = self.updater, self.t, self.schedule
        micro, step_at_start = self.skip, up.step
        for micro_batches in optimizer_steps(self._micro_batches()):
            if micro >= s.micro_per_epoch or up.step >= s.total_steps:
                break
            log_due = (up.step + 1) % t.logging_steps == 0 or up.step + 1 == s.total_steps
            m = up.update(micro_batches, reduce=log_due)
            micro += t.gradient_accumulation_steps
            if log_due:
                self.logger.log({**m, "epoch": self.epoch + micro / s.micro_per_epoch}, up.step)
                check_values(up.step, loss=m["loss"], grad_norm=m["grad_norm"])  # read anyway: no extra sync
            self.after_step(micro)
        if up.step == step_at_start and self.skip == 0:
            raise RuntimeError(
                f"rank {self.rank}: the training shard yielded no full micro-batch in epoch {self.epoch}"
            )

    def after_step(self, micro: int) -> None:
        """Evaluate and checkpoint as due (never at the last step: the final save evaluates and saves)."""
        t, step, up = self.t, self.updater.step, self.updater
        eval_due = self.eval_ds is not None and t.eval_steps > 0 and step % t.eval_steps == 0
        save_due = t.save_steps > 0 and step % t.save_steps == 0
        if not (eval_due or save_due) or step >= self.schedule.total_steps:
            return
        up.check_finite()  # nothing non-finite is evaluated or checkpointed
        if eval_due:
            self.logger.log(self._evaluate(snapshot=self.cfg.eval.generate), step)
        if save_due:
            at_end = micro >= self.schedule.micro_per_epoch
            self.checkpoint(0 if at_end else micro, self.epoch + 1 if at_end else self.epoch)

    def _evaluate(self, snapshot: bool = False) -> dict:
        """Eval metrics at this step and, with `snapshot`, the policy saved for the driver's generation pass.
        Neither counts as training time or throughput."""
        t0, up = time.time(), self.updater
        if self.eval_batches is None:
            self.eval_batches = read_batches(self.eval_ds, self.t.micro_batch_size)
        out = up.evaluate(self.eval_batches)
        if snapshot:
            save_snapshot(lambda d: up.export_weights(d, lora_merged=True), self.spec.storage_dir, up.step, self.rank)
        up.t_window += time.time() - t0
        self.timings["eval"] += time.time() - t0
        return out

    def checkpoint(self, micro_in_epoch: int, epoch: int) -> None:
        """Every rank's updater state, data position and rank 0's metric history; Ray merges the ranks' files into
        one checkpoint directory on the run's storage and keeps the last `keep_checkpoints`."""
        step = self.updater.step
        with tempfile.TemporaryDirectory() as d:
            position = {"epoch": epoch, "micro_in_epoch": micro_in_epoch, "history": self.logger.history}
            self.updater.save_checkpoint(d, position)
            node_id = ray.get_runtime_context().get_node_id()
            with open(os.path.join(d, f"rank{self.rank}.json"), "w") as f:
                json.dump({"rank": self.rank, "node_id": node_id, "step": step}, f)
            self.logger.flush()
            ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report({"step": step}, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_step{step:07d}")
        # Reports are registered by the controller asynchronously: wait, so that a worker dying right
        # after this point still restarts from this checkpoint (not from the previous one).
        ray.train.get_all_reported_checkpoints()

    def save_diverged(self, e: Diverged) -> None:
        """After a divergence: the last good checkpoint's state back in the updater, and its model saved as the
        final one, with final.json's `diverged` saying where and why (the driver publishes it, then fails the
        run). Without a checkpoint, final.json alone: no model."""
        self.logger.flush()
        ckpt = last_good_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                self.updater.load_checkpoint(d)  # the history keeps what was logged up to the divergence
        diverged = {"step": e.step, "what": e.what, "checkpoint": ckpt.path if ckpt else None}
        if self.rank == 0:
            console(
                f"[bco-ray] {e}; the final model is {f'step {self.updater.step}' if ckpt else 'none (no checkpoint)'}"
            )
        self.save_final(diverged)

    def save_final(self, diverged: dict | None = None) -> None:
        """Final evaluation, then the model in Hugging Face format and final.json (with rank 0's metric history)
        as the run's last report."""
        up = self.updater
        if diverged is None:  # the final step's update may have made the weights non-finite
            up.check_finite()
        final = {"step": up.step, "delta": float(up.delta.mean), **({"diverged": diverged} if diverged else {})}
        if self.eval_ds is not None and diverged is None:
            ev = self._evaluate()
            self.logger.log(ev, up.step)
            final.update(ev)
        self.logger.flush()
        with tempfile.TemporaryDirectory() as d:
            t_save = time.time()
            if diverged is None or diverged["checkpoint"]:
                up.export_weights(os.path.join(d, "model"))
            self.timings["save"] = time.time() - t_save
            final["timings"] = self.timings
            report_final(d, self.rank, final, self.logger.history, up.step)
        if dist.is_initialized():
            dist.barrier()


def report_final(d: str, rank: int, final: dict, history: list, step: int) -> None:
    """The run's last report: directory `d` (the model, and final.json with the metric history, which rank 0
    writes) as its final checkpoint; the offline recipe's and the online loop's."""
    if rank == 0:
        with open(os.path.join(d, "final.json"), "w") as f:
            json.dump({**final, "history": history}, f)
    ckpt = ray.train.Checkpoint.from_directory(d) if rank == 0 else None
    ray.train.report(final, checkpoint=ckpt, checkpoint_dir_name=f"final_step{step:07d}")


def restore_latest(updater: PolicyUpdater) -> dict | None:
    """The latest checkpoint Ray Train hands this worker, loaded into `updater`: the caller's position saved with
    it ({} without a checkpoint), or None when it is a finished run's (its final model is reported again: nothing
    to train). The offline recipe and the online loop resume through it."""
    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return {}
    with ckpt.as_directory() as d:
        if os.path.exists(os.path.join(d, "final.json")):
            report_finished(d, updater.rank)
            return None
        return updater.load_checkpoint(d)


def report_finished(d: str, rank: int) -> None:
    """Re-running a finished run name: report its final model again instead of training from scratch."""
    with open(os.path.join(d, "final.json")) as f:
        final = json.load(f)
    with tempfile.TemporaryDirectory() as out:
        if rank == 0:
            if os.path.isdir(os.path.join(d, "model")):  # a run that diverged before any checkpoint has none
                shutil.copytree(os.path.join(d, "model"), os.path.join(out, "model"))
            shutil.copy(os.path.join(d, "final.json"), out)
            console(f"[bco-ray] run already finished at step {final.get('step')}; nothing to train")
        final.pop("history", None)
        ray.train.report(
            final,
            checkpoint=ray.train.Checkpoint.from_directory(out) if rank == 0 else None,
            checkpoint_dir_name=f"final_step{final.get('step', 0):07d}_again",
        )
