"""One typed config for a bco-ray job: dataclasses, loaded from YAML, overridden by `--key.sub=value`,
validated before any Ray work starts.

The algorithm's defaults follow trl 1.13's BCOConfig (lr 5e-7, beta 0.1, max_length 1024, UDM
prompt_sample_size 1024, density ratio clamped to [0.5, 10]) except warmup_ratio 0.1 (trl 1.13: no warmup) and
max_prompt_length 512 (trl 1.13 has no prompt cap; the BCOConfig API uses max_length − 1, see
docs/trl_migration.md).
Model and data default to the embedded tiny assets, so a job runs with no hub access.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bco_ray.builtin import BUILTIN_EMBEDDER, BUILTIN_EVAL, BUILTIN_MODEL, BUILTIN_TRAIN
from bco_ray.config.fields import ranged
from bco_ray.config.online import OnlineConfig
from bco_ray.errors import ConfigErrorBase


class ConfigError(ConfigErrorBase, ValueError):
    """A bad config value: the message names the field and the fix."""


@dataclass
class ModelConfig:
    policy: str = BUILTIN_MODEL  # hub id or local directory (from_pretrained), or builtin:tiny-qwen2
    reference: str | None = None  # None: the policy's initial weights
    tokenizer: str | None = None  # None: the policy's tokenizer
    revision: str | None = None  # hub revision for policy/reference/tokenizer
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    attn_implementation: str = "auto"  # auto: transformers picks (sdpa if supported, else eager), or a name
    trust_remote_code: bool = False  # allow a hub model's own Python code (transformers)
    liger_kernel: bool = False  # the policy's log-probs in training by Liger Kernel's fused linear cross-entropy
    # (GPU; needs the [liger] extra; not with train.zero_stage=3); the plain chunked path where Triton cannot run


@dataclass
class DataConfig:
    train: str = BUILTIN_TRAIN  # .jsonl/.json/.parquet file, a directory of them, hf:<id>[@rev][/subset][:split]
    eval: str | None = BUILTIN_EVAL  # held-out rows for eval/* metrics, same forms as data.train; none: no eval
    max_length: int = ranged(1024, ">= 2")  # tokens per row (prompt + completion); longer rows are cut
    max_prompt_length: int = ranged(512, ">= 1")  # prompt tokens kept (its end) when a row is too long
    on_bad_rows: Literal["error", "skip"] = "error"  # error: a bad row stops the job; skip: drop and count bad rows
    seed: int = ranged(42, "[0, 4294967295]")  # shuffle seed of the pass
    driver_check_rows: int = ranged(200_000, ">= 0")  # source rows per split the driver checks before Ray; beyond,
    # every row is checked and counted by the pass's read tasks (in parallel, before any model loads)


@dataclass
class UDMConfig:
    enabled: bool = True  # UDM: weight rejected rows by a prompt density-ratio classifier
    embedding_model: str = BUILTIN_EMBEDDER  # UDM prompt embedder: hub id, directory or builtin:minilm
    embedding_func: str | None = None  # path/URI of a cloudpickled {"func", "tokenizer"} (the Python API's
    # embedding_func + embedding_tokenizer); used instead of embedding_model
    prompt_sample_size: int = ranged(1024, ">= 2")  # prompts embedded to fit the UDM classifier
    min_density_ratio: float = ranged(0.5, "> 0")  # UDM weights are clamped to at least this
    max_density_ratio: float = ranged(10.0, "> 0")  # UDM weights are clamped to at most this
    max_embed_length: int = ranged(256, ">= 1")  # prompt tokens the embedder sees
    embed_special_tokens: bool = False  # the reference embeds prompts tokenized without special tokens


@dataclass
class PrecomputeConfig:
    cache_dir: str | None = None  # None: $BCO_RAY_STORAGE/cache, else <output_dir>/cache; local path or URI (s3://...)
    force: bool = False  # recompute the pass even when the cache holds it
    batch_size: int = ranged(256, ">= 1")  # rows handed to one actor call
    token_budget: int = ranged(16384, ">= 1")  # tokens per forward in an actor call (padding counts if not packed)
    packed: bool = True  # score rows packed back to back (no padding, attention within each row); false: padded
    ref_actors: tuple[int, int] = (1, 1)  # scoring actors (tokenize + reference + UDM embeddings): (min, max) pool size
    local_shuffle_max_rows: int = ranged(200_000, ">= 0")  # up to this many train rows: a seeded permutation, not an
    # all-to-all shuffle
    num_gpus_per_actor: float = ranged(0.0, ">= 0")  # >0 puts each scoring actor on a GPU
    logp_chunk_size: int = ranged(1024, ">= 1")  # completion positions per chunk of the output head's log-softmax


@dataclass
class LoraConfig:
    enabled: bool = False  # train a LoRA adapter (PEFT) instead of all weights
    r: int = ranged(16, ">= 1")  # adapter rank
    alpha: int = ranged(32, ">= 1")  # LoRA scaling (alpha / r)
    dropout: float = ranged(0.0, "[0, 1)")  # dropout of the adapter's input
    save_merged: bool = True  # also save the adapter merged into the base model (plain HF model)
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )  # modules given adapters


@dataclass
class TrainConfig:
    num_workers: int = ranged(2, ">= 1")  # Ray Train workers (one DeepSpeed rank each)
    use_gpu: bool = False  # one GPU per training worker
    cpus_per_worker: float = ranged(1.0, ">= 0")  # CPUs each training worker reserves
    micro_batch_size: int = ranged(8, ">= 1")  # rows per worker per forward
    bucket_window: int = ranged(
        16, ">= 1"
    )  # micro-batches pooled, re-cut by length (1: dataset order); padded mode only
    micro_batch_tokens: int = ranged(-1, "-1 or >= 0")  # a step's rows packed without padding into forwards of this
    # many tokens; -1: micro_batch_size × data.max_length; 0: padded micro-batches of micro_batch_size rows
    gradient_accumulation_steps: int = ranged(1, ">= 1")  # micro-batches per optimizer step
    lr: float = ranged(5e-7, ">= 0")  # peak learning rate (AdamW)
    beta: float = ranged(0.1, "> 0")  # BCO's beta: scale of the implicit reward
    warmup_ratio: float = ranged(0.1, "[0, 1)")  # fraction of the steps spent warming the learning rate up
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"  # learning-rate decay after warm-up
    weight_decay: float = ranged(0.0, ">= 0")  # AdamW weight decay
    max_grad_norm: float = ranged(1.0, ">= 0")  # gradient clipping norm; 0: no clipping
    num_epochs: int = ranged(1, ">= 1")  # passes over the train split
    max_steps: int = ranged(-1, "-1 or >= 1")  # >0 caps optimizer steps
    logging_steps: int = ranged(1, ">= 1")  # train metrics every this many steps
    eval_steps: int = ranged(0, ">= 0")  # 0: evaluate at the end only
    save_steps: int = ranged(0, ">= 0")  # 0: no intermediate checkpoints
    keep_checkpoints: int = ranged(2, ">= 1")  # newest checkpoints kept
    max_failures: int = ranged(0, "-1 or >= 0")  # restarts from the last checkpoint before the run fails; -1: no limit
    storage_path: str | None = None  # checkpoints + final model; None: $BCO_RAY_STORAGE/ray, else <output_dir>/ray
    seed: int = ranged(42, "[0, 4294967295]")  # model init, dropout and bucketing seed
    zero_stage: Literal[0, 1, 2, 3] = 2  # DeepSpeed ZeRO stage
    offload_optimizer: bool = False  # DeepSpeed: optimizer state in CPU memory (zero_stage >= 1)
    offload_params: bool = False  # DeepSpeed: parameters in CPU memory (zero_stage 3)
    bf16: Literal["auto"] | bool = "auto"  # auto: bf16 on GPU, float32 on CPU; true/false force it
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    disable_dropout: bool = True  # dropout off in the policy (as TRL's BCOConfig)
    resources_timeout_s: float = ranged(600.0, "> 0")  # fail clearly instead of waiting forever for workers
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else a SQLite file beside output_dir's root
    experiment: str = "bco-ray"  # MLflow experiment of the run
    run_name: str | None = None  # None: generated; the same name resumes a stopped run
    registered_model_name: str | None = None  # also register the logged model under this name (Model Registry)
    log_system_metrics: bool = True  # CPU/GPU/memory/disk/network as system/* metrics (driver + training nodes)


@dataclass
class HubConfig:
    repo_id: str | None = None  # push the final model to this Hugging Face Hub repo (org/name); None: no push
    private: bool = True  # create the repo private if it does not exist
    revision: str | None = None  # branch to push to; None: the repo's default branch


@dataclass
class EvalConfig:
    at_start: bool = True  # also evaluate at step 0, so every eval curve starts at the reference
    generate: bool = False  # generation eval: completions of held-out eval prompts, reference vs policy
    verifier: str | None = None  # "module:function": verify(prompt, completion) -> bool | float | dict of floats
    num_prompts: int = ranged(32, ">= 1")  # the eval split's first distinct prompts
    max_new_tokens: int = ranged(32, ">= 1")  # tokens generated per completion
    batch_size: int = ranged(32, ">= 1")  # prompts per generate call
    sample: bool = False  # also one sampled completion per prompt (eval/gen/sampled/*)
    temperature: float = ranged(1.0, "> 0")  # sampling only (eval.sample=true); the greedy completions ignore it
    top_p: float = ranged(1.0, "(0, 1]")  # nucleus sampling: the probability mass kept (eval.sample=true only)


@dataclass
class Config:
    output_dir: str = "outputs"  # relative: under a local $BCO_RAY_STORAGE, ~/bco-ray in a submitted job, else cwd
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    udm: UDMConfig = field(default_factory=UDMConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)  # online BCO (bco-ray online)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        return flatten(self.to_dict())


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------- building from dicts, with checks
def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path) if len(inner) == 1 else _coerce_alternatives(value, inner, path)
    if origin is Literal:
        return _coerce_choice(value, args, path)
    if isinstance(value, str) and value.strip() and tp is not str and origin not in (list, tuple):
        try:  # override text for a non-string field: "4", "1e-6", "no", "{r: 8}"
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass  # left as text: the branch below names the expected type
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{path}': expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, path + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config field '{path}': expected true/false, got {value!r}")
    if tp in (int, float):
        return _coerce_number(value, tp, path)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config field '{path}': expected a string, got {value!r}")
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{path}': expected a list, got {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"config field '{path}': expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, path) for v, a in zip(value, args))
        return [_coerce(v, args[0], path) for v in value]
    return value


def _coerce_number(value: Any, tp: type, path: str) -> int | float:
    """An int or float field's value; a bool, or a fraction for an int field, is refused rather than converted."""
    refused = isinstance(value, bool) or (tp is int and isinstance(value, float) and not value.is_integer())
    if not refused:
        try:
            return tp(value)
        except (TypeError, ValueError):
            pass
    raise ConfigError(f"config field '{path}': expected {'an integer' if tp is int else 'a number'}, got {value!r}")


def _coerce_alternatives(value: Any, alternatives: list, path: str) -> Any:
    """A union such as `Literal["auto"] | bool`: the first alternative that accepts the value; if none does, a
    union of choices (Literal values, bool) gets the choice error, any other union the first alternative's."""
    errors = []
    for alt in alternatives:
        try:
            return _coerce(value, alt, path)
        except ConfigError as e:
            errors.append(e)
    choices = _choices(alternatives)
    raise _choice_error(value, choices, path) if choices is not None else errors[0]


def _choices(alternatives: list) -> list | None:
    """The values a union of Literal types (and bool: true/false) allows; None if it is not such a union."""
    out: list = []
    for alt in alternatives:
        if typing.get_origin(alt) is not Literal and alt is not bool:
            return None
        out.extend(typing.get_args(alt) if alt is not bool else (True, False))
    return out


def _coerce_choice(value: Any, choices: tuple, path: str) -> Any:
    """One of a Literal's values, given as YAML's native value (`true`, `3`) or as text (`"true"`, `"3"`;
    `"Cosine"`: text matches case-insensitively; integral floats match ints)."""
    candidates = [value] + ([value.strip().lower(), _yaml_scalar(value)] if isinstance(value, str) else [])
    candidates += [int(v) for v in candidates if isinstance(v, float) and v.is_integer()]
    for candidate in candidates:
        for choice in choices:
            if type(candidate) is type(choice) and candidate == choice:
                return choice
    raise _choice_error(value, list(choices), path)


def _yaml_scalar(text: str) -> Any:
    """`text` as YAML reads it when that is a scalar ("4" -> 4, "true" -> True), else the text itself."""
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(parsed, (dict, list)) or parsed is None else parsed


def _choice_error(value: Any, choices: list, path: str) -> ConfigError:
    """'train.bf16 must be auto, true or false (got 'ture'). Did you mean 'true'?'"""

    def name(c: Any) -> str:
        return str(c).lower() if isinstance(c, bool) else str(c)

    names = [name(c) for c in choices]
    listed = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
    shown = _yaml_scalar(value) if isinstance(value, str) else value
    guess = difflib.get_close_matches(name(shown).lower(), names, n=1)
    return ConfigError(f"{path} must be {listed} (got {shown!r})" + (f". Did you mean '{guess[0]}'?" if guess else ""))


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            guess = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean '{prefix}{guess[0]}'?" if guess else f" Known fields: {', '.join(names)}."
            raise ConfigError(f"unknown config field '{prefix}{key}'.{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def merge(base: dict, update: dict) -> dict:
    """Nested dict update: sections merge, leaves of `update` win."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(args: list[str]) -> dict:
    """`--train.lr=1e-6 --udm.enabled false` → {"train": {"lr": 1e-6}, "udm": {"enabled": False}}."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"  # a bare flag: --precompute.force
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value  # raw text: _coerce parses it against the field's declared type
        i += 1
    return out


def read_yaml(p: Path) -> dict:
    """A config file's mapping; a missing, unreadable or malformed file is a ConfigError naming it (and the line)."""
    if not p.is_file():
        raise ConfigError(f"config file {p} " + ("is a directory" if p.is_dir() else "does not exist"))
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark, problem, context = (getattr(e, a, None) for a in ("problem_mark", "problem", "context"))
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = f"{problem} ({context})" if problem and context else problem or str(e)
        raise ConfigError(f"config file {p}{where}: not valid YAML: {why}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    data = read_yaml(Path(path)) if path is not None else {}
    if overrides:
        data = merge(data, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need no cluster (bco_ray.config.checks): every choice field holds one of its choices
    (model.dtype, train.bf16, ...), every number is in its declared range, then the checks across fields.
    Raises ConfigError naming the field and the fix."""
    from bco_ray.config.checks import check_config  # it imports this module's dataclasses

    check_config(cfg)
