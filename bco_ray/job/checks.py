"""The driver's checks before any Ray work: models and tokenizer load and agree, GPUs and CPUs asked for exist,
and `run_checks` (config locations → data → models → hub settings) as the job's first stage."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import ray
from transformers import AutoConfig

from bco_ray.builtin import resolve_embedder, resolve_model
from bco_ray.config.schema import Config, ConfigError
from bco_ray.data.checks import DataReport, check_data
from bco_ray.errors import InputError, ResourcesError
from bco_ray.eval.generation import VerifierError, load_verifier
from bco_ray.job.locations import resolve_locations
from bco_ray.models import ModelLoadError, Paths, check_model_loads, load_tokenizer
from bco_ray.precompute.embedding_func import EmbeddingFuncError, check_embedding_func
from bco_ray.precompute.sizing import PassResources, pass_resources
from bco_ray.remote import local_model_dir, missing_model_files
from bco_ray.storage import is_remote, local_path
from bco_ray.tracking.hub import HubError, check_push_ready


class ResourcesUnavailableError(ResourcesError, RuntimeError):
    """The cluster did not provide what the job asked for within train.resources_timeout_s."""


def unavailable_error(cfg: Config, what: str, asks: str) -> ResourcesUnavailableError:
    have = ray.cluster_resources()
    return ResourcesUnavailableError(
        f"{what} did not get its resources within train.resources_timeout_s={cfg.train.resources_timeout_s:g} s: "
        f"it asks for {asks}; the cluster has {have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU. "
        f"Ask for less, give the cluster node types that fit (cluster.yaml: available_node_types, max_workers), "
        f"or allow slow nodes more time (train.resources_timeout_s)."
    )


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelError(InputError, ValueError):
    """A model/tokenizer setting that cannot work: the message names the field and the fix."""


def _check_model_path(field: str, p: str) -> None:
    if is_remote(p):  # object storage: a model directory there holds a config.json (a tokenizer's, its own)
        needed = ("config.json", "tokenizer_config.json") if field == "model.tokenizer" else ("config.json",)
        why = missing_model_files(p, needed)
        if why:
            raise ModelError(
                f"{field}: {p!r}: {why}; give the URI of a directory holding a Hugging Face model "
                "(config.json, weights, tokenizer files), a local directory or a hub id like org/name"
            )
        return
    if "://" in p or os.path.exists(p):
        return
    if p.startswith((".", "/", "~")) or not _HUB_ID.match(p):
        raise ModelError(f"{field}: {p!r} does not exist; give a local model directory or a hub id like org/name")


def resolve_paths(cfg: Config):
    """Model locations (builtin names materialised), checked before any Ray work: paths exist, the tokenizer
    loads and has a pad token, and policy and reference share one vocabulary."""
    m = cfg.model
    models_dir = str(Path(cfg.output_dir).resolve() / "models")
    policy = resolve_model(m.policy, models_dir)
    reference = resolve_model(m.reference, models_dir) if m.reference else policy
    tokenizer = resolve_model(m.tokenizer, models_dir) if m.tokenizer else policy
    for field, p in (("model.policy", policy), ("model.reference", reference), ("model.tokenizer", tokenizer)):
        _check_model_path(field, p)
    try:
        tok = load_tokenizer(tokenizer, m.revision, m.trust_remote_code)
        vocab = {
            f: AutoConfig.from_pretrained(
                local_model_dir(p, weights=False), revision=m.revision, trust_remote_code=m.trust_remote_code
            ).vocab_size
            for f, p in (("model.policy", policy), ("model.reference", reference))
        }
    except OSError as e:
        raise ModelError(
            f"model: cannot load {e}".splitlines()[0] + " (check model.policy / model.reference / "
            "model.tokenizer, and hub access or HF_HUB_OFFLINE)"
        ) from e
    if vocab["model.policy"] != vocab["model.reference"]:
        raise ModelError(
            f"model.policy has a vocabulary of {vocab['model.policy']} tokens but model.reference has "
            f"{vocab['model.reference']}: BCO compares their log-probs token by token, so both must "
            "use the same tokenizer (give a reference fine-tuned from the same base as the policy)"
        )
    if len(tok) > vocab["model.policy"]:
        raise ModelError(
            f"model.tokenizer has {len(tok)} tokens, more than model.policy's vocabulary of "
            f"{vocab['model.policy']}; use the policy's own tokenizer"
        )
    _check_models_build(cfg, policy, reference)
    embedder = resolve_embedder(cfg.udm.embedding_model) if cfg.udm.enabled else None
    _check_udm_and_verifier(cfg, embedder)
    return Paths(
        policy=policy, reference=reference, tokenizer=tokenizer, embedder=embedder, pad_id=tok.pad_token_id
    ), tok


def _check_models_build(cfg: Config, policy: str, reference: str) -> None:
    """Policy and reference build on the meta device with the asked attention (a setting the model refuses
    fails here, not in an actor)."""
    m = cfg.model
    for field, p in {"model.policy": policy, "model.reference": reference}.items():
        if field == "model.reference" and reference == policy:
            continue
        try:
            check_model_loads(p, m.revision, m.trust_remote_code, m.attn_implementation)
        except ModelLoadError as e:
            raise ModelError(f"{field}: {e}") from e


def _check_udm_and_verifier(cfg: Config, embedder: str | None) -> None:
    """The UDM embedding model exists, an embedding-func pickle is the one BCOTrainer wrote, the verifier
    imports."""
    if embedder is not None:
        _check_model_path("udm.embedding_model", embedder)
    if cfg.udm.enabled and cfg.udm.embedding_func:  # a pickle: loaded only as BCOTrainer wrote it
        try:
            check_embedding_func(cfg.udm.embedding_func)
        except EmbeddingFuncError as e:
            raise ModelError(str(e)) from e
    if cfg.eval.generate and cfg.eval.verifier:  # the verifier imports here, before any Ray work
        try:
            load_verifier(cfg.eval.verifier)
        except VerifierError as e:
            raise ModelError(str(e)) from e


def check_resources(cfg: Config, started_locally: bool) -> None:
    """GPUs asked for where there are none: an error now, not a job waiting forever. On a cluster that
    may autoscale, GPU nodes can appear later, so the check applies to a Ray this job started itself."""
    wants = cfg.train.use_gpu or cfg.precompute.num_gpus_per_actor > 0
    if wants and started_locally and not ray.cluster_resources().get("GPU"):
        raise ModelError(
            "train.use_gpu / precompute.num_gpus_per_actor ask for GPUs but this Ray has none; "
            "set --train.use_gpu=false --precompute.num_gpus_per_actor=0, or submit to a GPU cluster"
        )


def check_cluster_fits(cfg: Config, started_locally: bool) -> PassResources:
    """Size the pass to the cluster, and fail now, naming what is missing, when the training worker group can
    never fit: a cluster with CPUs that cannot grow (a local Ray, or a fixed cluster) with fewer CPUs than
    train.num_workers × train.cpus_per_worker. A cluster with no CPUs yet (an autoscaling head) may grow."""
    t = cfg.train
    cpus = ray.cluster_resources().get("CPU", 0.0)
    can_grow = cpus == 0 and not started_locally
    need = t.num_workers * t.cpus_per_worker
    if not can_grow and need > cpus + 1e-9:
        raise ResourcesUnavailableError(
            f"the Ray Train worker group needs {t.num_workers} × {t.cpus_per_worker:g} CPU = {need:g} CPU "
            f"(train.num_workers × train.cpus_per_worker) but this cluster has {cpus:g} CPU and cannot grow; "
            f"lower train.num_workers or train.cpus_per_worker "
            f"(e.g. --train.cpus_per_worker={cpus / t.num_workers:g}), "
            "or run on a larger cluster"
        )
    return pass_resources(cpus, cfg.precompute.ref_actors[1], can_grow)


def _store_dir(uri: str) -> str | None:
    """The local directory of a file-based MLflow store (sqlite:///dir/mlflow.db, file:///dir), else None."""
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///") :].split("?")[0]
        return os.path.dirname(db) if db and db != ":memory:" else None
    return urlparse(uri).path if uri.startswith("file:") else None


def _unusable(path: str) -> str | None:
    """Why the job cannot create or write the directory `path` (nothing is created here), else None."""
    p = os.path.abspath(os.path.expanduser(path))
    existing = p
    while not os.path.lexists(existing):  # the nearest part that exists: the job creates the rest
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} exists and is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user" + (
            f" (the job would create {p} in it)" if existing != p else ""
        )
    return None


def check_local_dirs(cfg: Config) -> None:
    """The local directories the job writes (output_dir, the precompute cache, the checkpoints, a file-based
    MLflow store) can be created or written: else one error naming the field and the fix, before any Ray work.
    `cfg` has its locations resolved; object-store URIs are left to the multi-node preflight."""
    from bco_ray.tracking.mlflow_run import tracking_uri

    uri = tracking_uri(cfg)
    dirs = {
        "output_dir": cfg.output_dir,
        "precompute.cache_dir": cfg.precompute.cache_dir,
        "train.storage_path": cfg.train.storage_path,
        "mlflow.tracking_uri": _store_dir(uri),
    }
    for field, path in dirs.items():
        if not path or is_remote(path):
            continue
        why = _unusable(local_path(path))
        if why:
            store = field == "mlflow.tracking_uri"
            fix = "sqlite:///<dir>/mlflow.db (or set $MLFLOW_TRACKING_URI)" if store else "<dir>"
            raise ConfigError(
                f"{field}={uri if store else path}: {why}; set --{field}={fix} with a <dir> you can write "
                "(an existing directory, or a new one inside one)"
            )


@dataclass
class Checked:
    """What the checks stage hands on, resolved once and taken as given by every later stage: the config with
    its locations resolved, the data report, the models' locations."""

    cfg: Config
    data_report: DataReport
    paths: Paths


def run_checks(cfg: Config, hub: bool = True) -> Checked:
    """Every check a job makes before it starts Ray: config locations (resolved here, the one time a job resolves
    them; local directories usable), data (bad rows fail here), models, and hub settings (hub.repo_id needs
    HF_TOKEN: say so before any work; `hub=False`: a precompute-only command, which pushes nothing)."""
    cfg = resolve_locations(cfg)  # output/cache/checkpoints: never in the job's upload
    check_local_dirs(cfg)
    data_report = check_data(cfg)
    paths, _ = resolve_paths(cfg)
    if hub:
        try:
            check_push_ready(cfg)
        except HubError as e:
            raise ModelError(str(e)) from e
    return Checked(cfg, data_report, paths)
