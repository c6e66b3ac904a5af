"""How BCOConfig's values become bco-ray's: HF step counts and ratios, lengths, warmup, the eval and save
strategies, a DeepSpeed config and model_init_kwargs (used by `BCOConfig.overrides`)."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bco_ray.api.config import BCOConfig


class BCOConfigWarning(UserWarning):
    """A TRL/transformers setting that has no effect in bco-ray (or is approximated)."""


def plain_value(v: Any) -> Any:
    """Enum members of transformers (IntervalStrategy, SchedulerType, ...) as their plain values."""
    return getattr(v, "value", v)


def steps(c: BCOConfig, name: str, value: Any, default: int) -> int:
    """HF step counts: an int, or a float < 1 meaning a ratio of the total steps."""
    if value is None:
        return default
    if isinstance(value, float) and 0 < value < 1:
        if c.max_steps and c.max_steps > 0:
            return max(1, math.ceil(value * c.max_steps))
        warnings.warn(
            f"BCOConfig.{name}={value} is a ratio of the total steps, which bco-ray only knows "
            f"up front with max_steps > 0; using {default}",
            BCOConfigWarning,
            stacklevel=6,
        )
        return default
    if float(value) != int(value):
        raise ValueError(f"BCOConfig.{name} must be an integer or a ratio in (0, 1), got {value!r}")
    return int(value)


def lengths(c: BCOConfig) -> tuple[int, int]:
    """(max_length, max_prompt_length) for bco-ray. max_length None is 512 (trl 1.13's BCOTrainer does the
    same, with a warning); max_prompt_length None is max_length - 1, so that the prompt is only cut when not
    even one completion token would fit (trl 1.13 has no prompt limit)."""
    max_length = c.max_length
    if max_length is None:
        warnings.warn(
            "BCOConfig.max_length=None: using 512, as trl 1.13's BCOTrainer does; set max_length",
            BCOConfigWarning,
            stacklevel=5,
        )
        max_length = 512
    if c.max_prompt_length is None:
        return max_length, max_length - 1
    return max_length, c.max_prompt_length


def warmup_as_ratio(c: BCOConfig) -> float:
    ws = c.warmup_steps
    if not ws:
        return float(c.warmup_ratio)
    if c.warmup_ratio:
        raise ValueError("BCOConfig: set warmup_ratio or warmup_steps, not both")
    if isinstance(ws, float) and 0 < ws < 1:
        return ws
    if c.max_steps and c.max_steps > 0:
        # bco-ray warms up ceil(ratio * total) steps: a hair under steps/total gives exactly `ws` steps
        return min(max(0.0, (int(ws) - 1e-6) / c.max_steps), 0.999999)
    raise ValueError(
        f"BCOConfig.warmup_steps={ws}: bco-ray sets warmup as a ratio of the total steps; "
        "use warmup_ratio, or set max_steps so that the ratio is exact"
    )


def eval_every(c: BCOConfig) -> int:
    strategy = str(plain_value(c.eval_strategy))
    if strategy == "steps":
        return steps(c, "eval_steps", c.eval_steps if c.eval_steps is not None else c.logging_steps, default=0)
    if strategy == "epoch":
        warnings.warn(
            "BCOConfig.eval_strategy='epoch': bco-ray evaluates every eval_steps steps or at the end; "
            "evaluating at the end only",
            BCOConfigWarning,
            stacklevel=5,
        )
    elif strategy != "no":
        raise ValueError(f"BCOConfig.eval_strategy must be 'no', 'steps' or 'epoch', got {strategy!r}")
    elif c.eval_steps is not None:
        warnings.warn(
            "BCOConfig.eval_steps is ignored with eval_strategy='no' (as in transformers); set eval_strategy='steps'",
            BCOConfigWarning,
            stacklevel=5,
        )
    return 0


def save_every(c: BCOConfig) -> int:
    strategy = str(plain_value(c.save_strategy))
    if strategy == "steps":
        return steps(c, "save_steps", c.save_steps, default=0)
    if strategy in ("epoch", "best"):
        warnings.warn(
            f"BCOConfig.save_strategy={strategy!r}: bco-ray checkpoints every save_steps steps; "
            "no intermediate checkpoints (the final model is always saved)",
            BCOConfigWarning,
            stacklevel=5,
        )
    elif strategy != "no":
        raise ValueError(f"BCOConfig.save_strategy must be 'no', 'steps', 'epoch' or 'best', got {strategy!r}")
    return 0


def deepspeed_fields(c: BCOConfig) -> dict:
    ds = c.deepspeed
    if ds is None:
        return {}
    if isinstance(ds, (str, os.PathLike)):
        ds = json.loads(Path(ds).read_text())
    if not isinstance(ds, dict):
        raise ValueError(f"BCOConfig.deepspeed must be a JSON file path or a dict, got {type(ds).__name__}")
    out: dict = {}
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage")
    if stage is not None and stage != "auto":
        out["zero_stage"] = int(stage)
    for src, dst in (("offload_optimizer", "offload_optimizer"), ("offload_param", "offload_params")):
        dev = (zero.get(src) or {}).get("device", "none")
        if dev not in (None, "none"):
            out[dst] = True
            if dev != "cpu":
                warnings.warn(
                    f"BCOConfig.deepspeed: {src}.device={dev!r} -> bco-ray offloads to CPU",
                    BCOConfigWarning,
                    stacklevel=5,
                )
    derived = {
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "train_batch_size",
        "gradient_clipping",
        "optimizer",
        "scheduler",
        "bf16",
        "fp16",
        "zero_optimization",
        "steps_per_print",
        "wall_clock_breakdown",
        "zero_allow_untested_optimizer",
    }
    extra = sorted(k for k in ds if k not in derived)
    zero_extra = sorted(
        k for k in zero if k not in ("stage", "offload_optimizer", "offload_param") and zero[k] != "auto"
    )
    if extra or zero_extra:
        warnings.warn(
            "BCOConfig.deepspeed: bco-ray builds the DeepSpeed config from the BCOConfig fields and "
            "takes only zero_optimization.stage / offload_optimizer / offload_param from yours; "
            f"ignored: {extra + ['zero_optimization.' + k for k in zero_extra]}",
            BCOConfigWarning,
            stacklevel=5,
        )
    return out


def model_init_fields(c: BCOConfig) -> dict:
    kw = dict(c.model_init_kwargs or {})
    out: dict = {}
    dtype = kw.pop("dtype", None) or kw.pop("torch_dtype", None)
    kw.pop("torch_dtype", None)
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        out["dtype"] = {
            "bf16": "bfloat16",
            "fp16": "float16",
            "fp32": "float32",
            "float": "float32",
            "half": "float16",
        }.get(name, name)
    for k in ("revision", "trust_remote_code", "attn_implementation"):
        if k in kw:
            out[k] = kw.pop(k)
    if kw:
        warnings.warn(
            f"BCOConfig.model_init_kwargs: {sorted(kw)} ignored (bco-ray takes dtype, revision, "
            "trust_remote_code and attn_implementation)",
            BCOConfigWarning,
            stacklevel=5,
        )
    return out


def normalise_parsed_values(c: BCOConfig, dict_fields: tuple[str, ...]) -> None:
    """What TrainingArguments' `__post_init__` does to command-line values: JSON strings of dict fields
    ('{"stage": 3}') become dicts; whole-number float step counts (10.0 from `--logging_steps 10`) become ints."""
    for name in dict_fields:
        value = getattr(c, name, None)
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                setattr(c, name, json.loads(value))
            except json.JSONDecodeError as e:
                raise ValueError(f"BCOConfig.{name}: not valid JSON ({e}): {value!r}") from None
    for name in ("logging_steps", "eval_steps", "save_steps", "warmup_steps"):
        value = getattr(c, name)
        if isinstance(value, float) and value >= 1 and value == int(value):
            setattr(c, name, int(value))


class LaunchError(RuntimeError):
    """The script was started as several processes (torchrun, accelerate launch, deepspeed): bco-ray starts its
    own training workers on Ray, so it runs as one process."""


def _in_ray_actor() -> bool:
    """True in a Ray actor (e.g. a Ray Train worker, which has RANK and WORLD_SIZE set by Ray Train)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    return ray.get_runtime_context().get_actor_id() is not None


def check_launcher(env: dict | None = None) -> None:
    """Fail at once, on every rank, when the script runs under a multi-process launcher (`WORLD_SIZE` > 1):
    each copy would start its own Ray job. Nothing has been loaded or started yet when this runs (BCOConfig is
    built when the arguments are parsed), so no rank waits on another."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE") or 1)
    except ValueError:
        return
    if world <= 1 or _in_ray_actor():
        return
    raise LaunchError(
        f"bco-ray was started as {world} processes (RANK={env.get('RANK')}, WORLD_SIZE={world}: torchrun, "
        "accelerate launch or deepspeed). bco-ray starts its own training processes on Ray (one DeepSpeed rank "
        f"each): run the script once, as `python bco.py ...` instead of `torchrun`/`accelerate launch`, and "
        f"pass `--num_workers {world}` (BCOConfig(num_workers={world})) for {world} workers"
    )
