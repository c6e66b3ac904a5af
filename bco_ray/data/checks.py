"""Driver-side data checks, streamed, before any Ray or model work: every row of every file is validated
(errors name file, row and field), and the dataset as a whole must be trainable."""
from __future__ import annotations

import logging

from bco_ray.config import Config
from bco_ray.errors import InputError
from bco_ray.data import formats
from bco_ray.data.sources import files_of, source_fingerprint

log = logging.getLogger(__name__)


class DataError(InputError, ValueError):
    pass


def _check_hf(ds, name: str, on_bad_rows: str) -> dict:
    counts = {"true": 0, "false": 0}
    rows, bad, fmt = 0, 0, None
    for i, row in enumerate(ds):
        try:
            f = formats.detect_format(row, source=name, index=i)
            if fmt is not None and f != fmt:
                raise formats.DataFormatError(f"{name} row {i}: format {f!r} differs from the first rows' {fmt!r}; "
                                              "use one format per dataset")
            fmt = f
            formats.check_row(row, source=name, index=i, fmt=f)
        except formats.DataFormatError:
            if on_bad_rows == "error":
                raise
            bad += 1
            continue
        rows += 1
        for r in formats.to_unpaired(row, f):
            counts["true" if r["label"] else "false"] += 1
    return {"rows": rows, "bad_rows": bad, "labels": counts, "duplicates": 0,
            "unpaired_rows": counts["true"] + counts["false"]}


def check_source(spec, on_bad_rows: str) -> dict:
    if not isinstance(spec, str) or spec.startswith("hf:"):
        from bco_ray.data.sources import _hf
        ds = spec if not isinstance(spec, str) else _hf(spec)
        rep = _check_hf(ds, getattr(ds, "info", None) and ds.info.dataset_name or str(spec), on_bad_rows)
    else:
        rep = {"rows": 0, "bad_rows": 0, "duplicates": 0, "unpaired_rows": 0, "labels": {"true": 0, "false": 0}}
        for f in files_of(spec):
            s = formats.validate_source(f, on_bad_rows=on_bad_rows)
            for k in ("rows", "bad_rows", "duplicates", "unpaired_rows"):
                rep[k] += s[k]
            for k in ("true", "false"):
                rep["labels"][k] += s["labels"][k]
    rep["fingerprint"] = source_fingerprint(spec)
    return rep


def check_data(cfg: Config) -> dict:
    d, t = cfg.data, cfg.train
    report = {"train": check_source(d.train, d.on_bad_rows)}
    if d.eval:
        report["eval"] = check_source(d.eval, d.on_bad_rows)
    tr = report["train"]
    if tr["bad_rows"]:
        log.warning("data.train: skipped %d bad rows (data.on_bad_rows=skip)", tr["bad_rows"])
    if tr["duplicates"]:
        log.warning("data.train: %d duplicate rows (same prompt, completion and label)", tr["duplicates"])
    if cfg.udm.enabled and (tr["labels"]["true"] == 0 or tr["labels"]["false"] == 0):
        only = "desirable" if tr["labels"]["true"] else "undesirable"
        raise DataError(f"data.train has only {only} rows, but udm.enabled=true needs both classes to fit its "
                        "classifier; add rows of the other class or pass --udm.enabled=false")
    global_batch = t.num_workers * t.micro_batch_size * t.gradient_accumulation_steps
    if tr["unpaired_rows"] < global_batch:
        raise DataError(f"data.train has {tr['unpaired_rows']} rows, fewer than one global batch "
                        f"(train.num_workers {t.num_workers} × train.micro_batch_size {t.micro_batch_size} × "
                        f"train.gradient_accumulation_steps {t.gradient_accumulation_steps} = {global_batch}); "
                        "add data or lower those")
    return report
