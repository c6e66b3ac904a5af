"""What the precompute pass reports about the rows it wrote: `PrecomputeSummary`. The pass builds it
(bco_ray/precompute/pipeline.py), the cache keeps it (summary.json and COMPLETE.json), the driver logs it
(`precompute/*`, `udm/*` metrics and precompute/summary.json in MLflow: bco_ray/tracking/mlflow_inputs.py).

Its JSON form (`to_dict`) is the pass's summary as written since the first release:
    {"udm": {"udm/accuracy": ..., ...} or {}, "dropped": {reason: rows}, "train": {split}, "eval": {split}
     (absent without an eval split), "seconds": s}
`from_dict` reads it back, including entries written by older versions (missing counts are 0, unknown keys
are ignored)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _known(cls, d: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class WeightHist:
    """Histogram of the UDM density-ratio weights of the undesirable rows: len(edges) == len(counts) + 1."""

    edges: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)


@dataclass
class SplitSummary:
    """Rows, tokens and UDM weights of one split as written (after dropped rows and truncation)."""

    rows: int = 0
    chosen: int = 0
    tokens: int = 0
    completion_tokens: int = 0
    pad_tokens: int = 0  # padding the pass's scoring batches carried (the padding_fraction's)
    weight_sum: float = 0.0  # sum of the undesirable rows' UDM weights
    rejected: int = 0
    padding_fraction: float = 0.0
    mean_rejected_weight: float = 0.0
    weight_hist: WeightHist = field(default_factory=WeightHist)

    @classmethod
    def from_dict(cls, d: dict) -> SplitSummary:
        return cls(**{**_known(cls, d), "weight_hist": WeightHist(**_known(WeightHist, d.get("weight_hist") or {}))})


@dataclass
class UdmFit:
    """The UDM classifier's accuracy on its own fit sample, overall and per class (metrics `udm/<name>`)."""

    accuracy: float
    accuracy_chosen: float
    accuracy_rejected: float

    PREFIX = "udm/"

    def to_dict(self) -> dict[str, float]:
        return {f"{self.PREFIX}{k}": v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> UdmFit | None:
        """From {"udm/accuracy": ..., ...} (bco_ray.bco.udm's metrics); None for {} (UDM off)."""
        if not d:
            return None
        plain = {k.removeprefix(cls.PREFIX): v for k, v in d.items()}
        return cls(**{f.name: float(plain.get(f.name, 0.0)) for f in dataclasses.fields(cls)})


@dataclass
class PrecomputeSummary:
    udm: UdmFit | None = None  # None: UDM off
    dropped: dict[str, int] = field(default_factory=dict)  # rows dropped by the pass, by reason
    train: SplitSummary = field(default_factory=SplitSummary)
    eval: SplitSummary | None = None  # None: no eval split
    seconds: float = 0.0  # the pass's wall time

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (see the module docstring)."""
        d = dataclasses.asdict(self)
        d["udm"] = self.udm.to_dict() if self.udm is not None else {}
        if self.eval is None:
            del d["eval"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PrecomputeSummary:
        return cls(
            udm=UdmFit.from_dict(d.get("udm") or {}),
            dropped=dict(d.get("dropped") or {}),
            train=SplitSummary.from_dict(d.get("train") or {}),
            eval=SplitSummary.from_dict(d["eval"]) if d.get("eval") else None,
            seconds=float(d.get("seconds", 0.0)),
        )
