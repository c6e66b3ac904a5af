"""A whole bco-ray job, driver side, stage by stage:
checks (config, data, models, locations resolved once: bco_ray/job/checks.py) → Ray and preflight → the tracker's run
(MLflow: bco_ray/tracking/tracker.py) → precompute pass → train (Ray Train: bco_ray/job/train_stage.py) → collect the
model → generation eval (if asked) → publish (model card, model, hub) → plots. `jobs/bco.py` is a thin command line
around `run_job`."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import ray
import ray.data

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
from bco_ray.models import Paths
from bco_ray.precompute.pipeline import PrecomputeResult, run_precompute
from bco_ray.precompute.sizing import PassResources
from bco_ray.tracking import hub, model_card
from bco_ray.tracking.history import card_metrics, entry, precompute_metrics
from bco_ray.tracking.run_tags import ray_tags
from bco_ray.tracking.tracker import MlflowTracker, Tracker
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


T = TypeVar("T")


@dataclass
class JobResult:
    """What `run_job` returns; also written as <output_dir>/runs/<run_name>/result.json."""

    model_dir: str  # the trained model, Hugging Face format
    precompute_dir: str  # the precompute cache entry the run trained on
    precompute_reused: bool
    checkpoint: str  # Ray Train's final checkpoint
    final: dict  # rank 0's final record: step, delta, eval/*, timings
    out_dir: str  # <output_dir>/runs/<run_name>
    # What the job logged, step by step: [{"step": s, **metrics}] (bco_ray/tracking/history.py): the pass's
    # summary (step 0), rank 0's train and eval records, the generation eval, the phase timings (last step).
    history: list[dict] = field(default_factory=list)
    paths: Paths | None = None  # the models' locations the job resolved (what the API's evaluate() loads)
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
    cfg = checked.cfg  # resolved once: every stage below takes it as given
    tracker = MlflowTracker(cfg)
    run_name = cfg.mlflow.run_name or time.strftime("bco-%Y%m%d-%H%M%S")
    if cfg.mlflow.run_name:
        refuse_finished(cfg, tracker, run_name)
    phases.lap("checks")
    res, n_nodes = _start_ray(cfg, checked.paths, tracker, phases)
    out_dir = Path(cfg.output_dir) / "runs" / run_name
    out_dir.mkdir(parents=True, exist_ok=True)
    with signals.stop_signals():  # after ray.init(), which makes SIGTERM a sys.exit
        resumed = tracker.start(run_name)
        console(
            f"[bco-ray] MLflow run {tracker.run_id} ({'resumed' if resumed else 'new'}) in experiment "
            f"'{cfg.mlflow.experiment}' at {tracker.uri}\n[bco-ray]   view it: {tracker.view_hint()}\n"
            f"[bco-ray] storage: cache {cfg.precompute.cache_dir}, checkpoints {cfg.train.storage_path}, "
            f"outputs {cfg.output_dir} ({n_nodes} node{'s' if n_nodes != 1 else ''})"
        )
        job = Job(cfg, checked.paths, checked.data_report, res, run_name, out_dir, tracker, phases)
        result = tracked(job, lambda: _pipeline(job))
    result = dataclasses.replace(
        result,
        paths=checked.paths,
        run_id=tracker.run_id,
        tracking_uri=tracker.uri,
        run_name=run_name,
        seconds=round(time.time() - t0, 1),
        timings=phases.seconds,
    )
    (out_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    console(
        f"[bco-ray] done in {result.seconds} s ({phases.line()}): model at {result.model_dir}, outputs in {out_dir}"
    )
    return result


def refuse_finished(cfg: Config, tracker: Tracker, run_name: str) -> None:
    """A run name that FINISHED is not trained again (nor logged as a second MLflow run of the same name)."""
    done = tracker.finished_run(run_name)
    if done is not None:
        raise InputError(
            f"mlflow.run_name '{run_name}' finished already (MLflow run {done} in experiment "
            f"'{cfg.mlflow.experiment}'; its model: {Path(cfg.output_dir) / 'runs' / run_name / 'model'}). "
            f"To train again, give the job another --mlflow.run_name (e.g. {run_name}-2)"
        )


def tracked(job: Job, body: Callable[[], T]) -> T:
    """`body()` inside the tracker's run, which ends FINISHED, KILLED (a signal) or FAILED (with the error); the
    offline pipeline's and the online job's rounds."""
    try:
        result = body()
    except KeyboardInterrupt as e:
        stop = signals.interrupted(e)
        job.tracker.finish("KILLED", f"{type(stop).__name__}: {stop}")
        raise stop from e
    except BaseException as e:
        job.tracker.finish("FAILED", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
        raise
    job.tracker.finish("FINISHED")
    return result


def _start_ray(cfg: Config, paths: Paths, tracker: Tracker, phases: Phases) -> tuple[PassResources, int]:
    """Join or start Ray, check the cluster can run the job, and that every path is visible from every node.
    Returns the pass's resources and the number of nodes."""
    local = init_ray(cfg)
    phases.lap("ray_start")
    check_resources(cfg, local)
    res = check_cluster_fits(cfg, local)
    # Nothing is written before this: on a multi-node cluster every path must be visible from every node.
    n_nodes = check_shared_paths(cfg, paths, tracker.uri)
    phases.lap("preflight")
    return res, n_nodes


def _pipeline(job: Job) -> JobResult:
    """The stages inside the MLflow run: precompute → train → generation eval → publish → plots."""
    job.tracker.set_tags(ray_tags())  # job id, submission id, dashboard URL
    pre = _precompute(job)
    _log_inputs(job, pre)
    trained = train(job, pre)
    job.history.extend(trained.history)  # rank 0's train and eval records
    diverged = trained.final.get("diverged")
    if diverged:  # its last good checkpoint's model, if there is one, is published; then the run fails
        if trained.model_dir is not None:
            publish_model(job, trained)
        _log_plots(job, pre)
        raise diverged_error(job.cfg, diverged)
    if job.cfg.eval.generate and pre.eval:  # reference vs policy completions of held-out prompts (bco_ray/eval/)
        _generation_eval(job, trained)
    publish_model(job, trained)
    _log_plots(job, pre)
    job.log_metrics(job.phases.seconds, step=trained.step)
    return JobResult(
        model_dir=str(trained.model_dir),
        precompute_dir=pre.dir,
        precompute_reused=pre.reused,
        checkpoint=trained.checkpoint,
        final=trained.final,
        out_dir=str(job.out_dir),
        history=sorted(job.history, key=lambda e: e["step"]),  # stable: a step's entries in the order logged
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
    """Tags, datasets (source URI + cache-key fingerprint digest) and the pass's summary (also the history's
    step 0)."""
    t, report = job.cfg.train, job.data_report
    gpus = int(ray.cluster_resources().get("GPU", 0))
    job.tracker.set_tags(
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
    job.tracker.log_inputs(report, pre.summary)
    job.history.append(entry(0, precompute_metrics(pre.summary)))


def _generation_eval(job: Job, trained: Trained) -> None:
    """The generation pass over step 0 (the initial policy), the snapshots the workers left and the final model;
    the snapshots are removed after it."""
    snapshots = {0: job.paths.policy, **list_snapshots(job.storage_dir), trained.step: str(trained.model_dir)}
    asked = {s: p for s, p in snapshots.items() if s <= trained.step}
    metrics = generation_eval(job.cfg, job.paths, job.res, asked, job.tracker)
    job.history.extend(entry(step, m) for step, m in sorted(metrics.items()))
    remove_snapshots(job.storage_dir)
    job.phases.lap("generation_eval")


def publish_model(job: Job, trained: Trained) -> None:
    """Model card (its metrics from the job's history), the model (registered if asked), and the hub push (if
    asked)."""
    cfg, run_id, run_name, model_dir = job.cfg, job.run_id, job.run_name, trained.model_dir
    model_card.write_model_card(
        model_dir,
        cfg,
        card_metrics(job.history, trained.final),
        run_id=run_id,
        run_name=run_name,
        data_report=job.data_report,
    )
    job.tracker.log_model(
        str(model_dir), description=f"BCO policy from bco-ray run '{run_name}' ({run_id}).", step=trained.step
    )
    if cfg.hub.repo_id:
        job.tracker.set_tags(hub.push_model(str(model_dir), cfg, f"bco-ray run {run_name} (MLflow run {run_id})"))
    job.phases.lap("log_model")


def _log_plots(job: Job, pre: PrecomputeResult) -> None:
    """Training curves and the UDM weight histogram (figures), and the UDM classifier, into the tracker's run."""
    tr, udm = pre.summary.train, job.cfg.udm.enabled
    job.tracker.log_figures(tr.weight_hist if udm else None, title=job.run_name, mean_weight=tr.mean_rejected_weight)
    if udm:
        job.tracker.log_artifact(f"{pre.dir}/classifier.json", "udm")
    job.phases.lap("plots")
