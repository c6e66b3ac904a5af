"""Drop-in Python API for users of TRL's (deleted) `BCOTrainer`: the familiar snippet runs on Ray.

    from bco_ray import BCOConfig, BCOTrainer          # was: from trl.experimental.bco import ...

    training_args = BCOConfig(output_dir=output_dir, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    trainer = BCOTrainer(model=model, ref_model=ref_model, args=training_args,
                         processing_class=tokenizer, train_dataset=dataset["train"])
    result = trainer.train()     # Ray Data precompute → Ray Train + DeepSpeed → MLflow (bco_ray.run.run_job)

`BCOConfig` takes the reference's field names (and TRL's defaults) and maps them onto bco-ray's typed
`Config` (`BCOConfig.to_config`); fields of TRL/transformers with no meaning here are accepted with a
warning, unknown names raise TypeError. `BCOTrainer` saves in-memory models, tokenizers, datasets and the
UDM embedding function once, content-addressed, under `<output_dir>/inputs` (the workers and actors load them
from there), builds the Config and runs the job. See docs/trl_migration.md.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bco_ray.config import Config, ConfigError, load_config

__all__ = ["BCOConfig", "BCOTrainer", "BCOTrainOutput", "BCOConfigWarning"]


class BCOConfigWarning(UserWarning):
    """A TRL/transformers setting that has no effect in bco-ray (or is approximated)."""


# BCOConfig field -> the bco-ray Config field it sets (the documented mapping; also used to name the
# BCOConfig field in bco-ray's validation errors).
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
    "max_completion_length", "generate_during_eval", "is_encoder_decoder", "ref_model_init_kwargs",
    "dataset_num_proc", "label_pad_token_id", "padding_value", "lr_scheduler_kwargs",
    "evaluation_strategy", "overwrite_output_dir", "logging_dir", "no_cuda", "use_mps_device", "use_ipex",
    "jit_mode_eval", "torchdynamo", "ray_scope", "include_tokens_per_second", "dispatch_batches",
    "split_batches", "push_to_hub_token", "push_to_hub_model_id", "push_to_hub_organization", "fp16_backend",
    "half_precision_backend", "tpu_num_cores", "tpu_metrics_debug", "past_index", "mp_parameters",
    "use_legacy_prediction_loop", "fp16_opt_level", "evaluate_during_training", "save_safetensors",
    "eval_do_concat_batches", "optim_target_modules", "hub_private_repo",
}

_SCHEDULERS = ("linear", "cosine", "constant")


def _value(v: Any) -> Any:
    """Enum members of transformers (IntervalStrategy, SchedulerType, ...) as their plain values."""
    return getattr(v, "value", v)


@dataclass(init=False)
class BCOConfig:
    """TRL's `BCOConfig` field names and defaults (trl 1.13 `BCOConfig` = transformers `TrainingArguments` +
    BCO fields), mapped onto bco-ray's `Config` by `to_config()`. Extra fields for Ray and MLflow at the end.

    Only keyword arguments (plus `output_dir` as the one positional, as in TrainingArguments). Any other
    TRL/transformers field is accepted and recorded in `ignored_fields` with a `BCOConfigWarning`; a name
    that is neither raises TypeError."""

    output_dir: str = "trainer_output"
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8          # used by BCOTrainer.evaluate(); the in-run eval uses the train size
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5                  # TrainingArguments' default, which trl's BCOConfig kept
    num_train_epochs: float = 3.0
    max_steps: int = -1
    warmup_ratio: float = 0.0
    warmup_steps: int | float = 0                # transformers 5: a float < 1 is a ratio
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int | float = 10              # trl's default (transformers: 500)
    eval_strategy: str = "no"
    eval_steps: int | float | None = None
    save_strategy: str = "steps"
    save_steps: int | float = 500
    save_total_limit: int | None = None
    seed: int = 42
    data_seed: int | None = None
    bf16: bool | None = None                     # None: bf16 on GPU, float32 on CPU (trl: None -> True)
    gradient_checkpointing: bool = True          # trl's default
    disable_dropout: bool = True
    use_cpu: bool = False
    deepspeed: str | dict | None = None          # a DeepSpeed JSON path or dict: ZeRO stage and offload are taken
    report_to: str | list | None = None
    run_name: str | None = None
    # BCO fields
    beta: float = 0.1
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    truncation_mode: str = "keep_end"
    prompt_sample_size: int = 1024
    min_density_ratio: float = 0.5
    max_density_ratio: float = 10.0
    precompute_ref_log_probs: bool | None = None  # trl default False; bco-ray always precomputes
    model_init_kwargs: dict | None = None
    # ---- bco-ray extras: Ray, MLflow and where inputs go
    num_workers: int = 1                         # Ray Train workers (one DeepSpeed rank each), like `accelerate launch` processes
    use_gpu: bool | None = None                  # None: GPUs when the Ray cluster has at least num_workers of them
    storage_path: str | None = None              # Ray Train checkpoints; None: <output_dir>/ray. Shared or s3:// on clusters
    mlflow_tracking_uri: str | None = None       # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    mlflow_experiment: str = "bco-ray"
    udm_embedding_model: str | None = None       # UDM with a from_pretrained encoder (mean-pooled) instead of embedding_func
    precompute_num_gpus_per_actor: float | None = None  # None: 0.5 with GPUs (ref + embedding pools share one), else 0
    inputs_dir: str | None = None                # in-memory models/data/embedding func go here; None: <output_dir>/inputs
    bco_ray_overrides: dict = field(default_factory=dict)   # any other bco-ray field: {"train.zero_stage": 3, ...}
    ignored_fields: dict = field(default_factory=dict, repr=False)

    def __init__(self, output_dir: str | None = None, **kwargs: Any):
        names = [f.name for f in dataclasses.fields(self) if f.name != "ignored_fields"]
        ignored = dict(kwargs.pop("ignored_fields", None) or {})     # dataclasses.replace / copy round trip
        if "evaluation_strategy" in kwargs and "eval_strategy" not in kwargs:   # transformers < 4.46 name
            kwargs["eval_strategy"] = kwargs.pop("evaluation_strategy")
        unknown = [k for k in kwargs if k not in names and k not in _known_foreign()]
        if unknown:
            hints = []
            for k in unknown:
                guess = difflib.get_close_matches(k, names + sorted(_known_foreign()), n=1)
                hints.append(f"'{k}'" + (f" (did you mean '{guess[0]}'?)" if guess else ""))
            raise TypeError(f"BCOConfig got unknown field(s) {', '.join(hints)}: not a field of TRL's BCOConfig / "
                            "transformers' TrainingArguments nor a bco-ray extra (see docs/trl_migration.md)")
        for f in dataclasses.fields(self):
            if f.default is not dataclasses.MISSING:
                setattr(self, f.name, f.default)
            else:
                setattr(self, f.name, f.default_factory())
        if output_dir is not None:
            self.output_dir = output_dir
        self.ignored_fields = {}
        for k, v in ignored.items():
            kwargs.setdefault(k, v)
        for k, v in kwargs.items():
            if k in names:
                setattr(self, k, v)
            else:
                self.ignored_fields[k] = v
        self.__post_init__()

    def __post_init__(self) -> None:
        self.output_dir = os.fspath(self.output_dir) if self.output_dir is not None else "trainer_output"
        for k, v in self.ignored_fields.items():
            warnings.warn(f"BCOConfig.{k}={v!r} has no effect in bco-ray ({_why_ignored(k)})",
                          BCOConfigWarning, stacklevel=3)
        if self.precompute_ref_log_probs is False:
            warnings.warn("BCOConfig.precompute_ref_log_probs=False: bco-ray always precomputes reference "
                          "log-probs (in the Ray Data pass); the reference model is never loaded during training",
                          BCOConfigWarning, stacklevel=3)
        if str(_value(self.truncation_mode)) != "keep_end":
            raise ValueError(f"BCOConfig.truncation_mode={self.truncation_mode!r} is not supported: bco-ray keeps "
                             "the end of a long prompt (truncation_mode='keep_end', the default)")
        if self.per_device_eval_batch_size != self.per_device_train_batch_size:
            pass  # only BCOTrainer.evaluate() uses it; the end-of-training eval runs at the train micro-batch size
        reps = _report_to(self.report_to)
        others = [r for r in reps if r not in ("mlflow", "all", "none")]
        if others:
            warnings.warn(f"BCOConfig.report_to={self.report_to!r}: bco-ray logs to MLflow only; {others} ignored",
                          BCOConfigWarning, stacklevel=3)
        if "none" in reps:
            warnings.warn("BCOConfig.report_to='none': bco-ray always logs the run to MLflow "
                          "(mlflow_tracking_uri, default sqlite:///<cwd>/mlflow.db)", BCOConfigWarning, stacklevel=3)

    # ------------------------------------------------------------------------------------- mapping
    def overrides(self) -> dict:
        """The bco-ray Config fields this BCOConfig sets, as a nested dict (load_config overrides)."""
        o: dict[str, Any] = {}

        def put(path: str, value: Any) -> None:
            node = o
            *parents, leaf = path.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value

        def warn(msg: str) -> None:
            warnings.warn(msg, BCOConfigWarning, stacklevel=4)

        put("output_dir", self.output_dir)
        put("train.micro_batch_size", self.per_device_train_batch_size)
        put("train.gradient_accumulation_steps", self.gradient_accumulation_steps)
        put("train.lr", self.learning_rate)
        put("train.max_steps", self.max_steps)
        epochs = self.num_train_epochs
        if float(epochs) != int(epochs):
            if self.max_steps is None or self.max_steps <= 0:
                warn(f"BCOConfig.num_train_epochs={epochs}: bco-ray trains whole epochs; rounded up to "
                     f"{math.ceil(epochs)} (set max_steps for an exact budget)")
            epochs = math.ceil(epochs)
        put("train.num_epochs", int(epochs))
        put("train.warmup_ratio", self._warmup_ratio())
        sched = str(_value(self.lr_scheduler_type))
        if sched not in _SCHEDULERS:
            raise ValueError(f"BCOConfig.lr_scheduler_type={sched!r} is not supported by bco-ray; use one of "
                             f"{', '.join(_SCHEDULERS)}")
        put("train.lr_scheduler", sched)
        put("train.weight_decay", self.weight_decay)
        put("train.max_grad_norm", self.max_grad_norm)
        put("train.logging_steps", self._steps("logging_steps", self.logging_steps, default=1))
        put("train.eval_steps", self._eval_steps())
        put("train.save_steps", self._save_steps())
        if self.save_total_limit is not None:
            put("train.keep_checkpoints", max(1, int(self.save_total_limit)))
        put("train.seed", self.seed)
        put("data.seed", self.seed if self.data_seed is None else self.data_seed)
        put("train.bf16", "auto" if self.bf16 is None else ("true" if self.bf16 else "false"))
        put("train.gradient_checkpointing", bool(self.gradient_checkpointing))
        put("train.disable_dropout", bool(self.disable_dropout))
        put("train.beta", self.beta)
        max_length = self.max_length if self.max_length is not None else (1 << 31) - 1
        put("data.max_length", max_length)
        put("data.max_prompt_length", self.max_prompt_length if self.max_prompt_length is not None
            else max_length - 1)
        put("udm.prompt_sample_size", self.prompt_sample_size)
        put("udm.min_density_ratio", self.min_density_ratio)
        put("udm.max_density_ratio", self.max_density_ratio)
        put("train.num_workers", self.num_workers)
        if self.use_cpu:
            put("train.use_gpu", False)
        elif self.use_gpu is not None:
            put("train.use_gpu", bool(self.use_gpu))
        if self.precompute_num_gpus_per_actor is not None:
            put("precompute.num_gpus_per_actor", self.precompute_num_gpus_per_actor)
        elif self.use_gpu and not self.use_cpu:
            put("precompute.num_gpus_per_actor", 0.5)
        if self.storage_path is not None:
            put("train.storage_path", self.storage_path)
        put("mlflow.tracking_uri", self.mlflow_tracking_uri)
        put("mlflow.experiment", self.mlflow_experiment)
        put("mlflow.run_name", self.run_name)
        if self.udm_embedding_model is not None:
            put("udm.enabled", True)
            put("udm.embedding_model", self.udm_embedding_model)
        for k, v in self._deepspeed().items():
            put(f"train.{k}", v)
        for k, v in self._model_init_kwargs().items():
            put(f"model.{k}", v)
        return o

    def to_config(self, **sections: dict) -> Config:
        """The bco-ray Config (validated). `sections` ({"model": {...}, "data": {...}, "udm": {...}}) are merged
        over the mapping (BCOTrainer passes the model, data and UDM locations there; without them the model and
        data are bco-ray's embedded defaults), then `bco_ray_overrides` over everything."""
        return _to_config(self.overrides(), sections, self.bco_ray_overrides)

    # ------------------------------------------------------------------------------------- helpers
    def _steps(self, name: str, value: Any, default: int) -> int:
        """HF step counts: an int, or a float < 1 meaning a ratio of the total steps."""
        if value is None:
            return default
        if isinstance(value, float) and 0 < value < 1:
            if self.max_steps and self.max_steps > 0:
                return max(1, math.ceil(value * self.max_steps))
            warnings.warn(f"BCOConfig.{name}={value} is a ratio of the total steps, which bco-ray only knows "
                          f"up front with max_steps > 0; using {default}", BCOConfigWarning, stacklevel=5)
            return default
        if float(value) != int(value):
            raise ValueError(f"BCOConfig.{name} must be an integer or a ratio in (0, 1), got {value!r}")
        return int(value)

    def _warmup_ratio(self) -> float:
        ws = self.warmup_steps
        if not ws:
            return float(self.warmup_ratio)
        if self.warmup_ratio:
            raise ValueError("BCOConfig: set warmup_ratio or warmup_steps, not both")
        if isinstance(ws, float) and 0 < ws < 1:
            return ws
        if self.max_steps and self.max_steps > 0:
            # bco-ray warms up ceil(ratio * total) steps: a hair under steps/total gives exactly `ws` steps
            return min(max(0.0, (int(ws) - 1e-6) / self.max_steps), 0.999999)
        raise ValueError(f"BCOConfig.warmup_steps={ws}: bco-ray sets warmup as a ratio of the total steps; "
                         "use warmup_ratio, or set max_steps so that the ratio is exact")

    def _eval_steps(self) -> int:
        strategy = str(_value(self.eval_strategy))
        if strategy == "steps":
            return self._steps("eval_steps", self.eval_steps if self.eval_steps is not None else self.logging_steps,
                               default=0)
        if strategy == "epoch":
            warnings.warn("BCOConfig.eval_strategy='epoch': bco-ray evaluates every eval_steps steps or at the end; "
                          "evaluating at the end only", BCOConfigWarning, stacklevel=4)
        elif strategy != "no":
            raise ValueError(f"BCOConfig.eval_strategy must be 'no', 'steps' or 'epoch', got {strategy!r}")
        elif self.eval_steps is not None:
            warnings.warn("BCOConfig.eval_steps is ignored with eval_strategy='no' (as in transformers); "
                          "set eval_strategy='steps'", BCOConfigWarning, stacklevel=4)
        return 0

    def _save_steps(self) -> int:
        strategy = str(_value(self.save_strategy))
        if strategy == "steps":
            return self._steps("save_steps", self.save_steps, default=0)
        if strategy in ("epoch", "best"):
            warnings.warn(f"BCOConfig.save_strategy={strategy!r}: bco-ray checkpoints every save_steps steps; "
                          "no intermediate checkpoints (the final model is always saved)", BCOConfigWarning,
                          stacklevel=4)
        elif strategy != "no":
            raise ValueError(f"BCOConfig.save_strategy must be 'no', 'steps', 'epoch' or 'best', got {strategy!r}")
        return 0

    def _deepspeed(self) -> dict:
        ds = self.deepspeed
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
                    warnings.warn(f"BCOConfig.deepspeed: {src}.device={dev!r} -> bco-ray offloads to CPU",
                                  BCOConfigWarning, stacklevel=4)
        derived = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                   "gradient_clipping", "optimizer", "scheduler", "bf16", "fp16", "zero_optimization",
                   "steps_per_print", "wall_clock_breakdown", "zero_allow_untested_optimizer"}
        extra = sorted(k for k in ds if k not in derived)
        zero_extra = sorted(k for k in zero if k not in ("stage", "offload_optimizer", "offload_param")
                            and zero[k] != "auto")
        if extra or zero_extra:
            warnings.warn("BCOConfig.deepspeed: bco-ray builds the DeepSpeed config from the BCOConfig fields and "
                          "takes only zero_optimization.stage / offload_optimizer / offload_param from yours; "
                          f"ignored: {extra + ['zero_optimization.' + k for k in zero_extra]}", BCOConfigWarning,
                          stacklevel=4)
        return out

    def _model_init_kwargs(self) -> dict:
        kw = dict(self.model_init_kwargs or {})
        out: dict = {}
        dtype = kw.pop("dtype", None) or kw.pop("torch_dtype", None)
        kw.pop("torch_dtype", None)
        if dtype is not None:
            name = str(dtype).replace("torch.", "")
            out["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "float": "float32",
                            "half": "float16"}.get(name, name)
        for k in ("revision", "trust_remote_code", "attn_implementation"):
            if k in kw:
                out[k] = kw.pop(k)
        if kw:
            warnings.warn(f"BCOConfig.model_init_kwargs: {sorted(kw)} ignored (bco-ray takes dtype, revision, "
                          "trust_remote_code and attn_implementation)", BCOConfigWarning, stacklevel=4)
        return out


def _known_foreign() -> set[str]:
    """Field names of transformers' TrainingArguments (installed version) and of trl's BCOConfig."""
    global _FOREIGN
    if _FOREIGN is None:
        try:
            from transformers import TrainingArguments
            names = {f.name for f in dataclasses.fields(TrainingArguments)}
        except Exception:   # noqa: BLE001 - a broken transformers import must not break the config
            names = set()
        _FOREIGN = names | _TRL_ONLY
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


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _to_config(o: dict, sections: dict, extra: dict | None = None) -> Config:
    o = _merge(o, sections)
    for k, v in _flatten(extra or {}).items():
        o = _merge(o, _nest(k, v))
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


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in (update or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _with_trl_names(msg: str) -> str:
    import re
    names = sorted({k for k, v in FIELD_MAP.items() if v != "output_dir" and re.search(rf"{re.escape(v)}\b(?!\.)", msg)})
    return f"{msg} (BCOConfig field: {', '.join(names)})" if names else msg


# ============================================================================================ trainer
@dataclass
class BCOTrainOutput:
    """What `BCOTrainer.train()` returns: transformers' TrainOutput fields plus where the results are."""
    global_step: int
    training_loss: float             # mean of the logged `loss` values of the run
    metrics: dict                    # train_runtime, train_loss, and the last value of every MLflow metric
    model_dir: str                   # the trained model, Hugging Face format (AutoModelForCausalLM.from_pretrained)
    output_dir: str                  # <output_dir>/runs/<run_name>: result.json, model/
    run_id: str                      # MLflow run
    tracking_uri: str
    run_name: str
    raw: dict = field(repr=False, default_factory=dict)   # run_job's dict


class BCOTrainer:
    """TRL's `BCOTrainer` signature; `train()` runs the whole bco-ray job (bco_ray.run.run_job) on Ray.

    `model` / `ref_model` / `processing_class` / `embedding_tokenizer`: objects (saved with save_pretrained) or
    hub ids / local directories (passed through). `ref_model=None`: the model's initial weights.
    `train_dataset` / `eval_dataset`: a `datasets.Dataset` (or a list of row dicts / a pandas DataFrame), saved
    to Parquet; or a bco-ray data spec (a file, directory, fsspec URI or `hf:<id>[:split]`).
    `embedding_func(input_ids=..., attention_mask=...) -> Tensor[B, D]` + `embedding_tokenizer`: UDM, as in TRL.
    `peft_config`: a `peft.LoraConfig`, mapped to bco-ray's LoRA settings.
    """

    def __init__(self, model=None, ref_model=None, args: BCOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, data_collator=None, model_init=None, callbacks=None,
                 optimizers=(None, None), preprocess_logits_for_metrics=None, peft_config=None,
                 compute_metrics=None, model_adapter_name=None, ref_adapter_name=None,
                 embedding_func: Callable | None = None, embedding_tokenizer=None):
        if model_init is not None:
            raise NotImplementedError("BCOTrainer(model_init=...) is not supported: pass model (an object, a hub "
                                      "id or a local directory)")
        if model is None:
            raise ValueError("BCOTrainer needs a model (an object, a hub id or a local directory)")
        if train_dataset is None:
            raise ValueError("BCOTrainer needs a train_dataset")
        if args is None:
            args = BCOConfig()
        if not isinstance(args, BCOConfig):
            raise TypeError(f"args must be a bco_ray.BCOConfig, got {type(args).__name__}")
        for name, value in (("data_collator", data_collator), ("callbacks", callbacks),
                            ("preprocess_logits_for_metrics", preprocess_logits_for_metrics),
                            ("compute_metrics", compute_metrics), ("model_adapter_name", model_adapter_name),
                            ("ref_adapter_name", ref_adapter_name)):
            if value is not None:
                warnings.warn(f"BCOTrainer({name}=...) has no effect in bco-ray: the Ray workers run their own "
                              "collation, loop and metrics", BCOConfigWarning, stacklevel=2)
        if optimizers is not None and any(o is not None for o in optimizers):
            warnings.warn("BCOTrainer(optimizers=...) has no effect in bco-ray: each worker builds DeepSpeed's AdamW "
                          "and the lr_scheduler_type schedule", BCOConfigWarning, stacklevel=2)
        if (embedding_func is None) != (embedding_tokenizer is None):
            raise ValueError("UDM needs both embedding_func and embedding_tokenizer (as in TRL)")
        if _is_peft_model(model):
            raise ValueError("pass the base model and peft_config=LoraConfig(...) instead of a PeftModel: the "
                             "workers apply LoRA themselves")
        if not isinstance(model, (str, os.PathLike)) and processing_class is None:
            raise ValueError("processing_class (the tokenizer) must be given with an in-memory model")
        if ref_model is model:
            ref_model = None

        self.args = args
        self._model, self.ref_model, self.processing_class = model, ref_model, processing_class
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.embedding_func, self.embedding_tokenizer = embedding_func, embedding_tokenizer
        self.peft_config = peft_config
        self.result: BCOTrainOutput | None = None
        self._trained_model = None
        self.inputs_dir = Path(args.inputs_dir or Path(args.output_dir) / "inputs").resolve()
        if "://" in str(args.inputs_dir or ""):
            raise ValueError("BCOConfig.inputs_dir must be a local (or shared, mounted) path: models are loaded "
                             "from it with from_pretrained")
        self.config = self._build_config()

    # ------------------------------------------------------------------------------- inputs → Config
    def _build_config(self) -> Config:
        a = self.args
        o = a.overrides()
        _to_config(o, {}, a.bco_ray_overrides)        # a bad setting fails here, before anything is saved
        model: dict[str, Any] = {"policy": self._model_spec(self._model), "reference": None, "tokenizer": None}
        if self.ref_model is not None:
            ref = self._model_spec(self.ref_model)
            model["reference"] = None if ref == model["policy"] else ref
        if self.processing_class is not None:
            model["tokenizer"] = self._tokenizer_spec(self.processing_class)
        data = {"train": self._data_spec(self.train_dataset, "train"),
                "eval": self._data_spec(self.eval_dataset, "eval") if self.eval_dataset is not None else None}
        udm: dict[str, Any] = {"enabled": a.udm_embedding_model is not None}
        if self.embedding_func is not None:
            if not embedding_func_supported():
                raise NotImplementedError(
                    "embedding_func needs bco-ray's udm.embedding_func hook (config.py UDMConfig.embedding_func, "
                    "used by bco_ray/precompute/stages.py Embed); this installation lacks it. Use "
                    "BCOConfig(udm_embedding_model=<encoder id or path>) for UDM with a mean-pooled encoder")
            udm.update(enabled=True, embedding_func=self._save_embedding_func())
        train: dict[str, Any] = {}
        if self.peft_config is not None:
            train["lora"] = _lora(self.peft_config)
        return _to_config(o, {"model": model, "data": data, "udm": udm, "train": train}, a.bco_ray_overrides)

    def _model_spec(self, m) -> str:
        if isinstance(m, (str, os.PathLike)):
            return os.fspath(m)
        if not hasattr(m, "save_pretrained"):
            raise TypeError(f"model/ref_model must be a transformers model, a hub id or a local path, got "
                            f"{type(m).__name__}")
        return self._save_dir("model", lambda d: m.save_pretrained(d, safe_serialization=True))

    def _tokenizer_spec(self, tok) -> str:
        if isinstance(tok, (str, os.PathLike)):
            return os.fspath(tok)
        if not hasattr(tok, "save_pretrained"):
            raise TypeError(f"processing_class must be a tokenizer, got {type(tok).__name__}")
        return self._save_dir("tokenizer", tok.save_pretrained)

    def _save_dir(self, kind: str, save: Callable[[str], Any]) -> str:
        """Save into a temporary directory, then move it to <inputs>/<kind>-<content hash>: saved once per
        content (the policy and an identical reference share one copy, a re-run reuses the precompute cache)."""
        from bco_ray.precompute.cache import fingerprint_path
        root = self.inputs_dir / "models"
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=root))
        try:
            save(str(tmp))
            dest = root / f"{kind}-{fingerprint_path(str(tmp))[:16]}"
            _publish(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return str(dest)

    def _data_spec(self, ds, split: str) -> str:
        if isinstance(ds, (str, os.PathLike)):
            return os.fspath(ds)
        ds = _as_dataset(ds, split)
        from bco_ray.precompute.cache import fingerprint_path
        root = self.inputs_dir / "data"
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{split}-", suffix=".parquet", dir=root)
        os.close(fd)
        try:
            ds.to_parquet(tmp)
            dest = root / f"{split}-{fingerprint_path(tmp)[:16]}.parquet"
            _publish(Path(tmp), dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return str(dest)

    def _save_embedding_func(self) -> str:
        import cloudpickle
        from bco_ray.precompute.cache import fingerprint_path
        tok = self.embedding_tokenizer
        if isinstance(tok, (str, os.PathLike)):
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(os.fspath(tok))
        root = self.inputs_dir / "udm"
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".embedding_func-", suffix=".pkl", dir=root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_dumps_by_value({"func": self.embedding_func, "tokenizer": tok}, cloudpickle))
            dest = root / f"embedding_func-{fingerprint_path(tmp)[:16]}.pkl"
            _publish(Path(tmp), dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return str(dest)

    # ------------------------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs) -> BCOTrainOutput:
        """Run the job: Ray Data precompute → Ray Train + DeepSpeed → MLflow. Blocks until it finishes; updates
        the in-memory model (if one was given) with the trained weights."""
        if resume_from_checkpoint:
            warnings.warn("train(resume_from_checkpoint=...) is not needed: an unfinished run resumes from its "
                          "latest checkpoint when it is started again with the same run_name", BCOConfigWarning,
                          stacklevel=2)
        from bco_ray.run import run_job
        cfg = self.config
        if self.args.use_gpu is None and not self.args.use_cpu:
            cfg = self._auto_gpu(cfg)
        t0 = time.time()
        res = run_job(cfg)
        self.result = self._train_output(res, time.time() - t0)
        self._trained_model = None
        if not isinstance(self._model, (str, os.PathLike)):
            self._update_in_memory_model()
        return self.result

    def _auto_gpu(self, cfg: Config) -> Config:
        import ray
        from bco_ray.run import init_ray
        init_ray(cfg)
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus >= cfg.train.num_workers:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, use_gpu=True))
            if self.args.precompute_num_gpus_per_actor is None:
                cfg = dataclasses.replace(cfg, precompute=dataclasses.replace(cfg.precompute, num_gpus_per_actor=0.5))
        return cfg

    def _train_output(self, res: dict, seconds: float) -> BCOTrainOutput:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(res["tracking_uri"])
        run = client.get_run(res["run_id"])
        losses = [m.value for m in client.get_metric_history(res["run_id"], "loss")]
        training_loss = float(sum(losses) / len(losses)) if losses else float("nan")
        metrics = dict(run.data.metrics)
        metrics.update({k: v for k, v in res.get("final", {}).items() if isinstance(v, (int, float))})
        metrics.update(train_runtime=round(seconds, 2), train_loss=training_loss)
        return BCOTrainOutput(global_step=int(res.get("final", {}).get("step", 0)), training_loss=training_loss,
                              metrics=metrics, model_dir=res["model_dir"], output_dir=res.get("out_dir", ""),
                              run_id=res["run_id"], tracking_uri=res["tracking_uri"], run_name=res["run_name"],
                              raw=res)

    def _update_in_memory_model(self) -> None:
        """The trained weights into the model object the user holds (as TRL trains it in place). With LoRA,
        `trainer.model` becomes a PeftModel wrapping it (peft injects the adapters into it in place)."""
        import torch
        model_dir = Path(self.result.model_dir)
        user = self._model
        if (model_dir / "adapter_config.json").exists():
            from peft import PeftModel
            self._trained_model = PeftModel.from_pretrained(user, str(model_dir))
            return
        from transformers import AutoModelForCausalLM
        dtype = next(user.parameters()).dtype
        trained = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        with torch.no_grad():
            missing, unexpected = user.load_state_dict(trained.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(f"the trained model at {model_dir} does not match the model object "
                               f"(missing {missing[:5]}, unexpected {unexpected[:5]}); load it with "
                               "AutoModelForCausalLM.from_pretrained")
        self._trained_model = user

    @property
    def model(self):
        """The trained model after train() (the object you passed, updated; or loaded from the run's model
        directory); before, the model you passed (loaded from its id/path on first access)."""
        if self._trained_model is not None:
            return self._trained_model
        if self.result is not None:
            self._trained_model = _load_model_dir(self.result.model_dir)
            return self._trained_model
        if isinstance(self._model, (str, os.PathLike)):
            self._trained_model = _load_model_dir(self.config.model.policy)
            return self._trained_model
        return self._model

    @property
    def tokenizer(self):
        return self.processing_class

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> str:
        """The trained model (Hugging Face format, with its tokenizer) into `output_dir` (default args.output_dir)."""
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.result is not None:
            src = Path(self.result.model_dir)
            for p in src.iterdir():
                if p.is_dir():
                    shutil.copytree(p, out / p.name, dirs_exist_ok=True)
                else:
                    shutil.copy2(p, out / p.name)
        elif not isinstance(self._model, (str, os.PathLike)):
            self._model.save_pretrained(out, safe_serialization=True)
            if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
                self.processing_class.save_pretrained(out)
        else:
            raise RuntimeError("nothing to save: train() has not run and the model was given as an id/path")
        return str(out)

    # ---------------------------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """BCO eval metrics of the trained model, computed on this (driver) process, no DeepSpeed: loss,
        rewards/*, logps/*, accuracy and AUC of the reward margin r − δ, with the run's final δ.

        With no argument it scores the run's precomputed eval split (the one trained with): the numbers equal the
        run's final `eval/*` metrics. A new `eval_dataset` is tokenized, scored by the reference model and
        weighted by the run's UDM classifier here, then evaluated the same way."""
        from bco_ray.bco.loss import RunningMean
        from bco_ray.train.evaluate import evaluate as bco_evaluate
        if self.result is None:
            raise RuntimeError("evaluate() scores the trained model with the run's δ and UDM classifier: call "
                               "train() first")
        t0 = time.time()
        cfg = self.config
        if eval_dataset is None and self.eval_dataset is None:
            raise ValueError("no eval_dataset: pass one to evaluate() or to BCOTrainer")
        if eval_dataset is None:
            table = _read_parquet_dir(f"{self.result.raw['precompute_dir']}/split=eval")
        else:
            table = self._precompute_eval(eval_dataset)
        model = self.model
        import torch
        device = next(model.parameters()).device
        eval_cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, micro_batch_size=self.args.per_device_eval_batch_size))
        delta = RunningMean(mean=float(self.result.raw["final"]["delta"]), count=1.0)
        from bco_ray.models import load_tokenizer
        pad_id = load_tokenizer(cfg.model.tokenizer or cfg.model.policy, cfg.model.revision).pad_token_id
        with torch.no_grad():
            m = bco_evaluate(model, _TableShard(table), delta, eval_cfg, pad_id, device, rank=0, world=1)
        out = {f"{metric_key_prefix}_{k.split('/', 1)[1]}": float(v) for k, v in m.items()}
        out[f"{metric_key_prefix}_runtime"] = round(time.time() - t0, 3)
        out[f"{metric_key_prefix}_samples"] = table.num_rows
        return out

    def _precompute_eval(self, eval_dataset):
        """The Ray Data pass's stages, called directly on this process for one (small) eval set."""
        import pickle

        import pyarrow as pa

        from bco_ray.precompute import pipeline, stages
        from bco_ray.run import resolve_paths
        cfg, p, d = self.config, self.config.precompute, self.config.data
        paths, _ = resolve_paths(cfg)
        if isinstance(eval_dataset, (str, os.PathLike)):
            rows = _rows_of_spec(os.fspath(eval_dataset))
        else:
            rows = list(_as_dataset(eval_dataset, "eval"))
        table = stages.tokenize(pa.Table.from_pylist(rows), tokenizer_path=paths.tokenizer,
                                revision=cfg.model.revision, max_length=d.max_length,
                                max_prompt_length=d.max_prompt_length, on_bad_rows=d.on_bad_rows,
                                source="eval_dataset", split="eval")
        gpus = 1.0 if _cuda() else 0.0
        table = stages.RefLogps(model_path=paths.reference, revision=cfg.model.revision, dtype=cfg.model.dtype,
                                num_gpus=gpus, token_budget=p.token_budget, chunk_size=p.logp_chunk_size,
                                pad_id=paths.pad_id, attn_implementation=cfg.model.attn_implementation)(table)
        if not cfg.udm.enabled:
            return stages.unit_weights(table)
        clf_path = f"{self.result.raw['precompute_dir']}/classifier.pkl"
        import fsspec
        with fsspec.open(clf_path, "rb") as f:
            clf_bytes = f.read()
        pickle.loads(clf_bytes)   # fail here, clearly, on a broken file
        kwargs = pipeline._embed_kwargs(cfg, paths, clf_bytes)
        kwargs["num_gpus"] = gpus
        return stages.Embed(**kwargs)(table)


# ============================================================================================ helpers
def embedding_func_supported() -> bool:
    """Whether this bco-ray has the `udm.embedding_func` hook (a user callable in the embedding actors)."""
    from bco_ray.config import UDMConfig
    return "embedding_func" in {f.name for f in dataclasses.fields(UDMConfig)}


def _is_peft_model(m) -> bool:
    return any(c.__name__ == "PeftModel" for c in type(m).__mro__)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _publish(tmp: Path, dest: Path) -> None:
    """Move tmp to dest unless dest exists already (same content, by construction of its name)."""
    if dest.exists():
        return
    if tmp.is_dir():
        os.chmod(tmp, 0o755)
    else:
        os.chmod(tmp, 0o644)
    try:
        os.replace(tmp, dest)
    except OSError:
        if not dest.exists():        # lost a race to a concurrent writer of the same content, else fail
            raise


def _as_dataset(ds, split: str):
    import datasets
    if isinstance(ds, datasets.Dataset):
        return ds
    if isinstance(ds, datasets.DatasetDict):
        raise TypeError(f"{split}_dataset is a DatasetDict: pass one split, e.g. dataset['{split}']")
    if isinstance(ds, datasets.IterableDataset):
        return datasets.Dataset.from_list(list(ds))
    if isinstance(ds, list):
        return datasets.Dataset.from_list(ds)
    if isinstance(ds, dict):
        return datasets.Dataset.from_dict(ds)
    if type(ds).__name__ == "DataFrame":
        return datasets.Dataset.from_pandas(ds, preserve_index=False)
    raise TypeError(f"{split}_dataset must be a datasets.Dataset, a list of rows, a DataFrame or a data path, "
                    f"got {type(ds).__name__}")


def _rows_of_spec(spec: str) -> list[dict]:
    from bco_ray.data import formats
    from bco_ray.data.sources import files_of
    if spec.startswith("hf:"):
        from bco_ray.data.sources import _hf
        return list(_hf(spec))
    rows = []
    for f in files_of(spec):
        for _, row in formats._iter_raw(f):
            if isinstance(row, Exception):
                raise row
            rows.append(row)
    return rows


def _read_parquet_dir(uri: str):
    import fsspec
    import pyarrow.parquet as pq
    fs, path = fsspec.core.url_to_fs(uri)
    return pq.read_table(path, filesystem=fs)


class _TableShard:
    """What bco_ray.train.evaluate needs from a Ray dataset shard, over an in-memory pyarrow Table."""

    def __init__(self, table):
        self.table = table

    def iter_batches(self, batch_size: int, batch_format: str = "numpy", **_):
        cols = ["input_ids", "prompt_len", "label", "ref_logps", "udm_weight"]
        for i in range(0, self.table.num_rows, batch_size):
            part = self.table.slice(i, batch_size)
            yield {c: part.column(c).to_pylist() for c in cols}


def _load_model_dir(path: str):
    p = Path(path)
    if (p / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM
        return AutoPeftModelForCausalLM.from_pretrained(path)
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path)


def _lora(pc) -> dict:
    """A peft LoraConfig → bco-ray's train.lora."""
    if type(pc).__name__ != "LoraConfig":
        raise ValueError(f"peft_config must be a peft.LoraConfig (bco-ray trains LoRA adapters), got "
                         f"{type(pc).__name__}")
    targets = pc.target_modules
    out: dict[str, Any] = {"enabled": True, "r": int(pc.r), "alpha": int(pc.lora_alpha),
                           "dropout": float(pc.lora_dropout)}
    if targets is not None:
        if isinstance(targets, str):
            raise ValueError("peft_config.target_modules as a regex string is not supported: list the modules")
        out["target_modules"] = sorted(targets)
    ignored = [k for k, default in (("bias", "none"), ("modules_to_save", None), ("use_rslora", False),
                                    ("use_dora", False), ("layers_to_transform", None), ("init_lora_weights", True))
               if getattr(pc, k, default) != default]
    if ignored:
        warnings.warn(f"peft_config: {ignored} are not passed on (bco-ray's LoRA takes r, lora_alpha, lora_dropout "
                      "and target_modules)", BCOConfigWarning, stacklevel=4)
    return out


def _dumps_by_value(obj, cloudpickle) -> bytes:
    """cloudpickle `obj`, with the user's own modules (scripts, test files, a project not installed on the
    cluster) pickled by value, so the Ray actors need not import them. Installed packages and bco_ray stay
    references."""
    installed = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                               *(sysconfig.get_paths().get(k) for k in ("stdlib", "purelib", "platlib")))
                 if p}
    local = []
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if not f or name == "__main__" or name.split(".")[0] in ("bco_ray", "cloudpickle"):
            continue
        real = os.path.realpath(f)
        if any(part in ("site-packages", "dist-packages") for part in Path(real).parts):
            continue
        if any(real.startswith(p + os.sep) for p in installed):
            continue
        local.append(mod)
    registered = []
    for mod in local:
        try:
            cloudpickle.register_pickle_by_value(mod)
            registered.append(mod)
        except (ValueError, TypeError):
            pass
    try:
        return cloudpickle.dumps(obj)
    finally:
        for mod in registered:
            try:
                cloudpickle.unregister_pickle_by_value(mod)
            except (ValueError, TypeError):
                pass
