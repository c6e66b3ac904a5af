"""How TRL / transformers field names map onto bco-ray's config sections."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from bco_ray.config import Config, ConfigError, TrainConfig, flatten, load_config, merge

FIELD_MAP: dict[str, str] = {
    "output_dir": "output_dir",
    "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "learning_rate": "train.lr",
    "num_train_epochs": "train.num_epochs",
    "max_steps": "train.max_steps",
    "warmup_ratio": "train.warmup_ratio",
    "warmup_steps": "train.warmup_ratio",
    "lr_scheduler_type": "train.lr_scheduler",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "logging_steps": "train.logging_steps",
    "eval_steps": "train.eval_steps",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.keep_checkpoints",
    "seed": "train.seed",
    "data_seed": "data.seed",
    "bf16": "train.bf16",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "disable_dropout": "train.disable_dropout",
    "deepspeed": "train.zero_stage",
    "use_cpu": "train.use_gpu",
    "beta": "train.beta",
    "max_length": "data.max_length",
    "max_prompt_length": "data.max_prompt_length",
    "prompt_sample_size": "udm.prompt_sample_size",
    "min_density_ratio": "udm.min_density_ratio",
    "max_density_ratio": "udm.max_density_ratio",
    "run_name": "mlflow.run_name",
    "trust_remote_code": "model.trust_remote_code",
    "use_liger_kernel": "model.liger_kernel",
    "num_workers": "train.num_workers",
    "use_gpu": "train.use_gpu",
    "storage_path": "train.storage_path",
    "mlflow_tracking_uri": "mlflow.tracking_uri",
    "mlflow_experiment": "mlflow.experiment",
    "udm_embedding_model": "udm.embedding_model",
    "precompute_num_gpus_per_actor": "precompute.num_gpus_per_actor",
}

# Names of TRL's BCOConfig / older transformers TrainingArguments that are not fields of the installed
# transformers' TrainingArguments: accepted (with a warning when they have no effect here), never "unknown".
_TRL_ONLY = {
    "max_completion_length",
    "generate_during_eval",
    "is_encoder_decoder",
    "ref_model_init_kwargs",
    "dataset_num_proc",
    "label_pad_token_id",
    "padding_value",
    "lr_scheduler_kwargs",
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
    "hub_private_repo",
}

# linear, cosine, constant: the choices of bco-ray's train.lr_scheduler
_SCHEDULERS: tuple[str, ...] = typing.get_args(typing.get_type_hints(TrainConfig)["lr_scheduler"])


def _known_foreign() -> set[str]:
    """Field names of transformers' TrainingArguments (installed version) and of trl's BCOConfig."""
    global _FOREIGN
    if _FOREIGN is None:
        try:
            from transformers import TrainingArguments

            names = {f.name for f in dataclasses.fields(TrainingArguments)}
        except Exception:  # noqa: BLE001 - a broken transformers import must not break the config
            names = set()
        from bco_ray.api._trl_defaults import TRL_1_13_BCO_FIELDS

        _FOREIGN = names | _TRL_ONLY | set(TRL_1_13_BCO_FIELDS)
    return _FOREIGN


_FOREIGN: set[str] | None = None


def _why_ignored(name: str) -> str:
    if name.startswith(("push_to_hub", "hub_")):
        return "push the saved model yourself: trainer.save_model() then push_to_hub"
    if name in ("optim", "adam_beta1", "adam_beta2", "adam_epsilon", "optim_args", "lr_scheduler_kwargs"):
        return "the optimizer is DeepSpeed's AdamW with betas (0.9, 0.999), eps 1e-8"
    if name.startswith(("dataloader_", "dataset_num_proc", "remove_unused_columns", "group_by_length")):
        return "data is read by Ray Data"
    if name in ("fp16", "fp16_full_eval", "bf16_full_eval", "tf32", "half_precision_backend"):
        return "precision: bf16 on GPU, float32 on CPU, or bf16=True/False"
    if name in ("resume_from_checkpoint",):
        return "an unfinished run resumes from its latest checkpoint when run_name is reused"
    if name in ("max_completion_length", "is_encoder_decoder", "label_pad_token_id", "padding_value"):
        return "decoder-only models; the completion gets the budget max_length leaves after the prompt"
    return "not used by the Ray pipeline"


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
        {k for k, v in FIELD_MAP.items() if v != "output_dir" and re.search(rf"{re.escape(v)}\b(?!\.)", msg)}
    )
    return f"{msg} (BCOConfig field: {', '.join(names)})" if names else msg


# ============================================================================================ trainer
