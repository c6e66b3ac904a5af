"""What the driver hands every Ray Train worker, resolved once on the driver and received as is: no worker re-parses
or re-validates the config, or resolves a location again."""

from __future__ import annotations

from dataclasses import dataclass

from bco_ray.config.schema import Config


@dataclass(frozen=True)
class ModelLocations:
    """The policy's and tokenizer's resolved locations (builtin names already materialised) and the pad id."""

    policy: str
    tokenizer: str
    pad_id: int


@dataclass(frozen=True)
class MlflowTarget:
    """The job's MLflow run, which the workers log their step metrics to."""

    tracking_uri: str
    run_id: str
    system_metrics: bool = False


@dataclass(frozen=True)
class WorkerSpec:
    cfg: Config  # validated, locations resolved (bco_ray/job/checks.py)
    models: ModelLocations
    train_rows: int  # rows of the pass's train split: fixes the step schedule on every rank
    has_eval: bool
    storage_dir: str  # this run's checkpoints, final model and generation snapshots
    mlflow: MlflowTarget | None = None  # None: no tracking (unit tests, benches)
    fit_started_at: float = 0.0  # driver's time.time() when fit started (the worker-group start-up line)
