"""docs/trl_migration.md's BCOConfig tables, generated from the `BCOConfig` dataclass (bco-ray's defaults),
`bco_ray/api/_trl_defaults.py` (trl 1.13.0's defaults, recorded from its source) and `FIELD_MAP`.

    python -m bco_ray.api._doc_table --write docs/trl_migration.md    # rewrite the generated tables
    python -m bco_ray.api._doc_table --check docs/trl_migration.md    # exit 1 if they are stale

The tables sit between `<!-- BEGIN generated: NAME -->` and `<!-- END generated: NAME -->` lines; only the
notes below are prose (tests/test_trl_defaults.py checks that the doc equals what this renders).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

from bco_ray.api._mapping import FIELD_MAP
from bco_ray.api._trl_defaults import INTENTIONAL_DIFFERENCES, NOT_IN_TRL_1_13, TRL_1_13_DEFAULTS
from bco_ray.api.config import BCOConfig
from bco_ray.console import console

# How the field reaches bco-ray, where FIELD_MAP's single target does not say it all.
TARGETS: dict[str, str] = {
    "per_device_eval_batch_size": "—",
    "use_cpu": "`train.use_gpu=false`",
    "eval_strategy": "`train.eval_steps`",
    "save_strategy": "`train.save_steps`",
    "deepspeed": "`train.zero_stage`, `train.offload_optimizer`, `train.offload_params`",
    "model_init_kwargs": "`model.dtype`, `model.revision`, `model.trust_remote_code`, `model.attn_implementation`",
    "report_to": "—",
    "truncation_mode": "—",
    "precompute_ref_log_probs": "—",
    "inputs_dir": "—",
    "bco_ray_overrides": "any bco-ray field",
}

NOTES: dict[str, str] = {
    "output_dir": 'None: `"trainer_output"`, as in TrainingArguments. Runs, inputs, precompute cache and Ray '
    "storage go under it",
    "per_device_train_batch_size": "rows per worker per forward",
    "per_device_eval_batch_size": "used by `trainer.evaluate()`; the in-run eval uses the train micro-batch size "
    "(same numbers)",
    "gradient_accumulation_steps": "global batch = workers × micro-batch × accumulation",
    "learning_rate": "trl's BCOConfig sets 5e-7 (TrainingArguments: 5e-5)",
    "num_train_epochs": "whole epochs; a fraction is rounded up (warning) unless `max_steps` is set",
    "warmup_ratio": "transformers < 5's name; kept as an alias of a ratio-valued `warmup_steps`",
    "warmup_steps": "a float < 1 is a ratio; an integer needs `max_steps` (exact: ceil(ratio × max_steps) = "
    "warmup_steps)",
    "lr_scheduler_type": "`linear`, `cosine` or `constant`; others are an error",
    "logging_steps": "trl's default (TrainingArguments: 500); a float < 1 is a ratio of `max_steps`",
    "eval_strategy": '`"steps"`: every `eval_steps` (default `logging_steps`); `"no"`/`"epoch"`: at the end only. '
    "With an eval set, the end-of-training eval always runs",
    "eval_steps": 'used with `eval_strategy="steps"`',
    "save_strategy": '`"steps"`: resumable Ray Train checkpoints (DeepSpeed state, δ, data position) every '
    '`save_steps`; `"no"`/`"epoch"`/`"best"`: none. With checkpoints on, per-step metrics reach '
    "MLflow at each checkpoint (so a resumed run logs no step twice)",
    "save_total_limit": "None keeps bco-ray's default, 2",
    "seed": "also the shuffle seed unless `data_seed` is set",
    "data_seed": "`data.seed` (the shuffle) is `data_seed`, else `seed`",
    "bf16": "None: bf16 on GPU, float32 on CPU (trl's `__post_init__` makes None `not fp16`, i.e. bf16 even on "
    "CPU); True/False force it",
    "gradient_checkpointing": "trl's default (TrainingArguments: False)",
    "use_cpu": "True: train on CPU workers",
    "deepspeed": "a JSON path or dict; only `zero_optimization.stage` and the offload devices are taken (bco-ray "
    "builds the rest; a warning lists what is ignored). Default ZeRO-2",
    "report_to": "bco-ray always logs to MLflow; other integrations warn",
    "run_name": "also the Ray Train run name; the same name continues a run (see above)",
    "max_length": "None: 512, with a warning (as trl 1.13's BCOTrainer)",
    "max_prompt_length": "None: `max_length − 1`, so the prompt is cut only when not one completion token would "
    "fit (trl 1.13's rule); see *Truncation* below",
    "truncation_mode": "only `keep_end` (error otherwise)",
    "precompute_ref_log_probs": "always precomputed here; `False` warns",
    "model_init_kwargs": "for models given as ids/paths; other keys warn",
    "trust_remote_code": "for models given as ids/paths (also read from `model_init_kwargs`)",
    "use_liger_kernel": "Liger's fused linear cross-entropy for the policy's log-probs in training, on GPU (needs "
    "the `[liger]` extra; not under ZeRO-3). trl patches the whole model with Liger's kernels",
    "num_workers": "one DeepSpeed rank each, like `accelerate launch` processes",
    "use_gpu": "None: GPUs when the Ray cluster has at least `num_workers` of them (then the scoring actors take "
    "0.5 GPU each)",
    "storage_path": "checkpoints; None: `$BCO_RAY_STORAGE/ray`, else `<output_dir>/ray`. Shared or `s3://` on clusters",
    "mlflow_tracking_uri": "None: `$MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/mlflow.db` (in a submitted job: "
    "`~/bco-ray/mlflow.db`, or under a local `$BCO_RAY_STORAGE`)",
    "udm_embedding_model": "an encoder id or path: turns UDM on (mean-pooled, L2-normalised states)",
    "precompute_num_gpus_per_actor": "None: 0.5 with GPUs (reference and embedding pools share one), else 0",
    "inputs_dir": "where in-memory inputs are saved (a path or an `s3://` URI); None: `$BCO_RAY_STORAGE/inputs` if "
    "set, else `<output_dir>/inputs`",
    "bco_ray_overrides": 'e.g. `{"train.zero_stage": 3, "precompute.ref_actors": [1, 4]}`',
}


def fmt(value: Any) -> str:
    """A default as the table shows it: `"text"` for strings, 5e-7 rather than 5e-07."""
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, float):
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", repr(value)).replace("e+", "e")
    return repr(value)


def bco_defaults() -> dict[str, Any]:
    """bco-ray BCOConfig's declared defaults, in field order (`ignored_fields` left out)."""
    out = {}
    for f in dataclasses.fields(BCOConfig):
        if f.name != "ignored_fields":
            out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return out


def extras() -> list[str]:
    """bco-ray's own fields (Ray, MLflow, inputs): neither trl 1.13's nor an older trl/transformers name."""
    return [n for n in bco_defaults() if n not in TRL_1_13_DEFAULTS and n not in NOT_IN_TRL_1_13]


def _target(name: str) -> str:
    if name in TARGETS:
        return TARGETS[name]
    return f"`{FIELD_MAP[name]}`" if name in FIELD_MAP else "—"


def _trl_default(name: str) -> str:
    if name in TRL_1_13_DEFAULTS:
        return fmt(TRL_1_13_DEFAULTS[name][0])
    return f"— ({NOT_IN_TRL_1_13[name]})"


def render_fields_table() -> str:
    """| BCOConfig field | default | trl 1.13 default | bco-ray field | notes |, one row per TRL-named field."""
    rows = ["| BCOConfig field | default | trl 1.13 default | bco-ray field | notes |", "|---|---|---|---|---|"]
    for name, default in bco_defaults().items():
        if name in extras():
            continue
        rows.append(f"| `{name}` | {fmt(default)} | {_trl_default(name)} | {_target(name)} | {NOTES.get(name, '')} |")
    differ = [f"`{n}` ({why})" for n, why in INTENTIONAL_DIFFERENCES.items()]
    rows += ["", "Defaults that differ from trl 1.13's, on purpose: " + "; ".join(differ) + "."]
    return "\n".join(rows)


def render_extras_table() -> str:
    """| field | default | bco-ray field | notes |, one row per bco-ray extra."""
    rows = ["| field | default | bco-ray field | notes |", "|---|---|---|---|"]
    defaults = bco_defaults()
    for name in extras():
        rows.append(f"| `{name}` | {fmt(defaults[name])} | {_target(name)} | {NOTES.get(name, '')} |")
    return "\n".join(rows)


TABLES = {"bcoconfig-fields": render_fields_table, "bcoconfig-extras": render_extras_table}


def sync(doc: str) -> str:
    """`doc` with every generated block replaced by what the renderers give now."""
    for name, render in TABLES.items():
        begin, end = f"<!-- BEGIN generated: {name} -->", f"<!-- END generated: {name} -->"
        if begin not in doc or end not in doc:
            raise ValueError(f"the doc has no '{begin}' ... '{end}' block")
        head, rest = doc.split(begin, 1)
        _, tail = rest.split(end, 1)
        doc = f"{head}{begin}\n{render()}\n{end}{tail}"
    return doc


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("--write", "--check"):
        console(__doc__, sys.stderr)
        return 2
    path = Path(argv[1])
    doc = path.read_text()
    new = sync(doc)
    if argv[0] == "--write":
        path.write_text(new)
        return 0
    if new != doc:
        console(f"{path}: generated tables are stale; run python -m bco_ray.api._doc_table --write {path}", sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
