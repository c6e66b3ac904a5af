"""What the driver-side stages of one job share (bco_ray/job/run.py, bco_ray/job/train_stage.py): the wall time of each
phase, and the job's config, models, data report, resources, tracker (its run) and output locations."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bco_ray.config.schema import Config
from bco_ray.precompute.sizing import PassResources
from bco_ray.tracking.history import entry

if TYPE_CHECKING:  # annotations only
    from bco_ray.data.checks import DataReport
    from bco_ray.models import Paths
    from bco_ray.tracking.tracker import Tracker


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


@dataclass
class Job:
    """What the stages after the checks share."""

    cfg: Config
    paths: Paths
    data_report: DataReport
    res: PassResources
    run_name: str
    out_dir: Path
    tracker: Tracker  # the run started
    phases: Phases
    history: list[dict] = field(default_factory=list)  # what the driver logged: {"step": s, **metrics}

    @property
    def uri(self) -> str:  # where the tracker's runs go
        return self.tracker.uri

    @property
    def run_id(self) -> str:
        return self.tracker.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Metrics into the tracker's run, and into the job's history (its result: bco_ray/tracking/history.py)."""
        self.tracker.log_metrics(metrics, step)
        self.history.append(entry(step, metrics))

    @property
    def storage_dir(self) -> str:  # this run's checkpoints, final model and generation snapshots
        return f"{self.cfg.train.storage_path}/{self.run_name}"
