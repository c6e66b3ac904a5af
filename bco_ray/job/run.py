"""A whole bco-ray job, driver side, stage by stage:
checks (config, data, models: bco_ray/job/checks.py) → Ray and preflight → MLflow run → precompute pass →
train (Ray Train: bco_ray/job/train_stage.py) → collect the model → generation eval (if asked) → publish (model card,
MLflow model, hub) → plots. `jobs/bco.py` is a thin command line around `run_job`."""

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

import fsspec
import mlflow
import ray
import ray.data
from mlflow.tracking import MlflowClient

from bco_ray.config.schema import Config
from bco_ray.console import console
from bco_ray.errors import InputError, TrainingError
from bco_ray.eval.pipeline import generation_eval
from bco_ray.job import signals
from bco_ray.job.checks import (  # noqa: F401 - ModelError, ResourcesUnavailableError, resolve_paths: re-exported
    ModelError,
    ResourcesUnavailableError,
    check_cluster_fits,
    check_resources,
    resolve_paths,
    run_checks,
    unavailable_error,
)
from bco_ray.job.context import Job, Phases
from bco_ray.job.preflight import check_shared_paths
from bco_ray.job.resources import usable_cpus
from bco_ray.job.train_stage import Trained, train
from bco_ray.precompute.pipeline import Paths, PrecomputeResult, run_precompute
from bco_ray.precompute.sizing import PassResources
from bco_ray.tracking import hub, mlflow_inputs, mlflow_model, mlflow_run, model_card
from bco_ray.train.snapshots import list_snapshots, remove_snapshots

log = logging.getLogger("bco_ray")


def init_ray(cfg: Config) -> bool:
    """Join the cluster this job runs in (`ray job submit` sets RAY_ADDRESS; its runtime env applies), or one
    started with `ray start` on this machine, else start a local Ray (returns True then). Workers get the
    MLflow URI explicitly in their config, so nothing else needs to travel in the environment."""
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
    # real ones; the pass and the workers size themselves to what there is (bco_ray/job/resources.py).
    local = {"address": "local", "num_cpus": usable_cpus()}
    address = os.environ.get("RAY_ADDRESS")
    if address == "local":  # RAY_ADDRESS=local: always a fresh local Ray, even if a cluster runs here
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


@dataclass
class JobResult:
    """What `run_job` returns; also written as <output_dir>/runs/<run_name>/result.json."""

    model_dir: str  # the trained model, Hugging Face format
    precompute_dir: str  # the precompute cache entry the run trained on
    precompute_reused: bool
    checkpoint: str  # Ray Train's final checkpoint
    final: dict  # rank 0's final record: step, delta, eval/*, timings
    out_dir: str  # <output_dir>/runs/<run_name>
    run_id: str = ""  # the MLflow run
    tracking_uri: str = ""
    run_name: str = ""
    seconds: float = 0.0  # the whole job
    timings: dict[str, float] = field(default_factory=dict)  # time/<phase>

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_job(cfg: Config) -> JobResult:
    """Run the job: checks → Ray → MLflow run → precompute → train → publish. Returns the MLflow run, output
    locations and final metrics. SIGTERM or SIGINT stops it: training stops, the MLflow run is KILLED and
    `signals.Interrupted` is raised."""
    t0 = time.time()
    phases = Phases()
    checked = run_checks(cfg)  # before any Ray work: bad config values, rows or models fail here
    cfg = checked.cfg
    run_name = cfg.mlflow.run_name or time.strftime("bco-%Y%m%d-%H%M%S")
    if cfg.mlflow.run_name:
        _refuse_finished(cfg, run_name)
    phases.lap("checks")
    res, n_nodes = _start_ray(cfg, checked.paths, phases)
    out_dir = Path(cfg.output_dir) / "runs" / run_name
    out_dir.mkdir(parents=True, exist_ok=True)
    with signals.stop_signals():  # after ray.init(), which makes SIGTERM a sys.exit
        uri, run_id, resumed = mlflow_run.open_run(cfg, run_name)
        console(
            f"[bco-ray] MLflow run {run_id} ({'resumed' if resumed else 'new'}) in experiment "
            f"'{cfg.mlflow.experiment}' at {uri}\n[bco-ray]   view it: {mlflow_run.view_hint(uri, run_id)}\n"
            f"[bco-ray] storage: cache {cfg.precompute.cache_dir}, checkpoints {cfg.train.storage_path}, "
            f"outputs {cfg.output_dir} ({n_nodes} node{'s' if n_nodes != 1 else ''})"
        )
        job = Job(cfg, checked.paths, checked.data_report, res, run_name, out_dir, uri, run_id, phases)
        result = _tracked(job)
    result = dataclasses.replace(
        result,
        run_id=run_id,
        tracking_uri=uri,
        run_name=run_name,
        seconds=round(time.time() - t0, 1),
        timings=phases.seconds,
    )
    (out_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    console(
        f"[bco-ray] done in {result.seconds} s ({phases.line()}): model at {result.model_dir}, outputs in {out_dir}"
    )
    return result


def _refuse_finished(cfg: Config, run_name: str) -> None:
    """A run name that FINISHED is not trained again (nor logged as a second MLflow run of the same name)."""
    done = mlflow_run.finished_run(cfg, run_name)
    if done is not None:
        raise InputError(
            f"mlflow.run_name '{run_name}' finished already (MLflow run {done.info.run_id} in experiment "
            f"'{cfg.mlflow.experiment}'; its model: {Path(cfg.output_dir) / 'runs' / run_name / 'model'}). "
            f"To train again, give the job another --mlflow.run_name (e.g. {run_name}-2)"
        )


def _tracked(job: Job) -> JobResult:
    """The pipeline inside the MLflow run, which ends FINISHED, KILLED (a signal) or FAILED (with the error)."""
    try:
        mlflow_run.set_tags(mlflow_run.ray_tags())  # job id, submission id, dashboard URL
        result = _pipeline(job)
    except KeyboardInterrupt as e:
        stop = signals.interrupted(e)
        mlflow_run.close_run("KILLED", f"{type(stop).__name__}: {stop}")
        raise stop from e
    except BaseException as e:
        mlflow_run.close_run("FAILED", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
        raise
    mlflow_run.close_run("FINISHED")
    return result


def _start_ray(cfg: Config, paths: Paths, phases: Phases) -> tuple[PassResources, int]:
    """Join or start Ray, check the cluster can run the job, and that every path is visible from every node.
    Returns the pass's resources and the number of nodes."""
    local = init_ray(cfg)
    phases.lap("ray_start")
    check_resources(cfg, local)
    res = check_cluster_fits(cfg, local)
    # Nothing is written before this: on a multi-node cluster every path must be visible from every node.
    n_nodes = check_shared_paths(cfg, paths, mlflow_run.tracking_uri(cfg))
    phases.lap("preflight")
    return res, n_nodes


def _pipeline(job: Job) -> JobResult:
    """The stages inside the MLflow run: precompute → train → generation eval → publish → plots."""
    pre = _precompute(job)
    _log_inputs(job, pre)
    trained = train(job, pre)
    diverged = trained.final.get("diverged")
    if diverged:  # its last good checkpoint's model, if there is one, is published; then the run fails
        if trained.model_dir is not None:
            _publish(job, trained)
        _log_plots(job, pre)
        raise diverged_error(job.cfg, diverged)
    if job.cfg.eval.generate and pre.eval:  # reference vs policy completions of held-out prompts (bco_ray/eval/)
        _generation_eval(job, trained)
    _publish(job, trained)
    _log_plots(job, pre)
    mlflow.log_metrics(job.phases.seconds, step=trained.step)
    return JobResult(
        model_dir=str(trained.model_dir),
        precompute_dir=pre.dir,
        precompute_reused=pre.reused,
        checkpoint=trained.checkpoint,
        final=trained.final,
        out_dir=str(job.out_dir),
    )


def diverged_error(cfg: Config, diverged: dict) -> TrainingError:
    """The one error of a run that diverged: the step, the values, the model published (or none)."""
    t = cfg.train
    if diverged.get("checkpoint"):
        kept = f"the model of the last good checkpoint ({diverged['checkpoint']}) was saved and logged instead"
    else:
        kept = f"no model was saved: no checkpoint came before it (train.save_steps={t.save_steps})"
    return TrainingError(
        f"training diverged at step {diverged['step']} ({diverged['what']}); {kept}. Lower train.lr "
        f"(now {t.lr:g}) or train.max_grad_norm (now {t.max_grad_norm:g}), or check the data"
    )


def _precompute(job: Job) -> PrecomputeResult:
    """The Ray Data pass (reference log-probs, UDM weights), or its cache entry."""
    cfg, res = job.cfg, job.res
    try:
        pre = run_precompute(cfg, job.paths, job.data_report, res)
    except Exception as e:
        if isinstance(e, ray.exceptions.GetTimeoutError) and "starting actors" in str(e):
            p = cfg.precompute
            gpu = f", GPU: {p.num_gpus_per_actor:g}" if p.num_gpus_per_actor > 0 else ""
            asks = (
                f"actors of {{CPU: {res.actor_cpus:g}{gpu}}} (precompute.ref_actors={list(p.ref_actors)}, "
                "precompute.num_gpus_per_actor)"
            )
            raise unavailable_error(cfg, "The precompute pass", asks) from e
        raise
    job.phases.lap("precompute")
    console(f"[bco-ray] precompute {'reused' if pre.reused else 'computed'}: {pre.dir}")
    return pre


def _log_inputs(job: Job, pre: PrecomputeResult) -> None:
    """Tags, datasets (mlflow.log_input: source URI + cache-key fingerprint digest) and the pass's summary."""
    t, report = job.cfg.train, job.data_report
    gpus = int(ray.cluster_resources().get("GPU", 0))
    mlflow_run.set_tags(
        {
            "precompute.cache_key": pre.key,
            "precompute.reused": pre.reused,
            "dataset.train": report.train.fingerprint,
            "dataset.eval": report.eval.fingerprint if report.eval else None,
            "num_workers": t.num_workers,
            "num_gpus": t.num_workers if t.use_gpu else 0,
            "cluster_gpus": gpus,
        }
    )
    mlflow_inputs.log_datasets(job.cfg, report)
    mlflow_inputs.log_precompute(pre.summary)  # step 0, once per run (a resumed run keeps its first)


def _generation_eval(job: Job, trained: Trained) -> None:
    """The generation pass over step 0 (the initial policy), the snapshots the workers left and the final model;
    the snapshots are removed after it."""
    snapshots = {0: job.paths.policy, **list_snapshots(job.storage_dir), trained.step: str(trained.model_dir)}
    generation_eval(job.cfg, job.paths, job.res, {s: p for s, p in snapshots.items() if s <= trained.step})
    remove_snapshots(job.storage_dir)
    job.phases.lap("generation_eval")


def _publish(job: Job, trained: Trained) -> None:
    """Model card, the MLflow model (registered if asked), and the hub push (if asked)."""
    cfg, run_id, run_name, model_dir = job.cfg, job.run_id, job.run_name, trained.model_dir
    model_card.write_model_card(
        model_dir,
        cfg,
        mlflow_run.final_metrics(run_id, trained.final),
        run_id=run_id,
        run_name=run_name,
        data_report=job.data_report,
    )
    mlflow_model.log_model(
        str(model_dir),
        description=f"BCO policy from bco-ray run '{run_name}' ({run_id}).",
        step=trained.step,
        registered_model_name=cfg.mlflow.registered_model_name,
    )
    if cfg.hub.repo_id:
        mlflow_run.set_tags(hub.push_model(str(model_dir), cfg, f"bco-ray run {run_name} (MLflow run {run_id})"))
    job.phases.lap("log_model")


def _log_plots(job: Job, pre: PrecomputeResult) -> None:
    """Training curves and the UDM weight histogram as MLflow artifacts, and the UDM classifier."""
    tr, udm = pre.summary.train, job.cfg.udm.enabled
    mlflow_model.log_plots(
        MlflowClient(job.uri),
        job.run_id,
        tr.weight_hist if udm else None,
        title=job.run_name,
        mean_weight=tr.mean_rejected_weight,
    )
    if udm:
        mlflow.log_artifact(_local(f"{pre.dir}/classifier.json"), "udm")
    job.phases.lap("plots")


def _local(uri: str) -> str:
    """A local copy of a (possibly remote) file, for mlflow.log_artifact."""
    if "://" not in uri:
        return uri
    dst = os.path.join(tempfile.mkdtemp(), os.path.basename(uri))
    fsspec.core.url_to_fs(uri)[0].get(uri.split("://", 1)[1], dst)
    return dst
