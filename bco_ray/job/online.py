"""An online BCO job, driver side (`bco-ray online`, jobs/online.py): the offline job's checks plus the online ones
(the labeler imported and tried, the prompts readable, the values in range) → Ray, and the cluster's fit for the
training workers beside the rollout actor → the tracker's run → the long-lived parts (the rollout actor, the channel
and the Ray Train worker group: bco_ray/job/online_group.py) → rounds (bco_ray/online/rounds.py's run_rounds, each
round logged as it ends) → stop: the final model collected and published as the offline job publishes it."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import ray

from bco_ray.config.schema import Config, ConfigError
from bco_ray.console import console
from bco_ray.eval import report
from bco_ray.job import signals
from bco_ray.job.checks import Checked, ResourcesUnavailableError, check_resources, run_checks, unavailable_error
from bco_ray.job.context import Job, Phases
from bco_ray.job.online_group import RayParts, WorkerGroup
from bco_ray.job.preflight import check_shared_paths
from bco_ray.job.run import init_ray, publish_model, refuse_finished, tracked
from bco_ray.job.train_stage import collect_model
from bco_ray.online.channel import STOP, Channel
from bco_ray.online.checks import check_online
from bco_ray.online.labeler import Labeler
from bco_ray.online.prompts import PromptsError, PromptSource
from bco_ray.online.rollout import Rollout
from bco_ray.online.rounds import RoundResult, run_rounds, stored_result
from bco_ray.online.store import RoundStore
from bco_ray.precompute.sizing import pass_resources
from bco_ray.tracking.history import entry
from bco_ray.tracking.tracker import MlflowTracker


@dataclass
class OnlineResult:
    """What `run_online` returns; also written as <output_dir>/runs/<run_name>/result.json."""

    model_dir: str
    final: dict  # rank 0's final record: step, delta, delta_count (rewards δ has absorbed, all rounds), rounds
    out_dir: str
    rounds: list[dict] = field(default_factory=list)  # each round run now: {"round": r, **online/*, time/round/*}
    starts: list[dict] = field(default_factory=list)  # each start of the worker group: pid, rounds_done, step
    history: list[dict] = field(default_factory=list)
    run_id: str = ""
    tracking_uri: str = ""
    run_name: str = ""
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def check_online_job(cfg: Config, labeler: Callable | None = None) -> tuple[Checked, PromptSource, Labeler]:
    """Every check before Ray: the offline job's (config, data, models, hub), then the online section's
    (`labeler`: an in-process labeler used instead of online.labeler, bco_ray/online/checks.py)."""
    checked = run_checks(cfg)
    cfg = checked.cfg
    o, t = cfg.online, cfg.train
    per_step = t.num_workers * t.micro_batch_size * t.gradient_accumulation_steps
    if o.prompts_per_round * o.samples_per_prompt < per_step:
        raise ConfigError(
            f"online.prompts_per_round × online.samples_per_prompt = {o.prompts_per_round * o.samples_per_prompt} "
            f"rows a round, fewer than one optimizer step of train.num_workers × train.micro_batch_size × "
            f"train.gradient_accumulation_steps = {per_step}; ask for more prompts or samples, or smaller steps"
        )
    if t.max_steps != -1 or t.num_epochs != 1:
        raise ConfigError(
            f"train.max_steps={t.max_steps} / train.num_epochs={t.num_epochs}: an online job's length is "
            "online.rounds (each round's rows trained once); leave train.max_steps=-1 and train.num_epochs=1"
        )
    source, labeler = check_online(cfg, labeler)
    if not isinstance(source.round(0, 1)[0], str):
        raise PromptsError(f"online.prompts {o.prompts!r} gives conversations; the online job samples text prompts")
    return checked, source, labeler


def planned_rows(o) -> int:
    """The rows the updates train on over the run (the LR schedule's length): each round's
    prompts_per_round × samples_per_prompt rows, plus the rows of up to replay_rounds previous rounds."""
    per_round = o.prompts_per_round * o.samples_per_prompt
    return sum(per_round * (1 + min(r, o.replay_rounds)) for r in range(o.rounds))


def check_online_fits(cfg: Config, started_locally: bool) -> int:
    """The training workers and the rollout actor fit the cluster together (a cluster that can grow may fit
    later); returns the rollout's torch threads."""
    t, o = cfg.train, cfg.online
    cpus = ray.cluster_resources().get("CPU", 0.0)
    can_grow = cpus == 0 and not started_locally
    need = t.num_workers * t.cpus_per_worker + o.rollout_cpus
    if not can_grow and need > cpus + 1e-9:
        raise ResourcesUnavailableError(
            f"the online job needs train.num_workers × train.cpus_per_worker + online.rollout_cpus = "
            f"{t.num_workers} × {t.cpus_per_worker:g} + {o.rollout_cpus:g} = {need:g} CPU, but this cluster has "
            f"{cpus:g} CPU and cannot grow; lower train.num_workers (e.g. --train.num_workers="
            f"{max(1, int((cpus - o.rollout_cpus) // max(t.cpus_per_worker, 1e-9)))}), train.cpus_per_worker or "
            "online.rollout_cpus, or run on a larger cluster"
        )
    # Generation and the update alternate: on a small machine the rollout computes on every CPU while it runs.
    return max(1, int(cpus)) if 0 < cpus < 3 else max(1, int(o.rollout_cpus))


def run_online(cfg: Config, labeler: Callable | None = None) -> OnlineResult:
    """Checks → Ray → the tracker's run → rounds → the final model. SIGTERM / SIGINT stop it as they stop
    `run_job` (the MLflow run KILLED, `signals.Interrupted` raised). `labeler`: a function `(prompt, completion)
    -> verdict` that labels on this driver instead of online.labeler (the Python API's reward functions)."""
    t0, phases = time.time(), Phases()
    checked, source, labeler = check_online_job(cfg, labeler)
    cfg = checked.cfg
    tracker = MlflowTracker(cfg)
    run_name = cfg.mlflow.run_name or time.strftime("online-%Y%m%d-%H%M%S")
    if cfg.mlflow.run_name:
        refuse_finished(cfg, tracker, run_name)
    phases.lap("checks")
    local = init_ray(cfg)
    phases.lap("ray_start")
    check_resources(cfg, local)
    threads = check_online_fits(cfg, local)
    check_shared_paths(cfg, checked.paths, tracker.uri)
    phases.lap("preflight")
    out_dir = Path(cfg.output_dir) / "runs" / run_name
    out_dir.mkdir(parents=True, exist_ok=True)
    res = pass_resources(ray.cluster_resources().get("CPU", 0.0), 1, not local)
    with signals.stop_signals():
        resumed = tracker.start(run_name)
        console(f"[bco-ray] MLflow run {tracker.run_id} ({'resumed' if resumed else 'new'}): {tracker.view_hint()}")
        job = Job(cfg, checked.paths, checked.data_report, res, run_name, out_dir, tracker, phases)
        result = tracked(job, lambda: _rounds(job, source, labeler, threads))
    result = dataclasses.replace(
        result, run_id=tracker.run_id, tracking_uri=tracker.uri, run_name=run_name,
        seconds=round(time.time() - t0, 1), timings=phases.seconds,
    )  # fmt: skip
    (out_dir / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2, default=str))
    console(f"[bco-ray] online done in {result.seconds} s ({phases.line()}): model at {result.model_dir}")
    return result


def _rounds(job: Job, source: PromptSource, labeler: Labeler, threads: int) -> OnlineResult:
    """The long-lived parts, the rounds, the stop and the final model."""
    cfg, o = job.cfg, job.cfg.online
    root = f"{job.storage_dir}/online"
    store = RoundStore(f"{root}/rounds")
    gpus = {"num_gpus": cfg.precompute.num_gpus_per_actor} if cfg.precompute.num_gpus_per_actor > 0 else {}
    rollout = ray.remote(Rollout).options(num_cpus=o.rollout_cpus, **gpus).remote(cfg, job.paths, threads)
    channel = Channel.remote()
    group = WorkerGroup(job, channel, planned_rows(o))
    group.start()
    parts, logged = RayParts(job, rollout, group, root), []

    def prompts_of(r: int):
        parts.at(r)
        return source.round(r, o.prompts_per_round)

    try:
        finished = _ready(job, parts, store)
        job.phases.lap("start")
        if not finished:
            run_rounds(
                o.rounds, prompts_of, parts.generate, labeler.label_batch, parts.score, parts.update, store,
                policy_step=lambda: parts.step,
                after_round=lambda res: logged.append(_log_round(job, parts, store, res)),
                samples_per_prompt=o.samples_per_prompt, replay_rounds=o.replay_rounds,
            )  # fmt: skip
            job.phases.lap("rounds")
            ray.get(channel.post.remote(o.rounds, STOP))
        fit = group.finish()
    except BaseException:
        parts.abort()
        for actor in (rollout, channel):  # not left holding their CPUs (a notebook keeps the traceback's handles)
            ray.kill(actor)
        raise
    starts = ray.get(channel.starts.remote())
    ray.kill(rollout)
    _remove(f"{root}/policy")  # the exports the rollout loaded; the final model is the run's own
    trained = collect_model(job, fit.checkpoint)
    job.history.extend(trained.history)
    publish_model(job, trained)
    job.log_metrics(job.phases.seconds, step=o.rounds)
    _log_plots(job)
    model_dir = str(trained.model_dir)
    return OnlineResult(model_dir, trained.final, str(job.out_dir), logged, starts, job.history)


def _ready(job: Job, parts: RayParts, store: RoundStore) -> bool:
    """The rollout actor and the worker group up; the store and the workers' checkpoint reconciled (a round
    checkpointed but not marked, because the job stopped in between, is marked now: not trained twice); a
    resumed group's policy loaded into the rollout. True: the run's workers had saved its final model already
    (stopped after that, before the job ended): nothing to train, the model is published again."""
    o, t = job.cfg.online, job.cfg.train
    try:
        ray.get(parts.rollout.ping.remote(), timeout=max(1.0, t.resources_timeout_s))
    except ray.exceptions.GetTimeoutError as e:
        raise unavailable_error(
            job.cfg, "The rollout actor", f"{{CPU: {o.rollout_cpus:g}}} (online.rollout_cpus)"
        ) from e
    ready = parts.group.wait(parts.group.channel.wait_ready.remote(1), "the training workers to start")
    console(f"[bco-ray] online: worker group ready {ready['at'] - parts.group.started_at:.1f} s after fit started")
    if ready.get("finished"):
        return True
    if int(ready["rounds_done"]) > o.rounds:
        raise ConfigError(
            f"online.rounds={o.rounds}, but this run (mlflow.run_name) has trained {ready['rounds_done']} rounds "
            f"already: resume it with --online.rounds={ready['rounds_done']} or more, or start a new run name"
        )
    store.reconcile(int(ready["rounds_done"]))
    if ready["policy"]:
        ray.get(parts.rollout.load_policy.remote(ready["policy"]))
        parts.use_weights(ready["policy"])
    parts.step = int(ready["step"])
    if evaluates(job.cfg) and not ready["rounds_done"] and not store.is_evaluated(0):
        _evaluate(job, parts, store, 0, job.paths.policy)  # step 0: the initial policy, where every curve starts
    for r in store.unlogged():  # stopped after the round's marker, before its metrics were all logged
        console(f"[bco-ray] online: round {r} was trained before the stop; logging its metrics now")
        weights = parts.weights if r + 1 == int(ready["rounds_done"]) else None  # the policy after round r
        _log_round(job, parts, store, stored_result(store, r), weights=weights)
    return False


def _round_metrics(parts: RayParts, res: RoundResult, live: bool) -> dict:
    """online/* and time/round/* of a round; a round logged after a resume (`live` False) has what its marker
    recorded: no wall time of the round, no update metrics if it was marked from the workers' checkpoint."""
    m, u = dict(res.metrics), res.update_metrics
    if u:
        m["time/round/update"] = u["update_s"]  # the workers' compute (run_round timed the whole exchange)
        m["time/round/sync"] = u["export_s"] + u["load_s"]
        m["time/round/checkpoint"] = u["checkpoint_s"]
        m.update({"online/delta": u["delta"], "online/policy_step": float(u["step"])})
    if live:
        m["online/empty_completions"] = float(parts.empty)  # samples left out: no text to label or train on
        m.update(parts.udm)  # udm.enabled: the classifier fitted on the rows this round trains on
        m["time/round/total"] = total = time.perf_counter() - parts.t_round
        compute = sum(m.get(f"time/round/{k}", 0.0) for k in ("generate", "label", "score", "update"))
        m["time/round/overhead"] = total - compute
    return m


def _log_round(job: Job, parts: RayParts, store: RoundStore, res: RoundResult, **resumed) -> dict:
    """The round's metrics (step = the round), its eval (when due) and its samples table into the run, then the
    round marked logged; a console line. Each part is logged once, across a stop and a resume. `resumed`: a
    round trained before a stop, logged now: {"weights": its policy's export, or None if gone}."""
    m, u = _round_metrics(parts, res, live=not resumed), res.update_metrics
    weights = resumed["weights"] if resumed else parts.weights
    last = res.round + 1 == job.cfg.online.rounds
    due = evaluates(job.cfg) and ((res.round + 1) % job.cfg.online.eval_every == 0 or last)
    if due and weights and not store.is_evaluated(res.round + 1):  # the policy after this round
        m["time/round/eval"] = _evaluate(job, parts, store, res.round + 1, weights)  # not in the round's total
    rows = res.rows
    table = {"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]}
    with signals.deferred():  # the metrics, the table and the marker land together (a stop waits for them)
        job.log_metrics(m, step=res.round)
        job.tracker.log_table(
            {**table, "label": [bool(r["label"]) for r in rows]}, f"online/samples_round_{res.round:04d}.json"
        )
        store.mark_logged(res.round)
    times = " ".join(f"{k.rsplit('/', 1)[1]} {v:.2f}" for k, v in m.items() if k.startswith("time/round/"))
    delta = f", δ {u['delta']:.4f}" if u else ""
    console(f"[bco-ray] round {res.round}: pass rate {m['online/pass_rate']:.3f}{delta}; s: {times}")
    return {"round": res.round, **m}


def evaluates(cfg: Config) -> bool:
    """The held-out generation eval runs (eval.generate, data.eval and online.eval_every > 0)."""
    return bool(cfg.eval.generate and cfg.data.eval and cfg.online.eval_every > 0)


def _evaluate(job: Job, parts: RayParts, store: RoundStore, step: int, path: str) -> float:
    """The generation eval of the policy at `path` as `step` (0: the initial policy; r + 1: after round r) on the
    rollout actor; eval/gen/* metrics and tables into the run (bco_ray/eval/report.py), then marked in the store
    (a resumed job does not log it again). Returns its seconds."""
    t0 = time.perf_counter()
    rows = ray.get(parts.rollout.evaluate.remote(step, path))
    with signals.deferred():  # the eval's metrics and tables and its marker land together
        metrics = report.log_report(job.tracker, rows) if rows else {}
        store.mark_evaluated(step)
    job.history.extend(entry(s, m) for s, m in sorted(metrics.items()))
    console(f"[bco-ray] {report.summary_line(metrics)}")
    return time.perf_counter() - t0


def _log_plots(job: Job) -> None:
    """The run's curves into its plots/ (bco_ray/tracking/plots.py), online.png among them: the pass rate and the
    held-out score of policy and reference over the rounds."""
    job.tracker.log_figures(None, title=job.run_name, mean_weight=None)
    job.phases.lap("plots")


def _remove(uri: str) -> None:
    fs, p = fsspec.core.url_to_fs(uri)
    if fs.exists(p):
        fs.rm(p, recursive=True)
