"""Stream-check a whole data file: every row valid and in one format, counts of rows, labels, duplicates and
bad rows (skipped or raised, per `data.on_bad_rows`)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

from bco_ray.data.formats import REQUIRED, DataFormatError, check_row, detect_format, iter_raw, to_unpaired


def _check_same_format(row: Any, path: str, index: int, fmt: str, fmt_index: int) -> None:
    """check_row against the file's format; a row valid in another format is 'mixed formats'."""
    try:
        check_row(row, source=path, index=index, fmt=fmt)
    except DataFormatError as err:
        try:
            other = detect_format(row, source=path, index=index)
            check_row(row, source=path, index=index, fmt=other)
        except DataFormatError:
            raise err from None
        article = "an" if other == "implicit" else "a"
        raise DataFormatError(
            path,
            f"is {article} {other}-format row ({', '.join(REQUIRED[other])}) but the file "
            f"is {fmt}-format (detected from row {fmt_index}); mixed formats in one file are not "
            "supported",
            index=index,
            reason="mixed_formats",
            hint="Split the file by format or convert the rows to one format.",
        ) from None


def _hash(row: dict) -> bytes:
    key = json.dumps([row["prompt"], row["completion"], row["label"]], ensure_ascii=False)
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()


def validate_source(path: str, *, on_bad_rows: str = "error", max_errors: int = 1) -> dict:
    """Stream-check every row of ``path`` and return a summary (format, rows, bad rows by reason, unpaired
    rows, labels, duplicates).

    on_bad_rows="error": raise once ``max_errors`` bad rows were seen (or at the end of the
    file if there were fewer), listing them; "skip": count bad rows by reason. Mixed formats
    and a file without any valid row always raise."""
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    fmt, fmt_index = None, None
    rows = unpaired = duplicates = 0
    labels = {"true": 0, "false": 0}
    reasons: Counter = Counter()
    errors: list[DataFormatError] = []
    seen: set[bytes] = set()
    for index, row in iter_raw(path):
        try:
            if isinstance(row, DataFormatError):
                raise row
            if fmt is None:
                row_fmt = detect_format(row, source=path, index=index)
                check_row(row, source=path, index=index, fmt=row_fmt)
                fmt, fmt_index = row_fmt, index
            else:
                _check_same_format(row, path, index, fmt, fmt_index)
        except DataFormatError as err:
            if err.reason == "mixed_formats":
                raise
            reasons[err.reason] += 1
            if on_bad_rows == "error":
                errors.append(err)
                if len(errors) >= max_errors:
                    raise _combine(errors) from None
            continue
        rows += 1
        for u in to_unpaired(row, fmt):
            unpaired += 1
            labels["true" if u["label"] else "false"] += 1
            h = _hash(u)
            duplicates += h in seen
            seen.add(h)
    if errors:
        raise _combine(errors)
    if rows == 0:
        raise DataFormatError(
            path,
            f"has no valid rows ({sum(reasons.values())} bad rows: {dict(reasons)})",
            reason="no_rows",
            hint="Check the path and the file's columns.",
        )
    return {
        "format": fmt,
        "rows": rows,
        "bad_rows": sum(reasons.values()),
        "bad_reasons": dict(reasons),
        "unpaired_rows": unpaired,
        "labels": labels,
        "duplicates": duplicates,
    }


def _combine(errors: list[DataFormatError]) -> DataFormatError:
    if len(errors) == 1:
        return errors[0]
    first = errors[0]
    more = "\n  ".join(str(e) for e in errors[1:])
    combined = DataFormatError(f"{first}\n{len(errors) - 1} more bad rows:\n  {more}", reason=first.reason)
    combined.source, combined.index, combined.field = first.source, first.index, first.field
    return combined
