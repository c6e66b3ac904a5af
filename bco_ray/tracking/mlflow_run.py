"""The job's MLflow run, owned by the driver: created (or resumed by run name), params and tags, and a terminal
status (FINISHED / FAILED / KILLED). What goes into it: bco_ray/tracking/mlflow_inputs.py (datasets, the
precompute summary) and bco_ray/tracking/mlflow_model.py (the model, plots).

Where runs go: `mlflow.tracking_uri` in the config, else `$MLFLOW_TRACKING_URI`, else a SQLite store
`mlflow.db` beside the outputs (bco_ray/storage.py). Relative local stores are made absolute, so Ray workers
(whose working directory is not the driver's) write into the same store; on a cluster, point it at an
`mlflow server`. An experiment a job creates in a SQLite store keeps its artifacts (plots, models) in
`mlartifacts/<experiment>` beside the database, never in the job's working directory (MLflow's default,
`./mlruns`, would be inside the directory `ray job submit` uploads, which Ray deletes).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from bco_ray.config.schema import Config
from bco_ray.errors import InputError
from bco_ray.storage import in_job_working_dir, is_remote, local_path, resolve_output_dir
from bco_ray.tracking.driver_runs import (  # noqa: F401 - ERROR_TAG, ERROR_TYPE_TAG: re-exported
    DRIVER_TAG,
    ERROR_TAG,
    ERROR_TYPE_TAG,
    close_stale_runs,
    driver_state,
    driver_tags,
)
from bco_ray.tracking.run_tags import git_commit, git_tags, ray_tags, version_tags  # noqa: F401

log = logging.getLogger(__name__)

try:  # MLflow's own limits, with its 3.x values as fallback
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH
except ImportError:  # pragma: no cover
    MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH = 250, 6000, 8000
MAX_PARAM_LEN = MAX_PARAM_VAL_LENGTH
TRUNCATED = "…[truncated; full value in config.yaml]"
ARTIFACTS_DIR = "mlartifacts"  # beside a SQLite store, as `mlflow server` names its default
# MLflow client settings (and the system-metrics sampling) handed to Ray Train workers with the tracking URI
# (see `worker_env`). Credentials (MLFLOW_TRACKING_TOKEN / _USERNAME / _PASSWORD) are deliberately not among
# them: a worker runtime env is shown in Ray's dashboard and state export. Set those in the nodes' own
# environment, never in the committed configs/runtime_env.yaml (docs/cluster.md).
_CLIENT_ENV = (
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL",
    "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING",
)


# ------------------------------------------------------------------------------------------ where runs go
def normalize_uri(uri: str) -> str:
    """Local stores as absolute URIs: `sqlite:///rel.db` → `sqlite:////abs/rel.db`, `mlruns` → `file:///abs/mlruns`."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rest = uri[len("sqlite:///") :]
        path, q, query = rest.partition("?")
        if path and path != ":memory:":
            return f"sqlite:///{Path(path).resolve()}{q}{query}"
        return uri
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return Path(uri[len("file:") :]).resolve().as_uri()
    if uri in ("databricks", "databricks-uc", "uc"):  # MLflow's names for Databricks-hosted tracking
        return uri
    if "://" not in uri and ":" not in uri.split("/")[0]:
        return Path(uri).resolve().as_uri()  # a bare path: MLflow's file store
    return uri


def tracking_uri(cfg: Config) -> str:
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    # Default: a SQLite file next to the outputs (bco_ray/storage.py): never inside a submitted job's upload.
    return normalize_uri(uri) if uri else f"sqlite:///{resolve_output_dir('mlflow.db')}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` store (None for any other store, or an in-memory one)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].partition("?")[0]
    return Path(path) if path and path != ":memory:" else None


def artifact_root(uri: str) -> str | None:
    """Where the experiments a job creates keep their artifacts: `mlartifacts` beside a SQLite store's database.
    None for other stores: a file store keeps them inside itself, a tracking server decides (its
    `--artifacts-destination` / `--default-artifact-root`)."""
    db = sqlite_path(uri)
    return str(db.resolve().parent / ARTIFACTS_DIR) if db else None


def _experiment_dir(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"


def set_experiment(client: MlflowClient, uri: str, name: str):
    """The experiment `name`, made the active one; created with its artifacts beside a SQLite store. An existing
    experiment whose artifacts are inside a job's uploaded working directory gets a warning naming the fix."""
    exp = client.get_experiment_by_name(name)
    root = artifact_root(uri)
    if exp is None and root:
        try:
            client.create_experiment(name, artifact_location=str(Path(root) / _experiment_dir(name)))
        except mlflow.exceptions.MlflowException:  # another job created it meanwhile
            pass
    elif (
        exp is not None
        and not is_remote(exp.artifact_location)
        and in_job_working_dir(local_path(exp.artifact_location))
    ):
        log.warning(
            "MLflow experiment '%s' keeps its artifacts (plots, models) in %s, inside a working directory Ray "
            "uploaded for a job: Ray deletes it, and the runs would point at files that are gone. Fix: rename the "
            "experiment (MlflowClient('%s').rename_experiment('%s', '%s-old')) so that the next job creates '%s' "
            "anew with its artifacts in %s, or use another --mlflow.experiment",
            name,
            exp.artifact_location,
            uri,
            exp.experiment_id,
            name,
            name,
            root or "the tracking server's artifact store",
        )
    return mlflow.set_experiment(name)


def worker_env(uri: str) -> dict[str, str]:
    """Environment for Ray Train workers (`RunConfig(worker_runtime_env={"env_vars": ...})`): the driver's
    tracking URI and its MLflow client settings (TLS, retries), so a worker on any node logs where the driver does."""
    env = {k: os.environ[k] for k in _CLIENT_ENV if os.environ.get(k)}
    env["MLFLOW_TRACKING_URI"] = uri
    return env


def view_hint(uri: str, run_id: str) -> str:
    """How to look at the run: its page on a tracking server, or the `mlflow ui` command for a local store."""
    if uri.startswith(("http://", "https://")):
        exp_id = MlflowClient(uri).get_run(run_id).info.experiment_id
        return f"open {uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {uri}"


# --------------------------------------------------------------------------------------------- tags
def set_tags(tags: dict) -> None:
    mlflow.set_tags({k[:MAX_ENTITY_KEY_LENGTH]: str(v)[:MAX_TAG_VAL_LENGTH] for k, v in tags.items() if v is not None})


# ------------------------------------------------------------------------------------------- params
def _param_value(v: Any) -> str:
    if v is None:
        return "None"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, default=str)
    return str(v)


def config_params(cfg: Config) -> dict[str, str]:
    """The resolved config, flattened (`train.lr`, `udm.enabled`, ...), within MLflow's limits: values longer
    than a param may hold are truncated with a marker (config.yaml has them whole)."""
    out = {}
    for k, v in cfg.flat().items():
        s = _param_value(v)
        if len(s) > MAX_PARAM_VAL_LENGTH:
            s = s[: MAX_PARAM_VAL_LENGTH - len(TRUNCATED)] + TRUNCATED
        out[k[:MAX_ENTITY_KEY_LENGTH]] = s
    return out


def config_yaml(cfg: Config) -> str:
    """The resolved config as plain YAML (tuples as lists), loadable by `load_config`."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False)


# ------------------------------------------------------------------------------------------ lifecycle
def _clip(s: str, n: int = 80) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _latest(client: MlflowClient, experiment_id: str, run_name: str):
    quote = "'" if "'" not in run_name else '"'
    found = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.run_name = {quote}{run_name}{quote}",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def _find_unfinished(client: MlflowClient, experiment_id: str, run_name: str):
    latest = _latest(client, experiment_id, run_name)
    if latest is None or latest.info.status == "FINISHED":
        return None
    if latest.info.status == "RUNNING" and driver_state(latest.data.tags) == "alive":
        raise InputError(
            f"MLflow run '{run_name}' ({latest.info.run_id}) is still running, driven by process "
            f"{latest.data.tags[DRIVER_TAG]}: stop that job first (ray job stop, or kill the process), or give "
            "this one another --mlflow.run_name"
        )
    return latest


def finished_run(cfg: Config, run_name: str):
    """The latest MLflow run named `run_name` in the config's experiment if it FINISHED, else None. Reads the
    store only if it exists (nothing is created before the job's checks are done)."""
    uri = tracking_uri(cfg)
    db = sqlite_path(uri)
    if (db is not None and not db.exists()) or uri.startswith("file:") and not Path(local_path(uri)).exists():
        return None
    client = MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name(cfg.mlflow.experiment)
        latest = _latest(client, exp.experiment_id, run_name) if exp is not None else None
    except Exception as e:  # noqa: BLE001 - a store that cannot be read now fails the job where it opens its run
        log.warning("could not look up MLflow run '%s' at %s: %s", run_name, uri, e)
        return None
    return latest if latest is not None and latest.info.status == "FINISHED" else None


def open_run(cfg: Config, run_name: str) -> tuple[str, str, bool]:
    """(tracking uri, run id, resumed). The latest run of this name in the experiment is continued when it did
    not finish (FAILED, KILLED, or RUNNING after its driver died): its params stay, its steps are not logged
    twice; one whose driver still runs is an error. RUNNING runs of this output directory whose driver died are
    marked KILLED first. The run is tagged with this driver (bco_ray/tracking/driver_runs.py)."""
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = set_experiment(client, uri, cfg.mlflow.experiment)
    params = config_params(cfg)
    close_stale_runs(client, exp.experiment_id, params.get("output_dir", ""))
    previous = _find_unfinished(client, exp.experiment_id, run_name)
    system = cfg.mlflow.log_system_metrics
    if previous is not None:
        run = mlflow.start_run(run_id=previous.info.run_id, log_system_metrics=system)
        run_id = run.info.run_id
        set_tags(driver_tags())
        for tag in (ERROR_TAG, ERROR_TYPE_TAG):  # the failure it had is history now
            if tag in previous.data.tags:
                client.delete_tag(run_id, tag)
        old = previous.data.params
        missing = {k: v for k, v in params.items() if k not in old}
        if missing:
            mlflow.log_params(missing)
        # The URI may come from the config once and from $MLFLOW_TRACKING_URI the next time: same store, not a change.
        changed = sorted(k for k, v in params.items() if k in old and old[k] != v and k != "mlflow.tracking_uri")
        attempts = int(previous.data.tags.get("resume.count", "0")) + 1
        tags = {"resume.count": attempts, "resume.previous_status": previous.info.status}
        if changed:
            # MLflow params cannot change: the run keeps the first values, the new ones are here and in the config.
            log.warning(
                "resuming MLflow run %s with a changed config (%s); its params keep the first values",
                run_id,
                ", ".join(changed),
            )
            tags["resume.changed_params"] = ", ".join(f"{k}: {_clip(old[k])} -> {_clip(params[k])}" for k in changed)
            mlflow.log_text(config_yaml(cfg), f"config.resume-{attempts}.yaml")
        set_tags(tags)
        return uri, run_id, True
    run = mlflow.start_run(run_name=run_name, log_system_metrics=system)
    set_tags(driver_tags())
    mlflow.log_params(params)
    mlflow.log_text(config_yaml(cfg), "config.yaml")
    try:
        set_tags(version_tags())
    except Exception as e:  # tags are nice to have; never fail a job over them
        log.warning("could not collect version tags: %s", e)
    return uri, run.info.run_id, False


def close_run(status: str = "FINISHED", error: str | None = None) -> None:
    """End the active run with `status`; with an error, its text (`error`) and type (`error_type`) as tags.
    For a failing job this runs while the job's own exception propagates: a tracking server that cannot be
    reached now is logged, not raised, so that the job's error stays the one reported."""
    active = mlflow.active_run()
    if active is None:
        return
    try:
        if error:
            mlflow.set_tags({ERROR_TAG: error[:MAX_TAG_VAL_LENGTH], ERROR_TYPE_TAG: error.split(":", 1)[0][:200]})
        mlflow.end_run(status=status)
    except Exception as e:  # noqa: BLE001
        if status == "FINISHED":
            raise
        log.error(
            "could not mark MLflow run %s as %s (it may stay RUNNING; re-running the job continues it): %s",
            active.info.run_id,
            status,
            e,
        )
