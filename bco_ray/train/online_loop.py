"""What a Ray Train worker of an online BCO job runs (bco_ray/job/online.py drives it), a client of the policy update
(bco_ray/train/updater.py) like the offline recipe. The worker group starts once and stays alive across rounds:

setup    the PolicyUpdater once (process group, policy, DeepSpeed engine, δ); its optimizer state and δ carry
         over from round to round
resume   the latest round-boundary checkpoint, if any (engine, δ, step, RNG, the round it closes, the metric history)
ready    rank 0 tells the driver through the channel (bco_ray/online/channel.py) how many rounds the checkpoint holds
         and, after a resume, where it exported the policy for the generators
rounds   for each round the driver posts: read its scored rows (Parquet), run the optimizer steps (each rank its
         rows of each micro-batch), export the weights for the generators (the sync), checkpoint (position = the
         round), and rank 0 signals the driver with the round's metrics
stop     the final model and final.json as the run's last report (an abort ends without them)"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import fsspec
import numpy as np
import pyarrow.parquet as pq
import ray.train
import torch.distributed as dist

from bco_ray.console import console
from bco_ray.tracking.step_logger import StepLogger
from bco_ray.train import hooks
from bco_ray.train.batches import collate
from bco_ray.train.divergence import check_values
from bco_ray.train.recipe import report_final, restore_latest
from bco_ray.train.snapshots import publish_dir
from bco_ray.train.spec import WorkerSpec
from bco_ray.train.updater import PolicyUpdater

SCORED = ("input_ids", "prompt_len", "label", "ref_logps", "udm_weight")


def online_loop_per_worker(config: dict) -> None:
    """`config`: {"spec": the WorkerSpec (train_rows: the rows the LR schedule is planned for), "channel": the
    driver's Channel actor}."""
    hooks.install_from_env()
    worker = OnlineWorker(config["spec"], config["channel"])
    if not worker.resume():  # this run name had finished already: its final model was reported again
        worker.announce(finished=True)
        return
    worker.announce()
    if worker.run():
        worker.save_final()


def micro_batch_rows(n: int, seed: int, r: int, world: int, rank: int, mb: int, gas: int) -> list[list[list[int]]]:
    """Round r's n rows, shuffled by (seed, r), as whole optimizer steps: for each step, this rank's row indices
    of each of its `gas` micro-batches (rank k takes the k-th `mb` rows of every world × mb slice). Rows that do
    not fill a last step are left out, so every rank runs the same steps."""
    order = np.random.default_rng([seed, r]).permutation(n)
    per_step = world * mb * gas
    steps = []
    for s in range(n // per_step):
        base = [s * per_step + g * world * mb + rank * mb for g in range(gas)]
        steps.append([order[b : b + mb].tolist() for b in base])
    return steps


class OnlineWorker:
    def __init__(self, spec: WorkerSpec, channel):
        self.spec, self.channel, self.t = spec, channel, spec.cfg.train
        self.updater = up = PolicyUpdater(spec, spec.train_rows)
        self.rank, self.world = up.rank, up.world
        mlflow = dataclasses.asdict(spec.mlflow) if spec.mlflow else None
        self.logger = StepLogger(mlflow, self.rank, buffered=True)
        self.rounds_done = 0
        self.last_done: dict | None = None  # the last checkpointed round's `done` metrics (after a resume)

    def resume(self) -> bool:
        """The latest round-boundary checkpoint into the updater. False: the run had finished already."""
        state = restore_latest(self.updater)
        if not state:
            return state is not None
        self.rounds_done = state["round"] + 1
        self.logger.history = state.get("history", [])
        self.last_done = state.get("done")
        if self.rank == 0:
            console(f"[bco-ray] online: resumed after round {state['round']} at step {self.updater.step}")
        return True

    def announce(self, finished: bool = False) -> None:
        """Rank 0 tells the driver the group is ready (or, `finished`, that the run's final model is reported
        again: nothing to train); a resumed group first exports its policy (every rank). A group Ray Train restarted
        after round r's checkpoint but before rank 0 said round r was done says it now (the driver may be waiting
        for it)."""
        policy = None
        if self.rounds_done and not finished:
            policy = f"{self.spec.storage_dir}/online/policy/resumed-{self.rounds_done}"
            self.export(policy)
        if self.rank == 0:
            info = {"rounds_done": self.rounds_done, "policy": policy, "pid": os.getpid(), "at": time.time()}
            info.update(finished=finished, step=self.updater.step, engine=self.updater.times)
            ray.get(self.channel.ready.remote(info))
            if self.last_done is not None:
                ray.get(self.channel.done_if_missing.remote(self.rounds_done - 1, self.last_done))

    def run(self) -> bool:
        """Rounds as the driver posts them. True at a stop (save the final model), False at an abort."""
        r = self.rounds_done
        while True:
            msg = ray.get(self.channel.next.remote(r))
            if msg["kind"] != "round":
                return msg["kind"] == "stop"
            self.train_round(r, msg)
            r = self.rounds_done = r + 1

    def train_round(self, r: int, msg: dict) -> None:
        up, t = self.updater, self.t
        t0 = time.perf_counter()
        with fsspec.open(msg["rows"], "rb") as f:
            rows = pq.read_table(f, columns=list(SCORED)).to_pydict()
        steps = micro_batch_rows(
            len(rows["label"]), t.seed, r, self.world, self.rank, t.micro_batch_size, t.gradient_accumulation_steps
        )
        if not steps and self.rank == 0:  # rows lost to empty completions or labeler skips: nothing to step on
            console(f"[bco-ray] online: round {r}'s {len(rows['label'])} rows fill no optimizer step; not trained")
        for i, step in enumerate(steps):
            batches = [
                collate({k: [rows[k][j] for j in idx] for k in SCORED}, self.spec.models.pad_id, g == len(step) - 1)
                for g, idx in enumerate(step)
            ]
            log_due = (up.step + 1) % t.logging_steps == 0 or i == len(steps) - 1
            m = up.update([b.to(up.device) for b in batches], reduce=log_due)
            if log_due:
                self.logger.log({**m, "online/round": r}, up.step)
                check_values(up.step, loss=m["loss"], grad_norm=m["grad_norm"])
        up.check_finite()
        t1 = time.perf_counter()
        self.export(msg["weights"])
        t2 = time.perf_counter()
        delta = up.delta.state_dict()
        done = {"step": up.step, "steps": len(steps), "update_s": t1 - t0, "export_s": t2 - t1, "checkpoint_s": 0.0}
        done.update({"delta": delta["mean"], "delta_count": delta["count"]})
        self.checkpoint(r, done)
        if self.rank == 0:
            ray.get(self.channel.done.remote(r, {**done, "checkpoint_s": time.perf_counter() - t2}))

    def export(self, dest: str) -> None:
        """The policy in Hugging Face format at `dest` (every rank: ZeRO-3 gathers; rank 0 writes)."""
        with tempfile.TemporaryDirectory() as d:
            self.updater.export_weights(os.path.join(d, "model"), lora_merged=True)
            if self.rank == 0:
                publish_dir(os.path.join(d, "model"), dest)

    def checkpoint(self, r: int, done: dict) -> None:
        """Every rank's updater state with the round it closes, its `done` metrics and rank 0's metric history."""
        up = self.updater
        with tempfile.TemporaryDirectory() as d:
            up.save_checkpoint(d, {"round": r, "history": self.logger.history, "done": done})
            self.logger.flush()
            ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report({"step": up.step, "round": r}, checkpoint=ckpt, checkpoint_dir_name=f"round_{r:05d}")
        ray.train.get_all_reported_checkpoints()  # registered before the driver hears the round is done

    def save_final(self) -> None:
        """The final model and final.json (step, δ, the metric history) as the run's last report."""
        up = self.updater
        self.logger.flush()
        delta = up.delta.state_dict()
        final = {"step": up.step, "delta": delta["mean"], "delta_count": delta["count"], "rounds": self.rounds_done}
        with tempfile.TemporaryDirectory() as d:
            up.export_weights(os.path.join(d, "model"))
            report_final(d, self.rank, final, self.logger.history, up.step)
        if dist.is_initialized():
            dist.barrier()
