"""The defaults of trl 1.13.0's `BCOConfig`, recorded from its source (trl is not needed to read them).

trl 1.13's `BCOConfig` (trl/experimental/bco/bco_config.py) subclasses `_BaseConfig`
(trl/trainer/base_config.py), which subclasses transformers' `TrainingArguments` (transformers 5.24.0,
transformers/training_args.py; trl 1.13 requires transformers >= 4.56.2). Each entry is the field's declared
default and the file:line it comes from; `__post_init__` effects are noted where they change the value a script
reads. Only fields that bco-ray's `BCOConfig` declares are recorded (the others are accepted and ignored, see
`TRL_1_13_BCO_FIELDS`). `tests/test_trl_defaults.py` checks bco-ray's defaults against this record, and
`tools/doc_table.py` renders docs/trl_migration.md's field table from it.
"""

from __future__ import annotations

TRL = "trl/experimental/bco/bco_config.py"
BASE = "trl/trainer/base_config.py"
HF = "transformers/training_args.py (5.24.0)"

# Where each recorded default is declared: source file -> {field: (declared default, line)}
_DECLARED: dict[str, dict[str, tuple[object, int]]] = {
    TRL: {  # BCO fields and trl's override of learning_rate
        "learning_rate": (5e-7, 82),
        "max_length": (1024, 87),
        "beta": (0.1, 101),
        "disable_dropout": (True, 108),
        "precompute_ref_log_probs": (False, 127),
        "model_init_kwargs": (None, 135),
        "trust_remote_code": (False, 142),
        "prompt_sample_size": (1024, 153),
        "min_density_ratio": (0.5, 157),
        "max_density_ratio": (10.0, 161),
    },
    BASE: {  # overrides common to TRL trainers
        "logging_steps": (10, 55),
        "gradient_checkpointing": (True, 62),
        "bf16": (None, 68),
        "use_liger_kernel": (False, 90),
    },
    HF: {  # transformers' TrainingArguments, inherited unchanged
        "output_dir": (None, 772),
        "per_device_train_batch_size": (8, 777),
        "num_train_epochs": (3.0, 778),
        "max_steps": (-1, 780),
        "lr_scheduler_type": ("linear", 789),
        "warmup_steps": (0, 799),
        "weight_decay": (0.0, 823),
        "gradient_accumulation_steps": (1, 850),
        "max_grad_norm": (1.0, 867),
        "report_to": ("none", 1060),
        "run_name": (None, 1066),
        "eval_strategy": ("no", 1107),
        "eval_steps": (None, 1111),
        "per_device_eval_batch_size": (8, 1129),
        "save_strategy": ("steps", 1178),
        "save_steps": (500, 1184),
        "save_total_limit": (None, 1202),
        "seed": (42, 1293),
        "data_seed": (None, 1295),
        "use_cpu": (False, 1301),
        "deepspeed": (None, 1464),
    },
}

# `__post_init__` effects that change the value a script reads: field -> what happens
_POST_INIT: dict[str, str] = {
    "bf16": "__post_init__ (line 105) makes None `not fp16`, i.e. True",
    "output_dir": "__post_init__ (line 1518) makes None 'trainer_output'",
}


def _where(name: str, source: str, line: int) -> str:
    """ "file:line", and the field's `__post_init__` effect if it has one."""
    return f"{source}:{line}; {_POST_INIT[name]}" if name in _POST_INIT else f"{source}:{line}"


# field -> (declared default, where it is set)
TRL_1_13_DEFAULTS: dict[str, tuple[object, str]] = {
    name: (default, _where(name, source, line))
    for source, declared in _DECLARED.items()
    for name, (default, line) in declared.items()
}

# Where bco-ray's default differs on purpose: field -> why.
INTENTIONAL_DIFFERENCES: dict[str, str] = {
    "report_to": "None: bco-ray always logs to MLflow; an explicit 'none' warns that it still does",
    "precompute_ref_log_probs": "None: bco-ray always precomputes, as trl does with True; an explicit False warns",
}

# bco-ray BCOConfig fields that trl 1.13's BCOConfig does not have: field -> where the name comes from.
NOT_IN_TRL_1_13: dict[str, str] = {
    "warmup_ratio": "transformers < 5's, default 0.0; transformers 5 reads warmup_steps < 1 as a ratio",
    "max_prompt_length": "older trl's, default 512; trl 1.13 never cuts the prompt",
    "truncation_mode": "older trl's, default 'keep_end'; trl 1.13 has no prompt truncation",
}

# trl 1.13 BCOConfig's own fields (bco_config.py lines 81-163, base_config.py lines 54-102): bco-ray
# accepts every one of them (declared, or recorded in `ignored_fields` with a warning).
TRL_1_13_BCO_FIELDS: tuple[str, ...] = (
    "learning_rate",
    "max_length",
    "max_completion_length",
    "beta",
    "disable_dropout",
    "generate_during_eval",
    "is_encoder_decoder",
    "precompute_ref_log_probs",
    "model_init_kwargs",
    "trust_remote_code",
    "dataset_num_proc",
    "prompt_sample_size",
    "min_density_ratio",
    "max_density_ratio",
    "logging_steps",
    "gradient_checkpointing",
    "bf16",
    "lr_scheduler_kwargs",
    "use_liger_kernel",
    "torch_empty_cache_steps",
)
