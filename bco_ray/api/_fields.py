"""What bco-ray does with each `BCOConfig` field: the one table that the config's warnings, its error messages
(bco-ray names back to BCOConfig names) and docs/trl_migration.md's field table are read from.

A field is *mapped* (it sets the bco-ray config fields listed in `ROUTES`), *honoured* (listed in `ROUTES` with no
bco-ray field: the API itself uses it, e.g. `push_to_hub`, `per_device_eval_batch_size`), or *ignored* (every
other field of transformers' `TrainingArguments` and trl's `BCOConfig`: accepted, recorded in
`args.ignored_fields` when set to a value other than its default, with one warning giving `why_ignored`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

# Mapped fields: field -> (bco-ray config field(s) it sets, comma-separated; note); `HONOURED` and `SAME_NAME`
# below add the rest (an honoured field's entry has "" for its bco-ray fields).
ROUTES: dict[str, tuple[str, str]] = {
    "output_dir": (
        "output_dir",
        'None: `"trainer_output"`, as in TrainingArguments. Runs, inputs, precompute cache and Ray storage go under it',
    ),
    "per_device_train_batch_size": ("train.micro_batch_size", "rows per worker per forward"),
    "gradient_accumulation_steps": (
        "train.gradient_accumulation_steps",
        "global batch = workers × micro-batch × accumulation",
    ),
    "learning_rate": ("train.lr", "trl's BCOConfig sets 5e-7 (TrainingArguments: 5e-5)"),
    "num_train_epochs": (
        "train.num_epochs",
        "whole epochs; a fraction is rounded up (warning) unless `max_steps` is set",
    ),
    "warmup_ratio": (
        "train.warmup_ratio",
        "transformers < 5's name; kept as an alias of a ratio-valued `warmup_steps`",
    ),
    "warmup_steps": (
        "train.warmup_ratio",
        "a float < 1 is a ratio; an integer needs `max_steps` (exact: ceil(ratio × max_steps) = warmup_steps)",
    ),
    "lr_scheduler_type": ("train.lr_scheduler", "`linear`, `cosine` or `constant`; others are an error"),
    "logging_steps": (
        "train.logging_steps",
        "trl's default (TrainingArguments: 500); a float < 1 is a ratio of `max_steps`",
    ),
    "eval_strategy": (
        "train.eval_steps",
        '`"steps"`: every `eval_steps` (default `logging_steps`); `"no"`/`"epoch"`: at the end only. With an eval '
        "set, the end-of-training eval always runs",
    ),
    "eval_steps": ("train.eval_steps", 'used with `eval_strategy="steps"`; a float < 1 is a ratio of `max_steps`'),
    "save_strategy": (
        "train.save_steps",
        '`"steps"`: resumable Ray Train checkpoints (DeepSpeed state, δ, data position) every `save_steps`; '
        '`"no"`/`"epoch"`/`"best"`: none. With checkpoints on, per-step metrics reach MLflow at each checkpoint '
        "(so a resumed run logs no step twice)",
    ),
    "save_total_limit": ("train.keep_checkpoints", "None keeps bco-ray's default, 2"),
    "seed": ("train.seed", "also the shuffle seed unless `data_seed` is set"),
    "data_seed": ("data.seed", "`data.seed` (the shuffle) is `data_seed`, else `seed`"),
    "bf16": (
        "train.bf16",
        "None: bf16 on GPU, float32 on CPU (trl's `__post_init__` makes None `not fp16`, i.e. bf16 even on CPU); "
        "True/False force it",
    ),
    "gradient_checkpointing": ("train.gradient_checkpointing", "trl's default (TrainingArguments: False)"),
    "activation_checkpointing": (
        "train.gradient_checkpointing",
        "transformers 5's name of `gradient_checkpointing`; wins when set",
    ),
    "use_cpu": ("train.use_gpu", "True: train on CPU workers (`train.use_gpu=false`)"),
    "deepspeed": (
        "train.zero_stage, train.offload_optimizer, train.offload_params",
        "a JSON path, a JSON string or a dict; only `zero_optimization.stage` and the offload devices are taken "
        "(bco-ray builds the rest; a warning lists what is ignored). Default ZeRO-2",
    ),
    "run_name": ("mlflow.run_name", "also the Ray Train run name; the same name continues a run"),
    # BCO fields
    "max_length": ("data.max_length", "None: 512, with a warning (as trl 1.13's BCOTrainer)"),
    "max_prompt_length": (
        "data.max_prompt_length",
        "None: `max_length − 1`, so the prompt is cut only when not one completion token would fit (trl 1.13's "
        "rule); see *Truncation* below",
    ),
    "model_init_kwargs": (
        "model.dtype, model.revision, model.trust_remote_code, model.attn_implementation",
        "for models given as ids/paths; other keys warn",
    ),
    "trust_remote_code": (
        "model.trust_remote_code",
        "for models given as ids/paths (also read from `model_init_kwargs`)",
    ),
    "use_liger_kernel": (
        "model.liger_kernel",
        "Liger's fused linear cross-entropy for the policy's log-probs in training, on GPU (needs the `[liger]` "
        "extra; not under ZeRO-3). trl patches the whole model with Liger's kernels",
    ),
    # bco-ray's own fields
    "num_workers": ("train.num_workers", "one DeepSpeed rank each, like `accelerate launch` processes"),
    "use_gpu": (
        "train.use_gpu",
        "None: GPUs when the Ray cluster has at least `num_workers` of them (then the scoring actors take 0.5 GPU "
        "each)",
    ),
    "storage_path": (
        "train.storage_path",
        "checkpoints; None: `$BCO_RAY_STORAGE/ray`, else `<output_dir>/ray`. Shared or `s3://` on clusters",
    ),
    "mlflow_tracking_uri": (
        "mlflow.tracking_uri",
        "None: `$MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/mlflow.db` (in a submitted job: `~/bco-ray/mlflow.db`, "
        "or under a local `$BCO_RAY_STORAGE`)",
    ),
    "mlflow_experiment": ("mlflow.experiment", ""),
    "udm_embedding_model": (
        "udm.embedding_model",
        "an encoder id or path: turns UDM on (mean-pooled, L2-normalised states)",
    ),
    "precompute_num_gpus_per_actor": (
        "precompute.num_gpus_per_actor",
        "None: 0.5 with GPUs (reference and embedding pools share one), else 0",
    ),
}

# Honoured fields: the API itself uses them (no bco-ray config field): field -> note
HONOURED: dict[str, str] = {
    "per_device_eval_batch_size": (
        "used by `trainer.evaluate()`; the in-run eval uses the train micro-batch size (same numbers)"
    ),
    "report_to": "bco-ray always logs to MLflow; other integrations warn",
    "push_to_hub": "read by your script; `trainer.push_to_hub()` pushes `save_model`'s directory",
    "hub_model_id": "`trainer.push_to_hub()`'s repo; None: the name of `output_dir`",
    "hub_token": "`trainer.push_to_hub()`'s token; None: `$HF_TOKEN`",
    "hub_private_repo": "`trainer.push_to_hub()` creates the repo private",
    "hub_revision": "`trainer.push_to_hub()`'s branch (created if missing)",
    "truncation_mode": "only `keep_end` (error otherwise)",
    "precompute_ref_log_probs": "always precomputed here; `False` warns",
    "inputs_dir": (
        "where in-memory inputs are saved (a path or an `s3://` URI); None: `$BCO_RAY_STORAGE/inputs` if set, else "
        "`<output_dir>/inputs`"
    ),
    "bco_ray_overrides": (
        'any bco-ray field, e.g. `{"train.zero_stage": 3, "precompute.ref_actors": [1, 4]}` (a dict or a JSON string)'
    ),
}
ROUTES.update({name: ("", note) for name, note in HONOURED.items()})

# Fields that set the bco-ray field of the same name, with nothing to add: section -> field names
SAME_NAME: dict[str, tuple[str, ...]] = {
    "train": ("max_steps", "weight_decay", "max_grad_norm", "save_steps", "disable_dropout", "beta"),
    "udm": ("prompt_sample_size", "min_density_ratio", "max_density_ratio"),
}
ROUTES.update({name: (f"{section}.{name}", "") for section, names in SAME_NAME.items() for name in names})

# Names of older transformers / trl releases that are not fields of the installed TrainingArguments: accepted by
# BCOConfig(...) (recorded in `ignored_fields`, with a warning), never "unknown".
LEGACY: frozenset[str] = frozenset(
    {
        "evaluation_strategy",
        "overwrite_output_dir",
        "logging_dir",
        "no_cuda",
        "use_mps_device",
        "use_ipex",
        "jit_mode_eval",
        "torchdynamo",
        "ray_scope",
        "include_tokens_per_second",
        "dispatch_batches",
        "split_batches",
        "push_to_hub_token",
        "push_to_hub_model_id",
        "push_to_hub_organization",
        "fp16_backend",
        "half_precision_backend",
        "tpu_num_cores",
        "tpu_metrics_debug",
        "past_index",
        "mp_parameters",
        "use_legacy_prediction_loop",
        "fp16_opt_level",
        "evaluate_during_training",
        "save_safetensors",
        "eval_do_concat_batches",
        "optim_target_modules",
    }
)

# Dict-valued fields a command line gives as JSON strings (transformers' `_VALID_DICT_FIELDS`, trl's, bco-ray's).
DICT_FIELDS = (
    "accelerator_config",
    "fsdp_config",
    "deepspeed",
    "activation_checkpointing_kwargs",
    "gradient_checkpointing_kwargs",
    "lr_scheduler_kwargs",
    "model_init_kwargs",
    "bco_ray_overrides",
)

_IGNORED_BY_PREFIX: tuple[tuple[tuple[str, ...], str], ...] = (
    (("hub_", "push_to_hub"), "`trainer.push_to_hub()` reads hub_model_id, hub_token, hub_private_repo, hub_revision"),
    (
        ("optim", "adam_", "lr_scheduler_kwargs"),
        "the optimizer is DeepSpeed's AdamW with betas (0.9, 0.999), eps 1e-8, and the lr_scheduler_type schedule",
    ),
    (
        ("dataloader_", "dataset_num_proc", "remove_unused_columns", "group_by_length", "length_column_name"),
        "data is read by Ray Data",
    ),
    (
        ("fp16", "bf16_full_eval", "tf32", "half_precision_backend"),
        "precision: bf16 on GPU, float32 on CPU, or bf16=True/False",
    ),
    (("torch_compile", "torch_empty_cache", "use_cache"), "the workers run the model as bco-ray sets it up (eager)"),
    (("resume_from_checkpoint",), "an unfinished run resumes from its latest checkpoint when run_name is reused"),
    (
        ("max_completion_length", "is_encoder_decoder", "label_pad_token_id", "padding_value"),
        "decoder-only models; the completion gets the budget max_length leaves after the prompt",
    ),
    (("generate_during_eval",), "no generation during eval"),
    (
        ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
        'bco-ray checkpoints with {"use_reentrant": False}',
    ),
    (
        ("fsdp", "accelerator_config", "parallelism_config", "ddp_", "local_rank"),
        "Ray Train + DeepSpeed run the workers",
    ),
    (("do_train", "do_eval", "do_predict"), "read by your script only (as in transformers)"),
    # GRPOConfig's fields that OnlineBCOConfig accepts
    (
        ("top_k", "min_p", "repetition_penalty", "generation_kwargs", "use_vllm"),
        "online BCO samples with temperature and top_p (transformers' generate on the rollout actor)",
    ),
    (
        ("num_iterations", "epsilon", "loss_type", "scale_rewards", "mask_truncated_completions"),
        "GRPO's loss settings: online BCO trains each round's rows once, with the BCO loss",
    ),
    (("log_completions",), "each round's samples are logged to MLflow (online/samples_round_*.json)"),
    (("shuffle_dataset",), "the prompts are always drawn in seeded shuffled passes"),
)


def targets(name: str) -> list[str]:
    """The bco-ray config fields that BCOConfig field `name` sets (none for honoured and ignored fields)."""
    to = ROUTES.get(name, ("", ""))[0]
    return [t.strip() for t in to.split(",") if t.strip()]


def status(name: str) -> str:
    """ "mapped", "honoured" or "ignored"."""
    if name not in ROUTES:
        return "ignored"
    return "mapped" if targets(name) else "honoured"


def why_ignored(name: str) -> str:
    for prefixes, why in _IGNORED_BY_PREFIX:
        if name.startswith(prefixes):
            return why
    return "not used by the Ray pipeline"


def note(name: str) -> str:
    """The doc's note: the route's note, or why the field has no effect."""
    return ROUTES[name][1] if name in ROUTES else why_ignored(name)


# Parser metadata of a `bool | None` field: `--bf16` alone means True, as for a plain bool (HfArgumentParser asks a
# `bool | None` field with default None for a value: `--bf16 true`), `--bf16 false` False, absent None.
FLAG: dict[str, Any] = {"nargs": "?", "const": True}


def training_arguments_fields(own: dict[str, Any]) -> dict[str, tuple[Any, dataclasses.Field]]:
    """{name: (type, dataclasses.field)} of every field of the installed transformers' `TrainingArguments` that is
    not in `own` (a class's own annotations): its resolved type, default (or default factory) and help."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    out = {}
    for f in dataclasses.fields(TrainingArguments):
        if not f.init or f.name in own or f.name.startswith("_"):
            continue
        kw: dict[str, Any] = {"metadata": f.metadata}
        if hints[f.name] == bool | None and f.default is None:
            kw["metadata"] = {**f.metadata, **FLAG}
        if f.default_factory is not dataclasses.MISSING:
            kw["default_factory"] = f.default_factory
        else:
            kw["default"] = f.default
        out[f.name] = (hints[f.name], dataclasses.field(**kw))
    return out


def with_training_arguments(cls):
    """Class decorator (under @dataclass): declare every TrainingArguments field the class does not, after its own,
    with transformers' type, default and help, so that `HfArgumentParser` and trl's `TrlParser` take any TRL
    command line, as they do for trl's BCOConfig (a TrainingArguments subclass)."""
    own = dict(cls.__dict__.get("__annotations__", {}))
    added = training_arguments_fields(own)
    cls.__annotations__ = {**own, **{name: t for name, (t, _) in added.items()}}
    for name, (_, f) in added.items():
        setattr(cls, name, f)
    return cls
