"""The config's range and name checks (`validate` in bco_ray.config runs them): each bad value gets one
ConfigError naming the field and the fix, before any Ray work starts."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import re
import typing
from typing import Any, Literal

from bco_ray.config.doc import field_docs, show
from bco_ray.config.schema import Config, ConfigError, EvalConfig, _choices, _coerce

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_NUMBER = r"-?\d+(?:\.\d*)?(?:e[-+]?\d+)?"
_BOUND = re.compile(rf"^(>=|>|<=|<) ({_NUMBER})$")
_INTERVAL = re.compile(rf"^([\[(])({_NUMBER}), ({_NUMBER})([\])])$")


@functools.cache
def parse_range(allowed: str) -> list[tuple[float, bool, float, bool]]:
    """'-1 or >= 0' → each alternative as an interval (low, low included, high, high included): an exact value
    ('-1'), a bound ('>= 1', '< 5') or an interval ('[0, 1)'). Raises ValueError for any other text (a mistake
    in bco_ray/config/schema.py: tests/test_config_ranges.py reads every declaration)."""
    out = []
    for alt in allowed.split(" or "):
        if m := _INTERVAL.match(alt):
            out.append((float(m[2]), m[1] == "[", float(m[3]), m[4] == "]"))
        elif m := _BOUND.match(alt):
            op, x = m[1], float(m[2])
            out.append((x, op == ">=", math.inf, False) if op[0] == ">" else (-math.inf, False, x, op == "<="))
        elif alt == "finite":  # any finite number (`in_range` refuses inf and nan)
            out.append((-math.inf, False, math.inf, False))
        elif re.fullmatch(_NUMBER, alt):
            out.append((float(alt), True, float(alt), True))
        else:
            raise ValueError(f"range {allowed!r}: cannot read {alt!r}")
    return out


def in_range(value: Any, allowed: str) -> bool:
    """`value` is a number (not a bool), finite, and inside one of the alternatives of `allowed`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return any(
        (lo < value or (lo_in and value == lo)) and (value < hi or (hi_in and value == hi))
        for lo, lo_in, hi, hi_in in parse_range(allowed)
    )


def check_fields(obj: Any, prefix: str = "") -> None:
    """Every field of `obj` (a Config or a section, recursively) on its own: a choice (Literal) field holds one of
    its choices (a Config built in code skips the loader's coercion), a number is inside its declared range
    (`ranged` in bco_ray/config/schema.py). Raises ConfigError naming the field, the value and what it may be."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is Literal or _choices([a for a in typing.get_args(tp) if a is not type(None)]):
            _coerce(value, tp, prefix + f.name)  # raises the loader's "must be a, b or c" error
        elif "range" in f.metadata and not in_range(value, f.metadata["range"]):
            raise ConfigError(_range_message(prefix + f.name, value, f))


def _range_message(name: str, value: Any, f: dataclasses.Field) -> str:
    """'train.keep_checkpoints must be >= 1 (got 0) — newest checkpoints kept (default: 2)'."""
    doc = next((d.doc for d in field_docs(Config) if d.name == name), "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number "
    else:
        kind = "" if math.isfinite(value) else "a finite number "
    allowed = " or ".join(f"in {a}" if a[0] in "[(" else a for a in f.metadata["range"].split(" or "))
    if allowed == "finite":
        kind, allowed = "", "a finite number"
    return f"{name} must be {kind}{allowed} (got {value!r}) — {doc} (default: {show(f.default)})"


def check_config(cfg: Config) -> None:
    """Checks that need no cluster: each field on its own, then names and the checks across fields. Raises
    ConfigError naming the field and the fix."""

    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    check_fields(cfg)  # each field on its own (choices, ranges), before the checks across fields
    t, d, u, p = cfg.train, cfg.data, cfg.udm, cfg.precompute
    name = cfg.mlflow.run_name
    need(
        name is None or bool(_RUN_NAME.match(name)) and ".." not in name,
        f"mlflow.run_name {name!r} becomes a directory name (outputs, checkpoints): use letters, digits, '.', "
        "'_' and '-' only, starting with a letter or digit, with no '..' and no path separators",
    )
    _check_names(cfg, need)
    _check_liger(cfg, need)
    need(
        not t.offload_params or t.zero_stage == 3,
        "train.offload_params needs train.zero_stage=3 (DeepSpeed offloads parameters only under ZeRO-3)",
    )
    need(not t.offload_optimizer or t.zero_stage >= 1, "train.offload_optimizer needs train.zero_stage >= 1")
    need(
        0 < d.max_prompt_length < d.max_length,
        f"data.max_prompt_length ({d.max_prompt_length}) must be > 0 and < data.max_length ({d.max_length})",
    )
    need(
        u.min_density_ratio <= u.max_density_ratio,
        f"udm.min_density_ratio ({u.min_density_ratio}) must be <= udm.max_density_ratio ({u.max_density_ratio})",
    )
    lo, hi = p.ref_actors
    need(1 <= lo <= hi, f"precompute.ref_actors must be [min, max] with 1 <= min <= max (got [{lo}, {hi}])")
    _check_eval(cfg.eval, need)
    need(
        bool(_FUNCTION.fullmatch(cfg.online.labeler)),
        f"online.labeler {cfg.online.labeler!r} must name a function as 'package.module:function' "
        "(e.g. bco_ray.eval.arithmetic:verify)",
    )
    need(bool(cfg.online.prompts.strip()), "online.prompts is empty: give a data spec or 'module:function'")


_FUNCTION = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def _check_eval(e: EvalConfig, need) -> None:
    need(
        e.verifier is None or bool(_FUNCTION.fullmatch(e.verifier)),
        f"eval.verifier {e.verifier!r} must name a function as 'package.module:function' "
        "(e.g. bco_ray.eval.arithmetic:verify)",
    )


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def _check_liger(cfg: Config, need) -> None:
    if not cfg.model.liger_kernel:
        return
    need(
        cfg.train.zero_stage != 3,
        "model.liger_kernel needs the whole output-head weight on each rank: use train.zero_stage <= 2, "
        "or model.liger_kernel=false under ZeRO-3",
    )
    need(
        importlib.util.find_spec("liger_kernel") is not None,  # not imported here: it brings torch and triton
        "model.liger_kernel=true but liger-kernel is not installed: pip install 'bco-ray[liger]', "
        "or model.liger_kernel=false",
    )


def _check_names(cfg: Config, need) -> None:
    """Names that become registry entries or hub repos: no path tricks, no spaces."""
    reg, hub = cfg.mlflow.registered_model_name, cfg.hub
    need(
        reg is None or (bool(_RUN_NAME.match(reg)) and ".." not in reg),
        f"mlflow.registered_model_name {reg!r}: use letters, digits, '.', '_' and '-' only, starting with a letter "
        "or digit, with no '..' and no separators",
    )
    need(
        hub.repo_id is None or (bool(_REPO_ID.match(hub.repo_id)) and ".." not in hub.repo_id),
        f"hub.repo_id {hub.repo_id!r} must look like org/name (letters, digits, '.', '_', '-'; no '..')",
    )
    need(
        hub.revision is None or (bool(_RUN_NAME.match(hub.revision)) and ".." not in hub.revision),
        f"hub.revision {hub.revision!r}: a branch name of letters, digits, '.', '_' and '-' (no '/', no '..')",
    )
