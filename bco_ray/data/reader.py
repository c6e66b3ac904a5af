"""The one reader of input rows. The driver's check and the Ray Data pass both read a split through these
functions, so a row the check accepts is the row the pass trains on, and a row the check would refuse is refused
(or, with `data.on_bad_rows=skip`, skipped and counted) the same way by the pass.

A split is planned into read units (`plan_units`): one per data file (JSON Lines, a JSON array, Parquet, each
optionally gzip-compressed; a directory may mix them), one for a Hugging Face Hub stream, one for an in-memory
`datasets.Dataset`. `UnitCheck` validates the rows of one unit in order (every row in one format, the unit's
first valid row deciding it; errors name file, row and field) and turns each into unpaired
`{prompt, completion, label}` rows; `check_unit` runs it over a unit, or over its first rows."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

from bco_ray.data import formats
from bco_ray.data.formats import REQUIRED, DataFormatError

DATA_EXTENSIONS = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")
DUPLICATE_TRACKING_LIMIT = 2_000_000  # rows per unit whose hashes are kept to count exact duplicates


@dataclass(frozen=True)
class ReadUnit:
    """One independently readable piece of a split: `kind` is "file" (its extension decides the format),
    "hf" (a hub dataset stream at commit `sha`) or "memory" (`dataset`, a `datasets.Dataset`)."""

    split: str
    source: str  # what error messages name: the file's URI, the hf: spec, or "dataset"
    kind: str = "file"
    sha: str | None = None
    dataset: Any = None


def files_of(spec: str) -> list[str]:
    """The data files a spec names (a file, or the data files of a directory, sorted), as URIs/paths."""
    from bco_ray.builtin import resolve_data

    spec = resolve_data(spec)
    fs, path = fsspec.core.url_to_fs(spec)
    if not fs.exists(path):
        raise FileNotFoundError(f"data source {spec!r} does not exist")
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.lower().endswith(DATA_EXTENSIONS))
    else:
        files = [path]
    if not files:
        raise FileNotFoundError(f"data source {spec!r} has no .jsonl/.json/.parquet files (optionally .gz)")
    proto = spec.split("://")[0] + "://" if "://" in spec else ""
    return [proto + f if proto and not f.startswith(proto) else f for f in files]


def plan_units(spec, split: str, sha: str | None = None) -> list[ReadUnit]:
    """The read units of one split's data spec. `sha`: an hf: spec's resolved commit (resolved once, by the
    driver, so that every reader reads the same commit)."""
    if not isinstance(spec, str):
        return [ReadUnit(split, "dataset", kind="memory", dataset=spec)]
    if spec.startswith("hf:"):
        if sha is None:
            from bco_ray.data.sources import parse_hf, resolved_sha

            sha = resolved_sha(parse_hf(spec))
        return [ReadUnit(split, spec, kind="hf", sha=sha)]
    return [ReadUnit(split, f) for f in files_of(spec)]


def iter_unit(unit: ReadUnit) -> Iterator[tuple[int, Any]]:
    """(0-based row index, row dict or the DataFormatError that row is) of one unit, in order."""
    if unit.kind == "memory":
        return enumerate(unit.dataset)
    if unit.kind == "hf":
        from bco_ray.data.sources import hf_rows

        return enumerate(hf_rows(unit.source, unit.sha))
    return formats.iter_raw(unit.source)


@dataclass
class UnitReport:
    """What reading one unit found: source rows kept and skipped (by reason), unpaired rows per label, exact
    duplicates (within the unit), and whether every row of the unit was read."""

    rows: int = 0
    bad_rows: int = 0
    bad_reasons: Counter = field(default_factory=Counter)
    desirable: int = 0
    undesirable: int = 0
    duplicates: int = 0
    complete: bool = True

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "bad_rows": self.bad_rows,
            "bad_reasons": dict(self.bad_reasons),
            "desirable": self.desirable,
            "undesirable": self.undesirable,
            "duplicates": self.duplicates,
            "complete": self.complete,
        }


class UnitCheck:
    """Validates the rows of one unit in order and converts them to unpaired rows. `on_bad_rows="error"`: bad
    rows raise their DataFormatError (file, row, field, fix), once `max_errors` of them were seen (listing them)
    or at `finish()`; "skip": they are counted by reason. A row of another format than the unit's (decided by its
    first valid row) always raises, and so does a unit read whole without one valid row."""

    def __init__(self, unit: ReadUnit, on_bad_rows: str, max_errors: int = 1):
        if on_bad_rows not in ("error", "skip"):
            raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
        self.unit, self.on_bad_rows, self.max_errors = unit, on_bad_rows, max_errors
        self.fmt: str | None = None
        self.fmt_index: int | None = None
        self.report = UnitReport()
        self.errors: list[DataFormatError] = []
        self._seen: set[bytes] = set()

    def __call__(self, index: int, row: Any) -> list[dict]:
        """The row's unpaired rows ([] for a bad row that does not raise)."""
        try:
            if isinstance(row, DataFormatError):
                raise row
            self._check(index, row)
        except DataFormatError as err:
            if err.reason == "mixed_formats":
                raise
            self.report.bad_rows += 1
            self.report.bad_reasons[err.reason] += 1
            if self.on_bad_rows == "error":
                self.errors.append(err)
                if len(self.errors) >= self.max_errors:
                    raise combine(self.errors) from None
            return []
        out = formats.to_unpaired(row, self.fmt)
        self.report.rows += 1
        for u in out:
            if u["label"]:
                self.report.desirable += 1
            else:
                self.report.undesirable += 1
            self._count_duplicate(u)
        return out

    def finish(self) -> UnitReport:
        """The report, once the unit was read (whole, or its first rows: `report.complete` is set by the caller)."""
        if self.errors:
            raise combine(self.errors)
        rep = self.report
        if rep.complete and rep.rows == 0:
            raise DataFormatError(
                self.unit.source,
                f"has no valid rows ({rep.bad_rows} bad rows: {dict(rep.bad_reasons)})",
                reason="no_rows",
                hint="Check the path and the file's columns.",
            )
        return rep

    def _check(self, index: int, row: Any) -> None:
        src = self.unit.source
        if self.fmt is None:
            fmt = formats.detect_format(row, source=src, index=index)
            formats.check_row(row, source=src, index=index, fmt=fmt)
            self.fmt, self.fmt_index = fmt, index
            return
        try:
            formats.check_row(row, source=src, index=index, fmt=self.fmt)
        except DataFormatError as err:
            try:
                other = formats.detect_format(row, source=src, index=index)
                formats.check_row(row, source=src, index=index, fmt=other)
            except DataFormatError:
                raise err from None
            article = "an" if other == "implicit" else "a"
            raise DataFormatError(
                src,
                f"is {article} {other}-format row ({', '.join(REQUIRED[other])}) but the file is "
                f"{self.fmt}-format (detected from row {self.fmt_index}); mixed formats in one file are not supported",
                index=index,
                reason="mixed_formats",
                hint="Split the file by format or convert the rows to one format.",
            ) from None

    def _count_duplicate(self, u: dict) -> None:
        if len(self._seen) >= DUPLICATE_TRACKING_LIMIT:
            return
        key = json.dumps([u["prompt"], u["completion"], u["label"]], ensure_ascii=False)
        h = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
        self.report.duplicates += h in self._seen
        self._seen.add(h)


def combine(errors: list[DataFormatError]) -> DataFormatError:
    """Several bad rows as one error: the first one's message, then the others'."""
    if len(errors) == 1:
        return errors[0]
    first = errors[0]
    more = "\n  ".join(str(e) for e in errors[1:])
    combined = DataFormatError(f"{first}\n{len(errors) - 1} more bad rows:\n  {more}", reason=first.reason)
    combined.source, combined.index, combined.field = first.source, first.index, first.field
    return combined


def check_unit(unit: ReadUnit, on_bad_rows: str, max_rows: int | None = None, max_errors: int = 1) -> UnitCheck:
    """Read and check a unit (its first `max_rows` source rows if given; `report.complete` says whether that
    was all of it). Returns the finished check (`.fmt`, `.report`)."""
    check = UnitCheck(unit, on_bad_rows, max_errors)
    for n, (index, row) in enumerate(iter_unit(unit)):
        if max_rows is not None and n >= max_rows:
            check.report.complete = False
            break
        check(index, row)
    check.finish()
    return check
