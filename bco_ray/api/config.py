"""`BCOConfig`: TRL's BCOConfig field names and defaults, mapped onto bco-ray's typed Config."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from bco_ray.api._conversions import (
    BCOConfigWarning,
    check_launcher,
    deepspeed_fields,
    eval_every,
    lengths,
    model_init_fields,
    normalise_parsed_values,
    plain_value,
    save_every,
    steps,
    warmup_as_ratio,
)
from bco_ray.api._fields import DICT_FIELDS, FLAG, LEGACY, status, why_ignored, with_training_arguments
from bco_ray.api._mapping import _SCHEDULERS, _report_to, _to_config
from bco_ray.config.schema import Config

__all__ = ["BCOConfig", "BCOConfigWarning"]


def _unset(v: Any) -> bool:
    """None, False, empty, or "no"/"none"/"false": what an option not given can come back as from argparse."""
    if v is None or v is False:
        return True
    if isinstance(v, str):
        return v.strip().lower() in ("", "no", "none", "false")
    return isinstance(v, (list, tuple, dict)) and not v


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass(init=False)
@with_training_arguments
class BCOConfig:
    """TRL's `BCOConfig` as a dataclass: trl 1.13's `BCOConfig` fields (transformers `TrainingArguments` + BCO
    fields) with their parser types and TRL's defaults, then bco-ray's fields for Ray and MLflow. The fields
    declared below are those bco-ray maps or trl overrides; `with_training_arguments` declares every other field of
    the installed transformers' `TrainingArguments`, with its type, default and help, so that `HfArgumentParser`
    and trl's `TrlParser` parse any TRL BCO command line into it. `to_config()` maps it onto bco-ray's `Config`.
    The defaults are checked against trl 1.13.0's source (recorded in `bco_ray/api/_trl_defaults.py`); what each
    field does here is `bco_ray/api/_fields.py`'s table.

    Truncation: trl 1.13 has no `max_prompt_length`; it never cuts the prompt and cuts the completion from the
    right to the budget `max_length` leaves (BOS and EOS counted). bco-ray keeps `max_prompt_length` (and
    `truncation_mode="keep_end"`) from older trl: a row longer than `max_length` keeps the last
    `max_prompt_length` prompt tokens, then the completion is cut from the right to the remaining budget; a row
    left with no completion token is dropped and counted. Unset (None), `max_prompt_length` is
    `max_length - 1`: the prompt stays whole whenever one completion token still fits, i.e. trl 1.13's rule.
    `max_length=None` is 512, with a warning, as in trl 1.13's BCOTrainer.

    Only keyword arguments (plus `output_dir` as the one positional, as in TrainingArguments). A field bco-ray
    cannot honour is accepted, and when set to a value other than its default it is recorded in `ignored_fields`
    with one `BCOConfigWarning` saying why; a name that is no field (nor an older transformers name) raises
    TypeError. Started as several processes (torchrun, accelerate launch), it raises `LaunchError` on every rank:
    bco-ray starts its own workers (`num_workers`)."""

    output_dir: str | None = None  # None: "trainer_output", as in TrainingArguments
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8  # used by BCOTrainer.evaluate(); the in-run eval uses the train size
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-7  # trl's BCOConfig (TrainingArguments: 5e-5)
    num_train_epochs: float = 3.0
    max_steps: int = -1
    warmup_ratio: float = 0.0
    warmup_steps: float = 0  # transformers 5: a value < 1 is a ratio
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: float = 10  # trl's default (transformers: 500); < 1: a ratio
    eval_strategy: str = "no"
    eval_steps: float | None = None
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: int | None = None
    seed: int = 42
    data_seed: int | None = None
    bf16: bool | None = field(default=None, metadata=FLAG)  # None: bf16 on GPU, float32 on CPU (trl: not fp16)
    gradient_checkpointing: bool = True  # trl's default
    disable_dropout: bool = True
    use_cpu: bool = False
    deepspeed: dict | str | None = None  # a DeepSpeed JSON path, JSON string or dict: ZeRO stage and offload are taken
    report_to: None | str | list[str] = None
    run_name: str | None = None
    # BCO fields (trl 1.13's BCOConfig and _BaseConfig)
    beta: float = 0.1
    max_length: int | None = 1024
    max_completion_length: int | None = None  # ignored: the completion gets what max_length leaves
    max_prompt_length: int | None = None  # not in trl 1.13; None: max_length - 1 (the prompt is not cut)
    truncation_mode: str = "keep_end"
    generate_during_eval: bool = False  # ignored: no generation during eval
    is_encoder_decoder: bool | None = field(default=None, metadata=FLAG)  # ignored: decoder-only models
    prompt_sample_size: int = 1024
    min_density_ratio: float = 0.5
    max_density_ratio: float = 10.0
    precompute_ref_log_probs: bool | None = field(
        default=None, metadata=FLAG
    )  # trl default False; bco-ray always precomputes
    model_init_kwargs: dict[str, Any] | str | None = None
    trust_remote_code: bool = False  # for models given as ids/paths (model.trust_remote_code)
    dataset_num_proc: int | None = None  # ignored: data is read by Ray Data
    lr_scheduler_kwargs: dict | str | None = None  # ignored
    use_liger_kernel: bool = False  # the output head's log-probs by Liger Kernel (model.liger_kernel)
    torch_empty_cache_steps: int | None = None  # ignored
    # ---- bco-ray extras: Ray, MLflow and where inputs go
    num_workers: int = 1  # Ray Train workers (one DeepSpeed rank each), like `accelerate launch` processes
    use_gpu: bool | None = field(
        default=None, metadata=FLAG
    )  # None: GPUs when the Ray cluster has at least num_workers of them
    storage_path: str | None = None  # Ray Train checkpoints; None: <output_dir>/ray. Shared or s3:// on clusters
    mlflow_tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else a SQLite file (bco_ray/storage.py)
    mlflow_experiment: str = "bco-ray"
    udm_embedding_model: str | None = None  # UDM with a from_pretrained encoder (mean-pooled) instead of embedding_func
    precompute_num_gpus_per_actor: float | None = None  # None: 0.5 with GPUs (ref + embedding pools share one), else 0
    # in-memory models/data/embedding func go here (a path or s3://); None: $BCO_RAY_STORAGE/inputs, else
    # <output_dir>/inputs
    inputs_dir: str | None = None
    bco_ray_overrides: dict | str | None = field(
        default_factory=dict
    )  # any other bco-ray field: {"train.zero_stage": 3}
    # the fields set to no effect ({name: value}), filled on construction; not an argument
    ignored_fields: dict = field(default_factory=dict, init=False, repr=False)

    _whole_epochs = True  # num_train_epochs is whole epochs of train.num_epochs (OnlineBCOConfig: rounds)

    def __init__(self, output_dir: str | None = None, **kwargs: Any):
        fields = {f.name: f for f in dataclasses.fields(self) if f.init}
        if "evaluation_strategy" in kwargs and "eval_strategy" not in kwargs:  # transformers < 4.46 name
            kwargs["eval_strategy"] = kwargs.pop("evaluation_strategy")
        unknown = [k for k in kwargs if k not in fields and k not in LEGACY]
        if unknown:
            known = sorted(fields) + sorted(LEGACY)
            hints = []
            for k in unknown:
                guess = difflib.get_close_matches(k, known, n=1)
                hints.append(f"'{k}'" + (f" (did you mean '{guess[0]}'?)" if guess else ""))
            raise TypeError(
                f"{type(self).__name__} got unknown field(s) {', '.join(hints)}: not a field of TRL's BCOConfig / "
                "transformers' TrainingArguments nor a bco-ray extra (see docs/trl_migration.md)"
            )
        for f in fields.values():
            setattr(self, f.name, _default(f))
        self.output_dir = output_dir
        legacy = {}
        for k, v in kwargs.items():
            if k in fields:
                setattr(self, k, v)
            else:
                legacy[k] = v
        self.__post_init__(legacy)

    def __post_init__(self, legacy: dict | None = None) -> None:
        check_launcher()
        self.output_dir = os.fspath(self.output_dir) if self.output_dir is not None else "trainer_output"
        normalise_parsed_values(self, DICT_FIELDS)
        self.ignored_fields = {**self._set_but_ignored(), **(legacy or {})}
        for k, v in self.ignored_fields.items():
            warnings.warn(
                f"{type(self).__name__}.{k}={v!r} has no effect in bco-ray ({why_ignored(k)})",
                BCOConfigWarning,
                stacklevel=3,
            )
        if self.precompute_ref_log_probs is False:
            warnings.warn(
                "BCOConfig.precompute_ref_log_probs=False: bco-ray always precomputes reference "
                "log-probs (in the Ray Data pass); the reference model is never loaded during training",
                BCOConfigWarning,
                stacklevel=3,
            )
        if str(plain_value(self.truncation_mode)) != "keep_end":
            raise ValueError(
                f"BCOConfig.truncation_mode={self.truncation_mode!r} is not supported: bco-ray keeps "
                "the end of a long prompt (truncation_mode='keep_end', the default)"
            )
        self._warn_report_to()

    def _set_but_ignored(self) -> dict[str, Any]:
        """{field: value} of the fields bco-ray does not use that hold a value other than their default."""
        out = {}
        for f in dataclasses.fields(self):
            if f.init and status(f.name) == "ignored":
                value, default = getattr(self, f.name), _default(f)
                # argparse runs a field's type on a string default: "no" of a `str | bool` field comes back False
                if value != default and not (_unset(value) and _unset(default)):
                    out[f.name] = value
        return out

    def _warn_report_to(self) -> None:
        reps = _report_to(self.report_to)
        others = [r for r in reps if r not in ("mlflow", "all", "none")]
        if others:
            warnings.warn(
                f"BCOConfig.report_to={self.report_to!r}: bco-ray logs to MLflow only; {others} ignored",
                BCOConfigWarning,
                stacklevel=4,
            )
        if "none" in reps:
            warnings.warn(
                "BCOConfig.report_to='none': bco-ray always logs the run to MLflow "
                "(mlflow_tracking_uri, default sqlite:///<cwd>/mlflow.db)",
                BCOConfigWarning,
                stacklevel=4,
            )

    # ------------------------------------------------------------------------------------- mapping
    def overrides(self) -> dict:
        """The bco-ray Config fields this BCOConfig sets, as a nested dict (load_config overrides)."""
        o: dict[str, Any] = {}
        for path, value in {**self._training_fields(), **self._runtime_fields()}.items():
            node = o
            *parents, leaf = path.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return o

    def _training_fields(self) -> dict[str, Any]:
        """{bco-ray field: value} of the optimisation, schedule, lengths and BCO/UDM settings."""
        epochs = self.num_train_epochs
        if float(epochs) != int(epochs) and self._whole_epochs:
            if self.max_steps is None or self.max_steps <= 0:
                warnings.warn(
                    f"BCOConfig.num_train_epochs={epochs}: bco-ray trains whole epochs; rounded up to "
                    f"{math.ceil(epochs)} (set max_steps for an exact budget)",
                    BCOConfigWarning,
                    stacklevel=4,
                )
            epochs = math.ceil(epochs)
        warmup = warmup_as_ratio(self)
        sched = str(plain_value(self.lr_scheduler_type))
        if sched not in _SCHEDULERS:
            raise ValueError(
                f"BCOConfig.lr_scheduler_type={sched!r} is not supported by bco-ray; use one of "
                f"{', '.join(_SCHEDULERS)}"
            )
        f = {
            "output_dir": self.output_dir,
            "train.micro_batch_size": self.per_device_train_batch_size,
            "train.gradient_accumulation_steps": self.gradient_accumulation_steps,
            "train.lr": self.learning_rate,
            "train.max_steps": self.max_steps,
            "train.num_epochs": int(epochs),
            "train.warmup_ratio": warmup,
            "train.lr_scheduler": sched,
            "train.weight_decay": self.weight_decay,
            "train.max_grad_norm": self.max_grad_norm,
            "train.logging_steps": steps(self, "logging_steps", self.logging_steps, default=1),
            "train.eval_steps": eval_every(self),
            "train.save_steps": save_every(self),
        }
        if self.save_total_limit is not None:
            f["train.keep_checkpoints"] = max(1, int(self.save_total_limit))
        max_length, max_prompt_length = lengths(self)
        f.update(
            {
                "train.seed": self.seed,
                "data.seed": self.seed if self.data_seed is None else self.data_seed,
                "train.bf16": "auto" if self.bf16 is None else bool(self.bf16),
                "train.gradient_checkpointing": bool(
                    self.gradient_checkpointing
                    if getattr(self, "activation_checkpointing", None) is None
                    else self.activation_checkpointing
                ),
                "train.disable_dropout": bool(self.disable_dropout),
                "train.beta": self.beta,
                "data.max_length": max_length,
                "data.max_prompt_length": max_prompt_length,
                "udm.prompt_sample_size": self.prompt_sample_size,
                "udm.min_density_ratio": self.min_density_ratio,
                "udm.max_density_ratio": self.max_density_ratio,
            }
        )
        return f

    def _runtime_fields(self) -> dict[str, Any]:
        """{bco-ray field: value} of the workers, GPUs, storage, MLflow, UDM embedder, DeepSpeed and model."""
        f: dict[str, Any] = {"train.num_workers": self.num_workers}
        if self.use_cpu:
            f["train.use_gpu"] = False
        elif self.use_gpu is not None:
            f["train.use_gpu"] = bool(self.use_gpu)
        if self.precompute_num_gpus_per_actor is not None:
            f["precompute.num_gpus_per_actor"] = self.precompute_num_gpus_per_actor
        elif self.use_gpu and not self.use_cpu:
            f["precompute.num_gpus_per_actor"] = 0.5
        if self.storage_path is not None:
            f["train.storage_path"] = self.storage_path
        f.update(
            {
                "mlflow.tracking_uri": self.mlflow_tracking_uri,
                "mlflow.experiment": self.mlflow_experiment,
                "mlflow.run_name": self.run_name,
            }
        )
        if self.udm_embedding_model is not None:
            f.update({"udm.enabled": True, "udm.embedding_model": self.udm_embedding_model})
        f.update({f"train.{k}": v for k, v in deepspeed_fields(self).items()})
        if self.trust_remote_code:
            f["model.trust_remote_code"] = True
        if self.use_liger_kernel:
            f["model.liger_kernel"] = True
        f.update({f"model.{k}": v for k, v in model_init_fields(self).items()})
        return f

    def to_config(self, **sections: dict) -> Config:
        """The bco-ray Config (validated). `sections` ({"model": {...}, "data": {...}, "udm": {...}}) are merged
        over the mapping (BCOTrainer passes the model, data and UDM locations there; without them the model and
        data are bco-ray's embedded defaults), then `bco_ray_overrides` over everything."""
        return _to_config(self.overrides(), sections, self.bco_ray_overrides)
