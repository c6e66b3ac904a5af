"""The long-lived Ray parts of an online job, driver side: the Ray Train worker group (`WorkerGroup`: one
TorchTrainer whose fit runs in a background thread for the whole job, its workers kept alive across rounds:
bco_ray/train/online_loop.py) and the parts a round injects into bco_ray/online/rounds.py (`RayParts`: generate and
score on the rollout actor, update through the channel to the workers, then the weights to the rollout)."""

from __future__ import annotations

import threading
import time

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.train.torch import TorchTrainer
from ray.train.v2.api.exceptions import ControllerError

from bco_ray.errors import TrainingError
from bco_ray.job.checks import unavailable_error
from bco_ray.job.context import Job
from bco_ray.job.train_stage import worker_group
from bco_ray.train.spec import MlflowTarget, ModelLocations, WorkerSpec


class WorkerGroup:
    """`trainer.fit()` in a background thread: the workers start once, then take round after round from the
    channel until the driver posts a stop (or an abort)."""

    def __init__(self, job: Job, channel, planned_rows: int):
        self.cfg, self.channel, self.result, self.error = job.cfg, channel, None, None
        self.trainer = _trainer(job, channel, planned_rows)
        self.thread = threading.Thread(target=self._fit, name="bco-online-fit", daemon=True)
        self.started_at = 0.0

    def start(self) -> None:
        self.started_at = time.time()
        self.thread.start()

    def _fit(self) -> None:
        try:
            self.result = self.trainer.fit()
        except BaseException as e:  # noqa: BLE001 - raised again in the driver's thread (wait, finish)
            self.error = e

    def wait(self, ref, what: str):
        """The value of `ref` (a channel call), or the worker group's error if its fit ends first."""
        while True:
            done, _ = ray.wait([ref], timeout=0.5)
            if done:
                return ray.get(done[0])
            if not self.thread.is_alive():
                done, _ = ray.wait([ref], timeout=2.0)  # sent just before the workers ended (a finished run's)
                if done:
                    return ray.get(done[0])
                self._raise_unavailable()
                raise TrainingError(f"the training worker group ended while the job waited for {what}") from (
                    self.error
                )

    def _raise_unavailable(self) -> None:
        """A worker group that never got its resources (as the offline train stage reports it)."""
        e = self.error
        if isinstance(e, ControllerError) and type(e.controller_failure).__name__ == "WorkerGroupStartupTimeoutError":
            t = self.cfg.train
            gpu = ", GPU: 1" if t.use_gpu else ""
            asks = f"{t.num_workers} × {{CPU: {t.cpus_per_worker:g}{gpu}}} (train.num_workers, train.cpus_per_worker)"
            raise unavailable_error(self.cfg, "The Ray Train worker group", asks) from e

    def finish(self, timeout: float | None = None):
        """Wait for fit to return (after a stop or an abort posted); its Result, or its error raised."""
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.result

    def abort(self, timeout: float = 60.0) -> None:
        """End the workers' loop without a final model, and wait (up to `timeout` s) for fit to return."""
        if self.thread.is_alive():
            ray.get(self.channel.abort.remote())
            self.thread.join(timeout)


def _trainer(job: Job, channel, planned_rows: int) -> TorchTrainer:
    from bco_ray.train.online_loop import online_loop_per_worker  # the workers' code imports DeepSpeed

    paths = job.paths
    spec = WorkerSpec(
        cfg=job.cfg,
        models=ModelLocations(policy=paths.policy, tokenizer=paths.tokenizer, pad_id=paths.pad_id),
        train_rows=planned_rows,
        has_eval=False,
        storage_dir=job.storage_dir,
        mlflow=MlflowTarget(job.uri, job.run_id, job.cfg.mlflow.log_system_metrics),
        fit_started_at=time.time(),
    )
    return TorchTrainer(
        online_loop_per_worker, train_loop_config={"spec": spec, "channel": channel}, **worker_group(job)
    )


def write_parquet(rows: list[dict], uri: str) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path.rpartition("/")[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)


class RayParts:
    """generate / score / update of bco_ray/online/rounds.py on the rollout actor and the worker group. `at(r)`
    says which round the next calls belong to (the sampling seed, the files)."""

    def __init__(self, job: Job, rollout, group: WorkerGroup, root: str):
        self.job, self.rollout, self.group, self.root = job, rollout, group, root
        self.r, self.step, self.weights, self.empty = 0, 0, None, 0
        self.udm: dict[str, float] = {}  # the last round's UDM figures (udm.enabled)
        self.t_round = time.perf_counter()

    def at(self, r: int) -> None:
        self.r, self.t_round, self.empty = r, time.perf_counter(), 0

    def generate(self, prompts, k: int):
        seed = self.job.cfg.train.seed * 1_000_003 + self.r
        samples, self.empty = ray.get(self.rollout.generate.remote(list(prompts), k, seed))
        return samples

    def score(self, rows: list[dict]) -> list[dict]:
        scored = ray.get(self.rollout.score.remote(rows))
        if self.job.cfg.udm.enabled:
            self.udm = ray.get(self.rollout.udm_report.remote())  # logged with the round
        return scored

    def update(self, rows: list[dict]) -> dict:
        """The rows to the workers (Parquet under the run), their update, then the new weights to the rollout."""
        r = self.r
        path, weights = f"{self.root}/scored/round={r}.parquet", f"{self.root}/policy/round={r}"
        write_parquet(rows, path)
        ray.get(self.group.channel.post.remote(r, {"kind": "round", "rows": path, "weights": weights}))
        done = self.group.wait(self.group.channel.result.remote(r), f"round {r}'s update")
        done["load_s"] = ray.get(self.rollout.load_policy.remote(weights))
        self.use_weights(weights)
        self.step = int(done["step"])
        return done

    def use_weights(self, weights: str) -> None:
        """The rollout generates from `weights` now: the previous export is removed."""
        if self.weights and self.weights != weights:
            fs, p = fsspec.core.url_to_fs(self.weights)
            if fs.exists(p):
                fs.rm(p, recursive=True)
        self.weights = weights

    def abort(self) -> None:
        self.group.abort()
