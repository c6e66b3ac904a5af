"""How TRL / transformers field names map onto bco-ray's config sections."""

from __future__ import annotations

import typing
from typing import Any

from bco_ray.api._fields import ROUTES, targets
from bco_ray.config.schema import Config, ConfigError, TrainConfig, flatten, load_config, merge

# linear, cosine, constant: the choices of bco-ray's train.lr_scheduler
_SCHEDULERS: tuple[str, ...] = typing.get_args(typing.get_type_hints(TrainConfig)["lr_scheduler"])


def _report_to(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    return [str(x) for x in v]


def _to_config(o: dict, sections: dict, extra: dict | None = None) -> Config:
    o = merge(o, sections or {})
    for k, v in flatten(extra or {}).items():
        o = merge(o, _nest(k, v))
    try:
        return load_config(overrides=o)
    except ConfigError as e:
        raise ConfigError(_with_trl_names(str(e))) from None


def _nest(path: str, value: Any) -> dict:
    *parents, leaf = path.split(".")
    d: dict = {leaf: value}
    for p in reversed(parents):
        d = {p: d}
    return d


def _with_trl_names(msg: str) -> str:
    import re

    names = sorted(
        {k for k in ROUTES for v in targets(k) if v != "output_dir" and re.search(rf"{re.escape(v)}\b(?!\.)", msg)}
    )
    return f"{msg} (BCOConfig field: {', '.join(names)})" if names else msg


# ============================================================================================ trainer
