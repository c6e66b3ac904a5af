"""The helper every config section declares its numbers with (bco_ray/config/schema.py and the sections kept in
their own modules, such as bco_ray/config/online.py)."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def ranged(default: float, allowed: str) -> Any:
    """An int or float field's default and allowed values ('>= 1', '> 0', '[0, 1)', '-1 or >= 0', 'finite'; a
    float must also be finite), which bco_ray.config.checks checks before any Ray work and `--help` shows."""
    return field(default=default, metadata={"range": allowed})
