"""Per-step metrics from rank 0 into the job's MLflow run (created by the driver, id passed in).

`step` is the optimizer step. With checkpoints on, points are buffered and flushed when a checkpoint is
saved: a worker that dies and resumes from that checkpoint re-logs nothing twice. On top of that, the
points the run already holds (a resumed job, a restart without a checkpoint) are read once at start and
never logged again, so every (metric, step) appears once in the history.

The tracking URI comes from the driver (`mlflow_info["tracking_uri"]`), else the worker's
`$MLFLOW_TRACKING_URI` (set through the Ray Train worker runtime env). A tracking server that is briefly
unreachable does not stop training: the points stay buffered and go out with the next flush.

Rank 0 also keeps every logged point in `history` (`{"step": s, **metrics}` per call, in order): the worker's
final record carries it, so the driver has the run's metrics without reading them back from the tracker.

Each logged step is also shown as one line, `[bco-ray] step N: key=value ...`, written with `console()`.

With `mlflow_info["system_metrics"]`, the first worker of each training node also records that node's system
metrics (CPU, memory, GPU utilisation and memory, disk, network) into the run as `system/train-node<N>/*`,
every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (MLflow's default: 10) until the run ends; the driver's
own are `system/*` (`mlflow.start_run(log_system_metrics=True)`)."""

from __future__ import annotations

import math
import os
import sys
import time

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from bco_ray.console import console

MAX_PENDING = 200_000  # points kept while the server is unreachable; the oldest are dropped beyond


def _node_monitor(mlflow_info: dict, uri: str | None):
    """MLflow's SystemMetricsMonitor on the first Ray Train worker of this node; None elsewhere (or outside
    Ray Train). It stops by itself once the run is no longer RUNNING."""
    if not mlflow_info.get("run_id"):
        return None
    try:
        import ray.train

        ctx = ray.train.get_context()
        if ctx.get_local_rank() != 0:
            return None
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            mlflow_info["run_id"], resume_logging=True, node_id=f"train-node{ctx.get_node_rank()}", tracking_uri=uri
        )
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001 - system metrics are nice to have; never fail training
        console(f"[bco-ray] warning: no system metrics from this node ({type(e).__name__}: {e})", sys.stderr)
        return None


class StepLogger:
    def __init__(self, mlflow_info: dict | None, rank: int, buffered: bool):
        self.rank = rank
        self.history: list[dict] = []
        self.active = rank == 0 and bool(mlflow_info) and bool(mlflow_info.get("run_id"))
        self.run_id = mlflow_info["run_id"] if self.active else None
        uri = (mlflow_info or {}).get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(uri) if self.active else None
        self.buffered = buffered
        self.pending: list[Metric] = []
        self.logged: set[tuple[str, int]] = self._existing() if self.active else set()
        self.system_monitor = _node_monitor(mlflow_info, uri) if (mlflow_info or {}).get("system_metrics") else None

    def _existing(self) -> set[tuple[str, int]]:
        """(key, step) points the run holds already."""
        try:
            keys = self.client.get_run(self.run_id).data.metrics.keys()
            return {(k, m.step) for k in keys for m in self.client.get_metric_history(self.run_id, k)}
        except Exception as e:  # noqa: BLE001 - a fresh run has nothing to skip; never fail training
            console(f"[bco-ray] warning: could not read the MLflow run's metric history ({e})", sys.stderr)
            return set()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.rank == 0:
            self.history.append({"step": step, **metrics})
        if not self.active:
            return
        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(float(v)):
                continue
            if (k, step) in self.logged:
                continue
            self.logged.add((k, step))
            self.pending.append(Metric(k, float(v), ts, step))
        console(
            f"[bco-ray] step {step}: "
            + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
        )
        if not self.buffered:
            self.flush()

    def flush(self) -> None:
        if not (self.active and self.pending):
            return
        try:
            while self.pending:
                self.client.log_batch(self.run_id, metrics=self.pending[:1000])
                del self.pending[:1000]
        except Exception as e:  # noqa: BLE001 - keep training; retry with the next flush
            if len(self.pending) > MAX_PENDING:
                del self.pending[: len(self.pending) - MAX_PENDING]
            console(
                f"[bco-ray] warning: MLflow logging failed ({type(e).__name__}: {e}); "
                f"{len(self.pending)} points kept for the next flush",
                sys.stderr,
            )
