"""The job's tracker, as the driver talks to it (bco_ray/job/): one run per job, opened or resumed by name with the
config as its params, then tags, metrics at a step, files (artifacts, figures, tables), the final model, and a
terminal status. Small on purpose: MLflow is the one tracker implemented (`MlflowTracker`, over
bco_ray/tracking/mlflow_run.py, mlflow_inputs.py and mlflow_model.py); the Ray Train workers log their step
metrics into the same run themselves (bco_ray/tracking/step_logger.py). Nothing is read back from it: what the
job's result needs travels in the result (bco_ray/tracking/history.py)."""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Protocol

import fsspec
import mlflow
from mlflow.tracking import MlflowClient

from bco_ray.config.schema import Config
from bco_ray.tracking import mlflow_inputs, mlflow_model, mlflow_run

if TYPE_CHECKING:  # annotations only
    from bco_ray.data.checks import DataReport
    from bco_ray.data.pass_summary import PrecomputeSummary, WeightHist


class Tracker(Protocol):
    uri: str  # where the runs go
    run_id: str  # the run started ("" before `start`)

    def finished_run(self, run_name: str) -> str | None:
        """The id of a run of this name that finished already, else None (reads an existing store only)."""

    def start(self, run_name: str) -> bool:
        """Open the run `run_name` with the config as its params, or resume the unfinished one of that name;
        True when resumed."""

    def view_hint(self) -> str:
        """How a person looks at the run."""

    def set_tags(self, tags: dict) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_inputs(self, report: DataReport, summary: PrecomputeSummary) -> None:
        """What the run trained on: its datasets and the pass's summary (once per run, a resumed one included)."""

    def log_artifact(self, path: str, folder: str) -> None:
        """A file (a local path or a URI) into the run's `folder`."""

    def log_table(self, table: dict[str, list], name: str) -> None: ...

    def log_figures(self, weight_hist: WeightHist | None, title: str, mean_weight: float | None) -> None:
        """The training curves and, when given, the UDM weight histogram."""

    def log_model(self, model_dir: str, description: str, step: int) -> str:
        """The final model; returns the format it was logged in."""

    def finish(self, status: str, error: str | None = None) -> None:
        """End the run FINISHED, FAILED or KILLED (with the error's text)."""


class MlflowTracker:
    """The Tracker on MLflow: the config's tracking URI, experiment, system metrics and registered model name."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.uri = mlflow_run.tracking_uri(cfg)
        self.run_id = ""

    def finished_run(self, run_name: str) -> str | None:
        done = mlflow_run.finished_run(self.cfg, run_name)
        return done.info.run_id if done is not None else None

    def start(self, run_name: str) -> bool:
        self.uri, self.run_id, resumed = mlflow_run.open_run(self.cfg, run_name)
        return resumed

    def view_hint(self) -> str:
        return mlflow_run.view_hint(self.uri, self.run_id)

    def set_tags(self, tags: dict) -> None:
        mlflow_run.set_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics(metrics, step=step)

    def log_inputs(self, report: DataReport, summary: PrecomputeSummary) -> None:
        mlflow_inputs.log_datasets(self.cfg, report)
        mlflow_inputs.log_precompute(summary)  # step 0, once per run (a resumed run keeps its first)

    def log_artifact(self, path: str, folder: str) -> None:
        mlflow.log_artifact(_local(path), folder)

    def log_table(self, table: dict[str, list], name: str) -> None:
        mlflow.log_table(table, artifact_file=name)

    def log_figures(self, weight_hist: WeightHist | None, title: str, mean_weight: float | None) -> None:
        mlflow_model.log_plots(MlflowClient(self.uri), self.run_id, weight_hist, title=title, mean_weight=mean_weight)

    def log_model(self, model_dir: str, description: str, step: int) -> str:
        return mlflow_model.log_model(
            model_dir, description=description, step=step, registered_model_name=self.cfg.mlflow.registered_model_name
        )

    def finish(self, status: str, error: str | None = None) -> None:
        mlflow_run.close_run(status, error)


def _local(uri: str) -> str:
    """A local copy of a (possibly remote) file, for mlflow.log_artifact."""
    if "://" not in uri:
        return uri
    dst = os.path.join(tempfile.mkdtemp(), os.path.basename(uri))
    fsspec.core.url_to_fs(uri)[0].get(uri.split("://", 1)[1], dst)
    return dst
