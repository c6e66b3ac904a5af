"""A whole bco-ray job, driver side: check inputs → Ray → MLflow run → precompute pass → Ray Train →
artifacts. `jobs/bco.py` is a thin command line around `run_job`."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
import traceback
from pathlib import Path

from bco_ray.builtin import resolve_embedder, resolve_model
from bco_ray.config import Config
from bco_ray.data.checks import check_data
from bco_ray.errors import InputError, ResourcesError
from bco_ray.models import load_tokenizer
from bco_ray.preflight import check_shared_paths
from bco_ray.resources import PassResources, pass_resources, usable_cpus
from bco_ray.storage import resolve_locations

log = logging.getLogger("bco_ray")


class ResourcesUnavailableError(ResourcesError, RuntimeError):
    """The cluster did not provide what the job asked for within train.resources_timeout_s."""


def _unavailable(cfg: Config, what: str, asks: str) -> ResourcesUnavailableError:
    import ray
    have = ray.cluster_resources()
    return ResourcesUnavailableError(
        f"{what} did not get its resources within train.resources_timeout_s={cfg.train.resources_timeout_s:g} s: "
        f"it asks for {asks}; the cluster has {have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU. "
        f"Ask for less, give the cluster node types that fit (cluster.yaml: available_node_types, max_workers), "
        f"or allow slow nodes more time (train.resources_timeout_s).")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelError(InputError, ValueError):
    """A model/tokenizer setting that cannot work: the message names the field and the fix."""


def _check_model_path(field: str, p: str) -> None:
    if "://" in p or os.path.exists(p):
        return
    if p.startswith((".", "/", "~")) or not _HUB_ID.match(p):
        raise ModelError(f"{field}: {p!r} does not exist; give a local model directory or a hub id like org/name")


def resolve_paths(cfg: Config):
    """Model locations (builtin names materialised), checked before any Ray work: paths exist, the tokenizer
    loads and has a pad token, and policy and reference share one vocabulary."""
    from transformers import AutoConfig

    from bco_ray.precompute.pipeline import Paths
    m = cfg.model
    models_dir = str(Path(cfg.output_dir).resolve() / "models")
    policy = resolve_model(m.policy, models_dir)
    reference = resolve_model(m.reference, models_dir) if m.reference else policy
    tokenizer = resolve_model(m.tokenizer, models_dir) if m.tokenizer else policy
    for field, p in (("model.policy", policy), ("model.reference", reference), ("model.tokenizer", tokenizer)):
        _check_model_path(field, p)
    try:
        tok = load_tokenizer(tokenizer, m.revision, m.trust_remote_code)
        vocab = {f: AutoConfig.from_pretrained(p, revision=m.revision, trust_remote_code=m.trust_remote_code)
                 .vocab_size for f, p in (("model.policy", policy), ("model.reference", reference))}
    except OSError as e:
        raise ModelError(f"model: cannot load {e}".splitlines()[0] + " (check model.policy / model.reference / "
                         "model.tokenizer, and hub access or HF_HUB_OFFLINE)") from e
    if vocab["model.policy"] != vocab["model.reference"]:
        raise ModelError(f"model.policy has a vocabulary of {vocab['model.policy']} tokens but model.reference has "
                         f"{vocab['model.reference']}: BCO compares their log-probs token by token, so both must "
                         "use the same tokenizer (give a reference fine-tuned from the same base as the policy)")
    if len(tok) > vocab["model.policy"]:
        raise ModelError(f"model.tokenizer has {len(tok)} tokens, more than model.policy's vocabulary of "
                         f"{vocab['model.policy']}; use the policy's own tokenizer")
    from bco_ray.models import ModelLoadError, check_model_loads
    for field, p in {"model.policy": policy, "model.reference": reference}.items():
        if field == "model.reference" and reference == policy:
            continue
        try:    # built on the meta device: an attention setting the model refuses fails here, not in an actor
            check_model_loads(p, m.revision, m.trust_remote_code, m.attn_implementation)
        except ModelLoadError as e:
            raise ModelError(f"{field}: {e}") from e
    embedder = resolve_embedder(cfg.udm.embedding_model) if cfg.udm.enabled else None
    if embedder is not None:
        _check_model_path("udm.embedding_model", embedder)
    if cfg.udm.enabled and cfg.udm.embedding_func:      # a pickle: loaded only as BCOTrainer wrote it
        from bco_ray.precompute.embedding_func import EmbeddingFuncError, check_embedding_func
        try:
            check_embedding_func(cfg.udm.embedding_func)
        except EmbeddingFuncError as e:
            raise ModelError(str(e)) from e
    if cfg.eval.generate and cfg.eval.verifier:         # the verifier imports here, before any Ray work
        from bco_ray.eval.generation import VerifierError, load_verifier
        try:
            load_verifier(cfg.eval.verifier)
        except VerifierError as e:
            raise ModelError(str(e)) from e
    return Paths(policy=policy, reference=reference, tokenizer=tokenizer, embedder=embedder,
                 pad_id=tok.pad_token_id), tok


def check_resources(cfg: Config, started_locally: bool) -> None:
    """GPUs asked for where there are none: an error now, not a job waiting forever. On a cluster that
    may autoscale, GPU nodes can appear later, so the check applies to a Ray this job started itself."""
    import ray
    wants = cfg.train.use_gpu or cfg.precompute.num_gpus_per_actor > 0
    if wants and started_locally and not ray.cluster_resources().get("GPU"):
        raise ModelError("train.use_gpu / precompute.num_gpus_per_actor ask for GPUs but this Ray has none; "
                         "set --train.use_gpu=false --precompute.num_gpus_per_actor=0, or submit to a GPU cluster")


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


def check_cluster_fits(cfg: Config, started_locally: bool) -> PassResources:
    """Size the pass to the cluster, and fail now, naming what is missing, when the training worker group can
    never fit: a cluster with CPUs that cannot grow (a local Ray, or a fixed cluster) with fewer CPUs than
    train.num_workers × train.cpus_per_worker. A cluster with no CPUs yet (an autoscaling head) may grow."""
    import ray
    t = cfg.train
    cpus = ray.cluster_resources().get("CPU", 0.0)
    can_grow = cpus == 0 and not started_locally
    need = t.num_workers * t.cpus_per_worker
    if not can_grow and need > cpus + 1e-9:
        raise ResourcesUnavailableError(
            f"the Ray Train worker group needs {t.num_workers} × {t.cpus_per_worker:g} CPU = {need:g} CPU "
            f"(train.num_workers × train.cpus_per_worker) but this cluster has {cpus:g} CPU and cannot grow; "
            f"lower train.num_workers or train.cpus_per_worker (e.g. --train.cpus_per_worker={cpus / t.num_workers:g}), "
            "or run on a larger cluster")
    return pass_resources(cpus, cfg.precompute.ref_actors[1], can_grow)


def run_job(cfg: Config) -> dict:
    """Run the job; returns a dict with the MLflow run, output locations and final metrics."""
    from bco_ray.tracking import mlflow_run
    t0 = time.time()
    phases = Phases()
    cfg = resolve_locations(cfg)                          # output/cache/checkpoints: never in the job's upload
    data_report = check_data(cfg)                         # before any Ray work: bad rows fail here
    paths, tok = resolve_paths(cfg)
    from bco_ray.tracking.hub import HubError, check_push_ready
    try:
        check_push_ready(cfg)                             # hub.repo_id needs HF_TOKEN: say so before any work
    except HubError as e:
        raise ModelError(str(e)) from e
    run_name = cfg.mlflow.run_name or time.strftime("bco-%Y%m%d-%H%M%S")
    phases.lap("checks")
    local = init_ray(cfg)
    phases.lap("ray_start")
    check_resources(cfg, local)
    res = check_cluster_fits(cfg, local)
    # Nothing is written before this: on a multi-node cluster every path must be visible from every node.
    n_nodes = check_shared_paths(cfg, paths, mlflow_run.tracking_uri(cfg))
    phases.lap("preflight")
    out_dir = Path(cfg.output_dir) / "runs" / run_name
    out_dir.mkdir(parents=True, exist_ok=True)
    uri, run_id, resumed = mlflow_run.open_run(cfg, run_name)
    print(f"[bco-ray] MLflow run {run_id} ({'resumed' if resumed else 'new'}) in experiment "
          f"'{cfg.mlflow.experiment}' at {uri}\n[bco-ray]   view it: {mlflow_run.view_hint(uri, run_id)}\n"
          f"[bco-ray] storage: cache {cfg.precompute.cache_dir}, checkpoints {cfg.train.storage_path}, "
          f"outputs {cfg.output_dir} ({n_nodes} node{'s' if n_nodes != 1 else ''})", flush=True)
    try:
        mlflow_run.set_tags(mlflow_run.ray_tags())      # job id, submission id, dashboard URL
        result = _pipeline(cfg, paths, run_name, out_dir, uri, run_id, data_report, res, phases)
    except KeyboardInterrupt:
        mlflow_run.close_run("KILLED", "interrupted")
        raise
    except BaseException as e:
        mlflow_run.close_run("FAILED", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
        raise
    mlflow_run.close_run("FINISHED")
    result.update(run_id=run_id, tracking_uri=uri, run_name=run_name, seconds=round(time.time() - t0, 1),
                  timings=phases.seconds)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"[bco-ray] done in {result['seconds']} s ({phases.line()}): model at {result['model_dir']}, "
          f"outputs in {out_dir}", flush=True)
    return result


def _pipeline(cfg, paths, run_name, out_dir, uri, run_id, data_report, res: PassResources, phases: Phases) -> dict:
    import mlflow
    import ray
    import ray.data
    from mlflow.tracking import MlflowClient
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from bco_ray.precompute.pipeline import run_precompute
    from bco_ray.tracking import mlflow_run
    from bco_ray.train.loop import train_loop_per_worker

    t = cfg.train
    labels = data_report["train"]["labels"]
    try:
        pre = run_precompute(cfg, paths, {True: labels["true"], False: labels["false"]}, res)
    except Exception as e:
        if isinstance(e, ray.exceptions.GetTimeoutError) and "starting actors" in str(e):
            p = cfg.precompute
            gpu = f", GPU: {p.num_gpus_per_actor:g}" if p.num_gpus_per_actor > 0 else ""
            raise _unavailable(cfg, "The precompute pass", f"actors of {{CPU: {res.actor_cpus:g}{gpu}}} "
                               f"(precompute.ref_actors={list(p.ref_actors)}, precompute.num_gpus_per_actor)") from e
        raise
    phases.lap("precompute")
    print(f"[bco-ray] precompute {'reused' if pre.reused else 'computed'}: {pre.dir}", flush=True)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    mlflow_run.set_tags({"precompute.cache_key": pre.key, "precompute.reused": pre.reused,
                         "dataset.train": data_report["train"]["fingerprint"],
                         "dataset.eval": (data_report.get("eval") or {}).get("fingerprint"),
                         "num_workers": t.num_workers, "num_gpus": t.num_workers if t.use_gpu else 0,
                         "cluster_gpus": gpus})
    mlflow_run.log_datasets(cfg, data_report)       # mlflow.log_input: source URI + cache-key fingerprint digest
    tr = pre.summary["train"]
    mlflow_run.log_precompute(pre.summary)          # step 0, once per run (a resumed run keeps its first)

    # Progress bars of the per-worker shards would interleave in the job log; the pass above keeps its own.
    ray.data.DataContext.get_current().enable_progress_bars = False
    # The workers hold the CPUs while their shards stream in: the light Parquet reads that feed them ask for
    # no CPU, or on a cluster the workers fill they would wait forever behind the workers that wait for them.
    datasets = {"train": ray.data.read_parquet(pre.train, ray_remote_args={"num_cpus": 0})}
    if pre.eval:
        datasets["eval"] = ray.data.read_parquet(pre.eval, ray_remote_args={"num_cpus": 0})
    storage = t.storage_path
    t_fit = time.time()              # the worker group's start is measured from here (time/train_start)
    # How long the worker group's placement group may stay pending (autoscaling included); Ray Train
    # passes the variable on from this driver to its controller.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(t.resources_timeout_s)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "policy_path": paths.policy, "tokenizer_path": paths.tokenizer,
                           "pad_id": paths.pad_id, "train_rows": tr["rows"], "has_eval": bool(pre.eval),
                           "mlflow": {"tracking_uri": uri, "run_id": run_id,
                                      "system_metrics": cfg.mlflow.log_system_metrics},
                           "storage_dir": f"{storage}/{run_name}", "fit_started_at": t_fit},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             # A worker group that does not start within RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
                             # is retried train.max_failures times, then fails the run (Ray's default: forever).
                             failure_config=FailureConfig(max_failures=t.max_failures,
                                                          controller_failure_limit=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             worker_runtime_env={"env_vars": mlflow_run.worker_env(uri)}),
        datasets=datasets,
        # Not split by Ray Data (whose streaming split hands blocks to whichever worker asks first): every
        # worker reads the ordered split and takes its own rows of each global batch, so a resumed epoch
        # replays exactly the rows the interrupted one had not trained (bco_ray/train/loop.py: rank_batches).
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError
    phases.lap("publish_precompute")
    try:
        result = trainer.fit()
    except ControllerError as e:
        if isinstance(e.controller_failure, WorkerGroupStartupTimeoutError):
            gpu = ", GPU: 1" if t.use_gpu else ""
            raise _unavailable(cfg, "The Ray Train worker group", f"{t.num_workers} × {{CPU: {t.cpus_per_worker:g}{gpu}}} "
                               "(train.num_workers, train.cpus_per_worker, train.use_gpu)") from e
        raise
    final_ckpt = result.checkpoint
    phases.lap("fit")
    with final_ckpt.as_directory() as d:
        model_dir = out_dir / "model"
        if not model_dir.exists():
            import shutil
            tmp = Path(tempfile.mkdtemp(dir=out_dir))
            shutil.copytree(Path(d) / "model", tmp / "model")
            os.replace(tmp / "model", model_dir)
            tmp.rmdir()
        final = json.loads((Path(d) / "final.json").read_text())
    worker = final.get("timings", {})        # measured by rank 0: engine ready, training, evaluation, save
    if "engine_ready_at" in worker:
        phases.seconds["time/train_start"] = round(worker["engine_ready_at"] - t_fit, 2)
    for k in ("train", "eval", "save"):
        if k in worker:
            phases.seconds[f"time/{k}"] = round(worker[k], 2)
    phases.lap("collect_model")
    if cfg.eval.generate and pre.eval:      # reference vs policy completions of held-out prompts (bco_ray/eval/)
        from bco_ray.eval.pipeline import generation_eval
        generation_eval(cfg, paths, res, f"{storage}/{run_name}", str(model_dir), int(final.get("step", 0)))
        phases.lap("generation_eval")
    from bco_ray.tracking import hub, model_card
    model_card.write_model_card(model_dir, cfg, mlflow_run.final_metrics(run_id, final), run_id=run_id,
                                run_name=run_name, data_report=data_report)
    mlflow_run.log_model(str(model_dir), description=f"BCO policy from bco-ray run '{run_name}' ({run_id}).",
                         step=int(final.get("step", 0)), registered_model_name=cfg.mlflow.registered_model_name)
    if cfg.hub.repo_id:
        mlflow_run.set_tags(hub.push_model(str(model_dir), cfg, f"bco-ray run {run_name} (MLflow run {run_id})"))
    phases.lap("log_model")
    mlflow_run.log_plots(MlflowClient(uri), run_id, tr["weight_hist"] if cfg.udm.enabled else None, title=run_name,
                         mean_weight=tr["mean_rejected_weight"])
    if cfg.udm.enabled:
        mlflow.log_artifact(_local(f"{pre.dir}/classifier.json"), "udm")
    phases.lap("plots")
    mlflow.log_metrics(phases.seconds, step=int(final.get("step", 0)))
    return {"model_dir": str(model_dir), "precompute_dir": pre.dir, "precompute_reused": pre.reused,
            "checkpoint": final_ckpt.path, "final": final, "out_dir": str(out_dir)}


def _local(uri: str) -> str:
    """A local copy of a (possibly remote) file, for mlflow.log_artifact."""
    import fsspec
    if "://" not in uri:
        return uri
    dst = os.path.join(tempfile.mkdtemp(), os.path.basename(uri))
    fsspec.core.url_to_fs(uri)[0].get(uri.split("://", 1)[1], dst)
    return dst
