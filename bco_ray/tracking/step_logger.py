"""Per-step metrics from rank 0 into the job's MLflow run (created by the driver, id passed in).

With checkpoints on, points are buffered and flushed when a checkpoint is saved: a worker that dies
and resumes from that checkpoint re-logs nothing twice, so every step appears once in the history."""
from __future__ import annotations

import math
import time

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient


class StepLogger:
    def __init__(self, mlflow_info: dict | None, rank: int, buffered: bool):
        self.active = rank == 0 and mlflow_info is not None
        self.client = MlflowClient(mlflow_info["tracking_uri"]) if self.active else None
        self.run_id = mlflow_info["run_id"] if self.active else None
        self.buffered = buffered
        self.pending: list[Metric] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        ts = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in metrics.items()
                         if isinstance(v, (int, float)) and math.isfinite(float(v))]
        print(f"[bco-ray] step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                    if isinstance(v, (int, float))), flush=True)
        if not self.buffered:
            self.flush()

    def flush(self) -> None:
        if self.active and self.pending:
            for i in range(0, len(self.pending), 1000):
                self.client.log_batch(self.run_id, metrics=self.pending[i:i + 1000])
            self.pending = []
