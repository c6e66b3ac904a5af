"""Where this job writes, resolved once by the driver (bco_ray/job/checks.py: run_checks) and taken as given by
every stage after it: output_dir made absolute, precompute.cache_dir and train.storage_path filled in (the rules:
bco_ray/storage.py)."""

from __future__ import annotations

import dataclasses

from bco_ray.config.schema import Config
from bco_ray.storage import join, resolve_output_dir, storage_root


def resolve_locations(cfg: Config) -> Config:
    """A copy of `cfg` with output_dir absolute and cache_dir / storage_path filled in (see bco_ray/storage.py)."""
    root = storage_root()
    out = resolve_output_dir(cfg.output_dir)
    cache = cfg.precompute.cache_dir or (join(root, "cache") if root else str(out / "cache"))
    storage = cfg.train.storage_path or (join(root, "ray") if root else str(out / "ray"))
    return dataclasses.replace(
        cfg,
        output_dir=str(out),
        precompute=dataclasses.replace(cfg.precompute, cache_dir=cache),
        train=dataclasses.replace(cfg.train, storage_path=storage),
    )
