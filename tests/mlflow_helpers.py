"""What tests/test_mlflow.py (units) and tests/test_mlflow_jobs.py (end to end) share: the plots and step metrics
a run must have, reading a PNG's fill and a metric's steps, and keeping MLflow's process-wide state per test."""

from __future__ import annotations

import contextlib
import os

import matplotlib.image as mpimg
import mlflow
from mlflow.tracking import MlflowClient

PLOTS = {"loss", "rewards", "margins", "delta", "eval_auc", "overview", "udm_weights"}
STEP_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "delta",
    "learning_rate",
    "grad_norm",
    "logps/chosen",
    "logps/rejected",
    "tokens_per_second",
    "samples_per_second",
)


@contextlib.contextmanager
def mlflow_globals_restored():
    """mlflow.set_tracking_uri / set_experiment write os.environ; keep them from leaking into later tests."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    saved_uri = tracking_utils._tracking_uri
    yield
    while mlflow.active_run():
        mlflow.end_run()
    tracking_utils._tracking_uri = saved_uri
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def png_stats(path) -> tuple[int, int, float]:
    """(height, width, fraction of coloured pixels): empty axes are all black, white and grey (0.0); a plot
    with its curves or bars drawn has colour (0.001 for two markers, 0.005 to 0.1 for curves and bars)."""
    rgb = mpimg.imread(str(path))[..., :3]
    return rgb.shape[0], rgb.shape[1], float(((rgb.max(-1) - rgb.min(-1)) > 0.25).mean())


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))
