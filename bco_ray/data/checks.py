"""Data checks before any model work. The driver reads each split through the one reader (bco_ray/data/reader.py)
before Ray starts: every row of a split up to `data.driver_check_rows` source rows (errors name file, row and
field), so small data is checked whole there. A larger split's first rows are checked there, and all of its rows
by the pass's read tasks (bco_ray/precompute/read.py), in parallel, before any model loads; the counts come from
there. Either way `check_trainable` then makes sure the dataset as a whole can train."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from bco_ray.config.schema import Config
from bco_ray.data.reader import ReadUnit, UnitCheck, iter_unit, plan_units
from bco_ray.data.sources import source_fingerprint
from bco_ray.errors import InputError

log = logging.getLogger(__name__)


class DataError(InputError, ValueError):
    pass


@dataclass
class LabelCounts:
    """Unpaired rows per label: desirable (thumbs-up, label true) and undesirable (label false)."""

    desirable: int = 0
    undesirable: int = 0

    def by_label(self) -> dict[bool, int]:
        """{True: desirable, False: undesirable}, the form the precompute pass takes."""
        return {True: self.desirable, False: self.undesirable}


@dataclass
class SplitReport:
    """One split's check: source rows kept and skipped (by reason), unpaired rows (a paired row gives two), their
    labels, exact duplicates (within a file), the source fingerprint (the precompute cache key's and MLflow's
    dataset digest), the read units, and whether every row was counted (`complete`)."""

    rows: int = 0
    bad_rows: int = 0
    duplicates: int = 0
    unpaired_rows: int = 0
    labels: LabelCounts = field(default_factory=LabelCounts)
    fingerprint: str = ""
    bad_reasons: dict = field(default_factory=dict)
    units: list[ReadUnit] = field(default_factory=list, repr=False)
    complete: bool = True

    def add(
        self, rows: int = 0, bad_rows: int = 0, duplicates: int = 0, desirable: int = 0, undesirable: int = 0
    ) -> None:
        self.rows += rows
        self.bad_rows += bad_rows
        self.duplicates += duplicates
        self.labels.desirable += desirable
        self.labels.undesirable += undesirable
        self.unpaired_rows += desirable + undesirable

    def update_counts(self, other: SplitReport) -> None:
        """Take the counts of a whole-split count (the pass's), keeping the units and fingerprint."""
        self.rows, self.bad_rows, self.duplicates, self.unpaired_rows = (
            other.rows,
            other.bad_rows,
            other.duplicates,
            other.unpaired_rows,
        )
        self.labels, self.bad_reasons, self.complete = other.labels, dict(other.bad_reasons), True


@dataclass
class DataReport:
    train: SplitReport
    eval: SplitReport | None = None  # None: no eval split (data.eval=none)

    @property
    def complete(self) -> bool:
        return self.train.complete and (self.eval is None or self.eval.complete)

    def units(self) -> list[ReadUnit]:
        return self.train.units + (self.eval.units if self.eval else [])


def check_source(spec, on_bad_rows: str, split: str = "train", max_rows: int | None = None) -> SplitReport:
    """Read a split's units in order through the one reader, at most `max_rows` source rows in all."""
    rep = SplitReport(units=plan_units(spec, split))
    left = max_rows
    for unit in rep.units:
        if left is not None and left <= 0:
            rep.complete = False
            break
        check = UnitCheck(unit, on_bad_rows)
        for n, (index, row) in enumerate(iter_unit(unit)):
            if left is not None and n >= left:
                check.report.complete = rep.complete = False
                break
            check(index, row)
        u = check.finish().to_dict()
        left = None if left is None else left - (u["rows"] + u["bad_rows"])
        rep.add(u["rows"], u["bad_rows"], u["duplicates"], u["desirable"], u["undesirable"])
        for reason, k in u["bad_reasons"].items():
            rep.bad_reasons[reason] = rep.bad_reasons.get(reason, 0) + k
    rep.fingerprint = source_fingerprint(spec)
    return rep


def check_data(cfg: Config) -> DataReport:
    """The driver's check (before Ray): whole splits up to data.driver_check_rows rows, then `check_trainable`;
    a larger split's first rows only (the pass checks and counts the rest, then calls `check_trainable`)."""
    d = cfg.data
    n = d.driver_check_rows
    report = DataReport(
        train=check_source(d.train, d.on_bad_rows, "train", n),
        eval=check_source(d.eval, d.on_bad_rows, "eval", n) if d.eval else None,
    )
    if report.complete:
        check_trainable(cfg, report)
    else:
        log.info("data: checked the first %d rows per split here; the pass checks and counts every row", n)
    return report


def check_trainable(cfg: Config, report: DataReport) -> None:
    """The dataset as a whole: what was skipped (said on the console), both classes for UDM, one global batch."""
    from bco_ray.console import console

    t = cfg.train
    for name in ("train", "eval"):
        rep = getattr(report, name)
        if rep is not None and rep.bad_rows:
            console(
                f"[bco-ray] data.{name}: skipped {rep.bad_rows} bad rows (data.on_bad_rows=skip): "
                + ", ".join(f"{k} {v}" for k, v in sorted(rep.bad_reasons.items()))
            )
    tr = report.train
    if tr.duplicates:
        log.warning("data.train: %d duplicate rows (same prompt, completion and label)", tr.duplicates)
    if cfg.udm.enabled and (tr.labels.desirable == 0 or tr.labels.undesirable == 0):
        only = "desirable" if tr.labels.desirable else "undesirable"
        raise DataError(
            f"data.train has only {only} rows, but udm.enabled=true needs both classes to fit its "
            "classifier; add rows of the other class or pass --udm.enabled=false"
        )
    global_batch = t.num_workers * t.micro_batch_size * t.gradient_accumulation_steps
    if tr.unpaired_rows < global_batch:
        raise DataError(
            f"data.train has {tr.unpaired_rows} rows, fewer than one global batch "
            f"(train.num_workers {t.num_workers} × train.micro_batch_size {t.micro_batch_size} × "
            f"train.gradient_accumulation_steps {t.gradient_accumulation_steps} = {global_batch}); "
            "add data or lower those"
        )
