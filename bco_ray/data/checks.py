"""Driver-side data checks, streamed, before any Ray or model work: every row of every file is validated
(errors name file, row and field), and the dataset as a whole must be trainable. `check_data` returns a
`DataReport`: rows, label counts and the source fingerprint of each split."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from bco_ray.config import Config
from bco_ray.data import formats
from bco_ray.data.sources import files_of, source_fingerprint
from bco_ray.data.validate import validate_source
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
    """One split's check: source rows kept and skipped, unpaired rows (a paired row gives two), their labels,
    exact duplicates, and the source fingerprint (the precompute cache key's and MLflow's dataset digest)."""

    rows: int = 0
    bad_rows: int = 0
    duplicates: int = 0
    unpaired_rows: int = 0
    labels: LabelCounts = field(default_factory=LabelCounts)
    fingerprint: str = ""

    def add(
        self, rows: int = 0, bad_rows: int = 0, duplicates: int = 0, desirable: int = 0, undesirable: int = 0
    ) -> None:
        self.rows += rows
        self.bad_rows += bad_rows
        self.duplicates += duplicates
        self.labels.desirable += desirable
        self.labels.undesirable += undesirable
        self.unpaired_rows += desirable + undesirable


@dataclass
class DataReport:
    train: SplitReport
    eval: SplitReport | None = None  # None: no eval split (data.eval=none)


def _check_hf(ds, name: str, on_bad_rows: str) -> SplitReport:
    rep, fmt = SplitReport(), None
    for i, row in enumerate(ds):
        try:
            f = formats.detect_format(row, source=name, index=i)
            if fmt is not None and f != fmt:
                raise formats.DataFormatError(
                    f"{name} row {i}: format {f!r} differs from the first rows' {fmt!r}; use one format per dataset"
                )
            fmt = f
            formats.check_row(row, source=name, index=i, fmt=f)
        except formats.DataFormatError:
            if on_bad_rows == "error":
                raise
            rep.add(bad_rows=1)
            continue
        labels = [bool(r["label"]) for r in formats.to_unpaired(row, f)]
        rep.add(rows=1, desirable=sum(labels), undesirable=len(labels) - sum(labels))
    return rep


def check_source(spec, on_bad_rows: str) -> SplitReport:
    if not isinstance(spec, str) or spec.startswith("hf:"):
        from bco_ray.data.sources import _hf

        ds = spec if not isinstance(spec, str) else _hf(spec)
        rep = _check_hf(ds, getattr(ds, "info", None) and ds.info.dataset_name or str(spec), on_bad_rows)
    else:
        rep = SplitReport()
        for f in files_of(spec):
            s = validate_source(f, on_bad_rows=on_bad_rows)
            rep.add(
                rows=s["rows"],
                bad_rows=s["bad_rows"],
                duplicates=s["duplicates"],
                desirable=s["labels"]["true"],
                undesirable=s["labels"]["false"],
            )
    rep.fingerprint = source_fingerprint(spec)
    return rep


def check_data(cfg: Config) -> DataReport:
    d, t = cfg.data, cfg.train
    report = DataReport(
        train=check_source(d.train, d.on_bad_rows), eval=check_source(d.eval, d.on_bad_rows) if d.eval else None
    )
    tr = report.train
    if tr.bad_rows:
        log.warning("data.train: skipped %d bad rows (data.on_bad_rows=skip)", tr.bad_rows)
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
    return report
