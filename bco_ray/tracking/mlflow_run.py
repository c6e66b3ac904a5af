"""The job's MLflow run, owned by the driver: created (or resumed by run name), params and tags,
artifacts at the end, and a terminal status (FINISHED / FAILED / KILLED)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from bco_ray.config import Config

MAX_PARAM_LEN = 6000


def tracking_uri(cfg: Config) -> str:
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parents[2]).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def open_run(cfg: Config, run_name: str) -> tuple[str, str, bool]:
    """(tracking uri, run id, resumed): an unfinished run of the same name in the experiment is continued."""
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment(cfg.mlflow.experiment)
    client = MlflowClient(uri)
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found and found[0].info.status != "FINISHED":
        run = mlflow.start_run(run_id=found[0].info.run_id)
        return uri, run.info.run_id, True
    run = mlflow.start_run(run_name=run_name)
    params = {k: ("" if v is None else str(v))[:MAX_PARAM_LEN] for k, v in cfg.flat().items()}
    mlflow.log_params(params)
    mlflow.log_dict(cfg.to_dict(), "config.yaml")
    return uri, run.info.run_id, False


def set_tags(tags: dict) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items() if v is not None})


def version_tags() -> dict:
    import deepspeed
    import ray
    import torch
    import transformers
    return {"git_commit": git_commit(), "version.ray": ray.__version__, "version.deepspeed": deepspeed.__version__,
            "version.torch": torch.__version__, "version.transformers": transformers.__version__}


def close_run(status: str = "FINISHED", error: str | None = None) -> None:
    if mlflow.active_run() is None:
        return
    if error:
        mlflow.set_tag("error", error[:5000])
    mlflow.end_run(status=status)
