"""A whole bco-ray job, driver side, stage by stage:
checks (config, data, models: bco_ray/job_checks.py) → Ray and preflight → MLflow run → precompute pass →
train (Ray Train) → collect the model → generation eval (if asked) → publish (model card, MLflow model, hub) →
plots. `jobs/bco.py` is a thin command line around `run_job`."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bco_ray.config import Config
from bco_ray.job_checks import (  # noqa: F401 - ModelError, ResourcesUnavailableError, resolve_paths: re-exported
    ModelError,
    ResourcesUnavailableError,
    check_cluster_fits,
    check_resources,
    resolve_paths,
    run_checks,
    unavailable_error,
)
from bco_ray.preflight import check_shared_paths
from bco_ray.resources import PassResources, usable_cpus

if TYPE_CHECKING:
    from bco_ray.data.checks import DataReport
    from bco_ray.precompute.pipeline import Paths, PrecomputeResult

log = logging.getLogger("bco_ray")


def init_ray(cfg: Config) -> bool:
    """Join the cluster this job runs in (`ray job submit` sets RAY_ADDRESS; its runtime env applies), or one
    started with `ray start` on this machine, else start a local Ray (returns True then). Workers get the
    MLflow URI explicitly in their config, so nothing else needs to travel in the environment."""
    import ray
    import ray.data
    # Set whether or not this process joined Ray already (a notebook may have called ray.init):
    # Ray 2.60's new Parquet datasource (v2) spends ~10 s per read listing files, even for one small
    # local file; the v1 reader does the same work in well under a second. The context travels with
    # every dataset this driver builds.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    # The pass's actor pools wait at most train.resources_timeout_s for their first actors (Ray Data's
    # default, -1, waits forever for resources an autoscaler may never provide).
    ray.data.DataContext.get_current().wait_for_min_actors_s = max(1, math.ceil(cfg.train.resources_timeout_s))
    # Same config, same data order: the union of the train and eval reads must not depend on which read
    # finishes first, and every training worker must see the split in one order (exact resume).
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    if ray.is_initialized():
        return False
    # A local Ray gets the CPUs this process may use (affinity, cgroup quota): never more logical CPUs than
    # real ones; the pass and the workers size themselves to what there is (bco_ray/resources.py).
    local = {"address": "local", "num_cpus": usable_cpus()}
    address = os.environ.get("RAY_ADDRESS")
    if address == "local":     # RAY_ADDRESS=local: always a fresh local Ray, even if a cluster runs here
        ray.init(**local)
        return True
    if address:
        ray.init()
        return False
    try:
        ray.init(address="auto")
        return False
    except ConnectionError:
        ray.init(**local)
        return True


class Phases:
    """Wall time of each phase of a job (`time/<phase>` metrics and the final line)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.time()

    def lap(self, name: str) -> None:
        now = time.time()
        self.seconds[f"time/{name}"] = round(now - self._t, 2)
        self._t = now

    def line(self) -> str:
        return ", ".join(f"{k.split('/', 1)[1]} {v:.1f}" for k, v in self.seconds.items())


@dataclass
class JobResult:
    """What `run_job` returns; also written as <output_dir>/runs/<run_name>/result.json."""
    model_dir: str                 # the trained model, Hugging Face format
    precompute_dir: str            # the precompute cache entry the run trained on
    precompute_reused: bool
    checkpoint: str                # Ray Train's final checkpoint
    final: dict                    # rank 0's final record: step, delta, eval/*, timings
    out_dir: str                   # <output_dir>/runs/<run_name>
    run_id: str = ""               # the MLflow run
    tracking_uri: str = ""
    run_name: str = ""
    seconds: float = 0.0           # the whole job
    timings: dict[str, float] = field(default_factory=dict)    # time/<phase>

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class _Job:
    """What the stages after the checks share."""
    cfg: Config
    paths: Paths
    data_report: DataReport
    res: PassResources
    run_name: str
    out_dir: Path
    uri: str
    run_id: str
    phases: Phases

    @property
    def storage_dir(self) -> str:          # this run's checkpoints, final model and generation snapshots
        return f"{self.cfg.train.storage_path}/{self.run_name}"


@dataclass
class _Trained:
    model_dir: Path
    final: dict                    # rank 0's final.json
    checkpoint: str

    @property
    def step(self) -> int:
        return int(self.final.get("step", 0))


def run_job(cfg: Config) -> JobResult:
    """Run the job: checks → Ray → MLflow run → precompute → train → publish. Returns the MLflow run, output
    locations and final metrics."""
    from bco_ray.tracking import mlflow_run
    t0 = time.time()
    phases = Phases()
    checked = run_checks(cfg)                 # before any Ray work: bad config values, rows or models fail here
    cfg = checked.cfg
    run_name = cfg.mlflow.run_name or time.strftime("bco-%Y%m%d-%H%M%S")
    phases.lap("checks")
    res, n_nodes = _start_ray(cfg, checked.paths, phases)
    out_dir = Path(cfg.output_dir) / "runs" / run_name
    out_dir.mkdir(parents=True, exist_ok=True)
    uri, run_id, resumed = mlflow_run.open_run(cfg, run_name)
    print(f"[bco-ray] MLflow run {run_id} ({'resumed' if resumed else 'new'}) in experiment "
          f"'{cfg.mlflow.experiment}' at {uri}\n[bco-ray]   view it: {mlflow_run.view_hint(uri, run_id)}\n"
          f"[bco-ray] storage: cache {cfg.precompute.cache_dir}, checkpoints {cfg.train.storage_path}, "
          f"outputs {cfg.output_dir} ({n_nodes} node{'s' if n_nodes != 1 else ''})", flush=True)
    job = _Job(cfg, checked.paths, checked.data_report, res, run_name, out_dir, uri, run_id, phases)
    try:
        mlflow_run.set_tags(mlflow_run.ray_tags())      # job id, submission id, dashboard URL
        result = _pipeline(job)
    except KeyboardInterrupt:
        mlflow_run.close_run("KILLED", "interrupted")
        raise
    except BaseException as e:
        mlflow_run.close_run("FAILED", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
        raise
    mlflow_run.close_run("FINISHED")
    result = dataclasses.replace(result, run_id=run_id, tracking_uri=uri, run_name=run_name,
                                 seconds=round(time.time() - t0, 1), timings=phases.seconds)
    (out_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    print(f"[bco-ray] done in {result.seconds} s ({phases.line()}): model at {result.model_dir}, "
          f"outputs in {out_dir}", flush=True)
    return result


def _start_ray(cfg: Config, paths: Paths, phases: Phases) -> tuple[PassResources, int]:
    """Join or start Ray, check the cluster can run the job, and that every path is visible from every node.
    Returns the pass's resources and the number of nodes."""
    from bco_ray.tracking import mlflow_run
    local = init_ray(cfg)
    phases.lap("ray_start")
    check_resources(cfg, local)
    res = check_cluster_fits(cfg, local)
    # Nothing is written before this: on a multi-node cluster every path must be visible from every node.
    n_nodes = check_shared_paths(cfg, paths, mlflow_run.tracking_uri(cfg))
    phases.lap("preflight")
    return res, n_nodes


def _pipeline(job: _Job) -> JobResult:
    """The stages inside the MLflow run: precompute → train → generation eval → publish → plots."""
    import mlflow
    pre = _precompute(job)
    _log_inputs(job, pre)
    trained = _train(job, pre)
    if job.cfg.eval.generate and pre.eval:   # reference vs policy completions of held-out prompts (bco_ray/eval/)
        from bco_ray.eval.pipeline import generation_eval
        generation_eval(job.cfg, job.paths, job.res, job.storage_dir, str(trained.model_dir), trained.step)
        job.phases.lap("generation_eval")
    _publish(job, trained)
    _log_plots(job, pre)
    mlflow.log_metrics(job.phases.seconds, step=trained.step)
    return JobResult(model_dir=str(trained.model_dir), precompute_dir=pre.dir, precompute_reused=pre.reused,
                     checkpoint=trained.checkpoint, final=trained.final, out_dir=str(job.out_dir))


def _precompute(job: _Job) -> PrecomputeResult:
    """The Ray Data pass (reference log-probs, UDM weights), or its cache entry."""
    import ray

    from bco_ray.precompute.pipeline import run_precompute
    cfg, res = job.cfg, job.res
    try:
        pre = run_precompute(cfg, job.paths, job.data_report.train.labels.by_label(), res)
    except Exception as e:
        if isinstance(e, ray.exceptions.GetTimeoutError) and "starting actors" in str(e):
            p = cfg.precompute
            gpu = f", GPU: {p.num_gpus_per_actor:g}" if p.num_gpus_per_actor > 0 else ""
            asks = (f"actors of {{CPU: {res.actor_cpus:g}{gpu}}} (precompute.ref_actors={list(p.ref_actors)}, "
                    "precompute.num_gpus_per_actor)")
            raise unavailable_error(cfg, "The precompute pass", asks) from e
        raise
    job.phases.lap("precompute")
    print(f"[bco-ray] precompute {'reused' if pre.reused else 'computed'}: {pre.dir}", flush=True)
    return pre


def _log_inputs(job: _Job, pre: PrecomputeResult) -> None:
    """Tags, datasets (mlflow.log_input: source URI + cache-key fingerprint digest) and the pass's summary."""
    import ray

    from bco_ray.tracking import mlflow_run
    t, report = job.cfg.train, job.data_report
    gpus = int(ray.cluster_resources().get("GPU", 0))
    mlflow_run.set_tags({"precompute.cache_key": pre.key, "precompute.reused": pre.reused,
                         "dataset.train": report.train.fingerprint,
                         "dataset.eval": report.eval.fingerprint if report.eval else None,
                         "num_workers": t.num_workers, "num_gpus": t.num_workers if t.use_gpu else 0,
                         "cluster_gpus": gpus})
    mlflow_run.log_datasets(job.cfg, report)
    mlflow_run.log_precompute(pre.summary)          # step 0, once per run (a resumed run keeps its first)


def _train(job: _Job, pre: PrecomputeResult) -> _Trained:
    """Ray Train + DeepSpeed on the pass's output, then the final model copied into the run's outputs."""
    import ray.data
    # Progress bars of the per-worker shards would interleave in the job log; the pass above keeps its own.
    ray.data.DataContext.get_current().enable_progress_bars = False
    t_fit = time.time()              # the worker group's start is measured from here (time/train_start)
    trainer = _trainer(job, pre, t_fit)
    job.phases.lap("publish_precompute")
    final_ckpt = _fit(job.cfg, trainer).checkpoint
    job.phases.lap("fit")
    trained = _collect_model(job, final_ckpt)
    worker = trained.final.get("timings", {})        # measured by rank 0: engine ready, training, evaluation, save
    if "engine_ready_at" in worker:
        job.phases.seconds["time/train_start"] = round(worker["engine_ready_at"] - t_fit, 2)
    for k in ("train", "eval", "save"):
        if k in worker:
            job.phases.seconds[f"time/{k}"] = round(worker[k], 2)
    job.phases.lap("collect_model")
    return trained


def _trainer(job: _Job, pre: PrecomputeResult, t_fit: float):
    """The TorchTrainer of bco_ray/train/loop.py's workers, reading the pass's Parquet output."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from bco_ray.tracking import mlflow_run
    from bco_ray.train.loop import train_loop_per_worker
    cfg, t, paths = job.cfg, job.cfg.train, job.paths
    per_worker = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    # The workers hold the CPUs while their shards stream in: the light Parquet reads that feed them ask for
    # no CPU, or on a cluster the workers fill they would wait forever behind the workers that wait for them.
    datasets = {"train": ray.data.read_parquet(pre.train, ray_remote_args={"num_cpus": 0})}
    if pre.eval:
        datasets["eval"] = ray.data.read_parquet(pre.eval, ray_remote_args={"num_cpus": 0})
    # How long the worker group's placement group may stay pending (autoscaling included); Ray Train
    # passes the variable on from this driver to its controller.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(t.resources_timeout_s)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "policy_path": paths.policy, "tokenizer_path": paths.tokenizer,
                           "pad_id": paths.pad_id, "train_rows": pre.summary["train"]["rows"],
                           "has_eval": bool(pre.eval),
                           "mlflow": {"tracking_uri": job.uri, "run_id": job.run_id,
                                      "system_metrics": cfg.mlflow.log_system_metrics},
                           "storage_dir": job.storage_dir, "fit_started_at": t_fit},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=job.run_name, storage_path=t.storage_path,
                             # A worker group that does not start within RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
                             # is retried train.max_failures times, then fails the run (Ray's default: forever).
                             failure_config=FailureConfig(max_failures=t.max_failures,
                                                          controller_failure_limit=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             worker_runtime_env={"env_vars": mlflow_run.worker_env(job.uri)}),
        datasets=datasets,
        # Not split by Ray Data (whose streaming split hands blocks to whichever worker asks first): every
        # worker reads the ordered split and takes its own rows of each global batch, so a resumed epoch
        # replays exactly the rows the interrupted one had not trained (bco_ray/train/batching.py: rank_batches).
        dataset_config=DataConfig(datasets_to_split=[]),
    )


def _fit(cfg: Config, trainer):
    """trainer.fit(); a worker group that never got its resources becomes a ResourcesUnavailableError."""
    from ray.train.v2.api.exceptions import ControllerError
    t = cfg.train
    try:
        return trainer.fit()
    except ControllerError as e:
        # Ray exports no public class for a worker group that did not start in time: matched by its name
        # (tests/test_cluster.py's resources test fails if Ray renames it).
        if type(e.controller_failure).__name__ == "WorkerGroupStartupTimeoutError":
            gpu = ", GPU: 1" if t.use_gpu else ""
            asks = (f"{t.num_workers} × {{CPU: {t.cpus_per_worker:g}{gpu}}} "
                    "(train.num_workers, train.cpus_per_worker, train.use_gpu)")
            raise unavailable_error(cfg, "The Ray Train worker group", asks) from e
        raise


def _collect_model(job: _Job, final_ckpt) -> _Trained:
    """The final checkpoint's model, copied whole into <out_dir>/model (once), and its final.json."""
    with final_ckpt.as_directory() as d:
        model_dir = job.out_dir / "model"
        if not model_dir.exists():
            import shutil
            tmp = Path(tempfile.mkdtemp(dir=job.out_dir))
            shutil.copytree(Path(d) / "model", tmp / "model")
            os.replace(tmp / "model", model_dir)
            tmp.rmdir()
        final = json.loads((Path(d) / "final.json").read_text())
    return _Trained(model_dir, final, final_ckpt.path)


def _publish(job: _Job, trained: _Trained) -> None:
    """Model card, the MLflow model (registered if asked), and the hub push (if asked)."""
    from bco_ray.tracking import hub, mlflow_run, model_card
    cfg, run_id, run_name, model_dir = job.cfg, job.run_id, job.run_name, trained.model_dir
    model_card.write_model_card(model_dir, cfg, mlflow_run.final_metrics(run_id, trained.final), run_id=run_id,
                                run_name=run_name, data_report=job.data_report)
    mlflow_run.log_model(str(model_dir), description=f"BCO policy from bco-ray run '{run_name}' ({run_id}).",
                         step=trained.step, registered_model_name=cfg.mlflow.registered_model_name)
    if cfg.hub.repo_id:
        mlflow_run.set_tags(hub.push_model(str(model_dir), cfg, f"bco-ray run {run_name} (MLflow run {run_id})"))
    job.phases.lap("log_model")


def _log_plots(job: _Job, pre: PrecomputeResult) -> None:
    """Training curves and the UDM weight histogram as MLflow artifacts, and the UDM classifier."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from bco_ray.tracking import mlflow_run
    tr, udm = pre.summary["train"], job.cfg.udm.enabled
    mlflow_run.log_plots(MlflowClient(job.uri), job.run_id, tr["weight_hist"] if udm else None, title=job.run_name,
                         mean_weight=tr["mean_rejected_weight"])
    if udm:
        mlflow.log_artifact(_local(f"{pre.dir}/classifier.json"), "udm")
    job.phases.lap("plots")


def _local(uri: str) -> str:
    """A local copy of a (possibly remote) file, for mlflow.log_artifact."""
    import fsspec
    if "://" not in uri:
        return uri
    dst = os.path.join(tempfile.mkdtemp(), os.path.basename(uri))
    fsspec.core.url_to_fs(uri)[0].get(uri.split("://", 1)[1], dst)
    return dst
