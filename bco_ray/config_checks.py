"""The config's range and name checks (`validate` in bco_ray.config runs them): each bad value gets one
ConfigError naming the field and the fix, before any Ray work starts."""

from __future__ import annotations

import importlib.util
import re

from bco_ray.config import Config, ConfigError, EvalConfig

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_config(cfg: Config) -> None:
    """Range checks that need no cluster. Raises ConfigError naming the field and the fix."""

    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    t, d, u, p = cfg.train, cfg.data, cfg.udm, cfg.precompute
    name = cfg.mlflow.run_name
    need(
        name is None or bool(_RUN_NAME.match(name)) and ".." not in name,
        f"mlflow.run_name {name!r} becomes a directory name (outputs, checkpoints): use letters, digits, '.', "
        "'_' and '-' only, starting with a letter or digit, with no '..' and no path separators",
    )
    _check_names(cfg, need)
    _check_liger(cfg, need)
    need(t.beta > 0, f"train.beta must be > 0 (got {t.beta}); the reference default is 0.1")
    need(t.num_workers >= 1, f"train.num_workers must be >= 1 (got {t.num_workers})")
    need(t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1 (got {t.micro_batch_size})")
    need(
        t.micro_batch_tokens >= -1,
        f"train.micro_batch_tokens must be -1 (micro_batch_size × data.max_length), "
        f"0 (no packing) or a token count (got {t.micro_batch_tokens})",
    )
    need(
        t.gradient_accumulation_steps >= 1,
        f"train.gradient_accumulation_steps must be >= 1 (got {t.gradient_accumulation_steps})",
    )
    need(t.lr >= 0, f"train.lr must be >= 0 (got {t.lr})")
    need(0 <= t.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1) (got {t.warmup_ratio})")
    need(t.num_epochs >= 1, f"train.num_epochs must be >= 1 (got {t.num_epochs})")
    need(t.max_steps == -1 or t.max_steps > 0, f"train.max_steps must be -1 (no cap) or > 0 (got {t.max_steps})")
    need(t.logging_steps >= 1, f"train.logging_steps must be >= 1 (got {t.logging_steps})")
    need(
        not t.offload_params or t.zero_stage == 3,
        "train.offload_params needs train.zero_stage=3 (DeepSpeed offloads parameters only under ZeRO-3)",
    )
    need(not t.offload_optimizer or t.zero_stage >= 1, "train.offload_optimizer needs train.zero_stage >= 1")
    need(d.max_length >= 2, f"data.max_length must be >= 2 (got {d.max_length})")
    need(
        0 < d.max_prompt_length < d.max_length,
        f"data.max_prompt_length ({d.max_prompt_length}) must be > 0 and < data.max_length ({d.max_length})",
    )
    need(u.min_density_ratio > 0, f"udm.min_density_ratio must be > 0 (got {u.min_density_ratio})")
    need(
        u.min_density_ratio <= u.max_density_ratio,
        f"udm.min_density_ratio ({u.min_density_ratio}) must be <= udm.max_density_ratio ({u.max_density_ratio})",
    )
    need(u.prompt_sample_size >= 2, f"udm.prompt_sample_size must be >= 2 (got {u.prompt_sample_size})")
    lo, hi = p.ref_actors
    need(1 <= lo <= hi, f"precompute.ref_actors must be [min, max] with 1 <= min <= max (got [{lo}, {hi}])")
    need(p.num_gpus_per_actor >= 0, f"precompute.num_gpus_per_actor must be >= 0 (got {p.num_gpus_per_actor})")
    need(p.batch_size >= 1 and p.token_budget >= 1, "precompute.batch_size and precompute.token_budget must be >= 1")
    _check_eval(cfg.eval, need)


def _check_eval(e: EvalConfig, need) -> None:
    need(
        e.verifier is None or bool(re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", e.verifier)),
        f"eval.verifier {e.verifier!r} must name a function as 'package.module:function' "
        "(e.g. bco_ray.eval.arithmetic:verify)",
    )
    for name in ("num_prompts", "max_new_tokens", "batch_size"):
        need(getattr(e, name) >= 1, f"eval.{name} must be >= 1 (got {getattr(e, name)})")
    need(
        e.temperature > 0,
        f"eval.temperature must be > 0 (got {e.temperature}); for greedy completions only, set eval.sample=false",
    )
    need(0 < e.top_p <= 1, f"eval.top_p must be in (0, 1] (got {e.top_p})")


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
