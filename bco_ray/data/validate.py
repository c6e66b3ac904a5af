"""Stream-check a whole data file through the one reader (bco_ray/data/reader.py): every row valid and in one
format, counts of rows, labels, duplicates and bad rows (skipped or raised, per `data.on_bad_rows`)."""

from __future__ import annotations

from bco_ray.data.reader import ReadUnit, check_unit


def validate_source(path: str, *, on_bad_rows: str = "error", max_errors: int = 1) -> dict:
    """Stream-check every row of ``path`` and return a summary (format, rows, bad rows by reason, unpaired
    rows, labels, duplicates).

    on_bad_rows="error": raise once ``max_errors`` bad rows were seen (or at the end of the
    file if there were fewer), listing them; "skip": count bad rows by reason. Mixed formats
    and a file without any valid row always raise."""
    check = check_unit(ReadUnit("train", path), on_bad_rows, max_errors=max_errors)
    rep = check.report
    return {
        "format": check.fmt,
        "rows": rep.rows,
        "bad_rows": rep.bad_rows,
        "bad_reasons": dict(rep.bad_reasons),
        "unpaired_rows": rep.desirable + rep.undesirable,
        "labels": {"true": rep.desirable, "false": rep.undesirable},
        "duplicates": rep.duplicates,
    }
