"""The training stage of a job, driver side: Ray Train's TorchTrainer over the precompute pass's Parquet output
(the workers: bco_ray/train/), its fit, and the final model copied into the run's outputs."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray.data
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2.api.exceptions import ControllerError

from bco_ray.config.schema import Config
from bco_ray.job import signals
from bco_ray.job.checks import unavailable_error
from bco_ray.job.context import Job
from bco_ray.precompute.pipeline import PrecomputeResult
from bco_ray.tracking.mlflow_run import worker_env
from bco_ray.train import hooks
from bco_ray.train.spec import MlflowTarget, ModelLocations, WorkerSpec


@dataclass
class Trained:
    model_dir: Path | None  # None: the run diverged before its first checkpoint
    final: dict  # rank 0's final.json; `diverged` in it: the step, why, and the checkpoint the model is from
    checkpoint: str
    history: list[dict] = field(default_factory=list)  # every point rank 0 logged, {"step": s, **metrics}, in order

    @property
    def step(self) -> int:
        return int(self.final.get("step", 0))


def train(job: Job, pre: PrecomputeResult) -> Trained:
    """Ray Train + DeepSpeed on the pass's output, then the final model copied into the run's outputs."""
    # Progress bars of the per-worker shards would interleave in the job log; the pass above keeps its own.
    ray.data.DataContext.get_current().enable_progress_bars = False
    t_fit = time.time()  # the worker group's start is measured from here (time/train_start)
    trainer = _trainer(job, pre, t_fit)
    job.phases.lap("publish_precompute")
    final_ckpt = _fit(job.cfg, trainer).checkpoint
    job.phases.lap("fit")
    trained = collect_model(job, final_ckpt)
    worker = trained.final.get("timings", {})  # measured by rank 0: engine ready, training, evaluation, save
    if worker.get("engine_ready_at", 0) < t_fit:  # a finished run's final model reported again: not this fit's
        worker = {}
    if "engine_ready_at" in worker:
        job.phases.seconds["time/train_start"] = round(worker["engine_ready_at"] - t_fit, 2)
    for k in ("train", "eval", "save"):
        if k in worker:
            job.phases.seconds[f"time/{k}"] = round(worker[k], 2)
    job.phases.lap("collect_model")
    return trained


class _Trainer(TorchTrainer):
    """A TorchTrainer whose fit stops at once on SIGTERM as on Ctrl-C. Ray Train's own SIGINT handler (installed
    by fit through this hook) aborts the controller gracefully, giving the workers up to 5 s: `ray job stop`
    sends SIGKILL after 3, and the workers train (and checkpoint) meanwhile. Here either signal kills the
    controller, whose workers and placement group go with it (they are its own), then raises
    `signals.Interrupted` in the driver (bco_ray/job/signals.py)."""

    def _register_sigint_handler(self, controller) -> None:
        signals.install(before=lambda: ray.kill(controller, no_restart=True))


def _trainer(job: Job, pre: PrecomputeResult, t_fit: float) -> TorchTrainer:
    """The TorchTrainer of bco_ray/train/loop.py's workers, reading the pass's Parquet output."""
    # The workers' code imports DeepSpeed (slow, chatty): only once a job trains, not wherever bco_ray.job.run is.
    from bco_ray.train.loop import train_loop_per_worker

    # The workers hold the CPUs while their shards stream in: the light Parquet reads that feed them ask for
    # no CPU, or on a cluster the workers fill they would wait forever behind the workers that wait for them.
    datasets = {"train": ray.data.read_parquet(pre.train, num_cpus=0)}
    if pre.eval:
        datasets["eval"] = ray.data.read_parquet(pre.eval, num_cpus=0)
    return _Trainer(
        train_loop_per_worker,
        train_loop_config={"spec": _spec(job, pre, t_fit)},
        **worker_group(job),
        datasets=datasets,
        # Not split by Ray Data (whose streaming split hands blocks to whichever worker asks first): every
        # worker reads the ordered split and takes its own rows of each global batch, so a resumed epoch
        # replays exactly the rows the interrupted one had not trained (bco_ray/train/batching.py: rank_batches).
        dataset_config=DataConfig(datasets_to_split=[]),
    )


def worker_group(job: Job) -> dict:
    """The TorchTrainer settings of a job's worker group (the offline job's and the online job's): its size and
    resources, gloo or NCCL, the run's storage, checkpoints and failures, the workers' environment."""
    t = job.cfg.train
    # How long the worker group's placement group may stay pending (autoscaling included); Ray Train
    # passes the variable on from this driver to its controller.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(t.resources_timeout_s)
    # The controller sees the workers finish at its next poll (Ray's default: every 2 s, so 1 s late on average);
    # a poll is one small remote call per worker. A missed poll only fails a worker after 10 minutes.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    per_worker = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    return dict(
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=job.run_name,
            storage_path=t.storage_path,
            # A worker group that does not start within RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
            # is retried train.max_failures times, then fails the run (Ray's default: forever).
            failure_config=FailureConfig(max_failures=t.max_failures, controller_failure_limit=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            # Test/diagnostic hooks (bco_ray/train/hooks.py) reach the workers through their environment.
            worker_runtime_env={"env_vars": {**worker_env(job.uri), **hooks.env_for_workers()}},
        ),
    )


def _spec(job: Job, pre: PrecomputeResult, t_fit: float) -> WorkerSpec:
    """What every worker receives as is: the resolved config and locations, the pass's row count, the run."""
    paths = job.paths
    return WorkerSpec(
        cfg=job.cfg,
        models=ModelLocations(policy=paths.policy, tokenizer=paths.tokenizer, pad_id=paths.pad_id),
        train_rows=pre.summary.train.rows,
        has_eval=bool(pre.eval),
        storage_dir=job.storage_dir,
        mlflow=MlflowTarget(job.uri, job.run_id, job.cfg.mlflow.log_system_metrics),
        fit_started_at=t_fit,
    )


def _fit(cfg: Config, trainer: TorchTrainer):
    """trainer.fit(); a worker group that never got its resources becomes a ResourcesUnavailableError."""
    t = cfg.train
    try:
        with signals.kept():  # the job's handlers again after fit (bco_ray/job/signals.py)
            return trainer.fit()
    except ControllerError as e:
        # Ray exports no public class for a worker group that did not start in time: matched by its name
        # (tests/test_cluster.py's resources test fails if Ray renames it).
        if type(e.controller_failure).__name__ == "WorkerGroupStartupTimeoutError":
            gpu = ", GPU: 1" if t.use_gpu else ""
            asks = (
                f"{t.num_workers} × {{CPU: {t.cpus_per_worker:g}{gpu}}} "
                "(train.num_workers, train.cpus_per_worker, train.use_gpu)"
            )
            raise unavailable_error(cfg, "The Ray Train worker group", asks) from e
        raise


def collect_model(job: Job, final_ckpt) -> Trained:
    """The final checkpoint's model, copied whole into <out_dir>/model (once), and its final.json."""
    with final_ckpt.as_directory() as d:
        model_dir = job.out_dir / "model"
        if not (Path(d) / "model").is_dir():  # a run that diverged before any checkpoint
            model_dir = None
        elif not model_dir.exists():
            tmp = Path(tempfile.mkdtemp(dir=job.out_dir))
            shutil.copytree(Path(d) / "model", tmp / "model")
            os.replace(tmp / "model", model_dir)
            tmp.rmdir()
        final = json.loads((Path(d) / "final.json").read_text())
    history = final.pop("history", [])
    return Trained(model_dir, final, final_ckpt.path, history)
