"""The model card (`README.md`) of a saved model directory, as the Hugging Face Hub reads it: YAML metadata
(library, base model, datasets, tags) and what a reader needs: the base model, the data, the BCO settings,
the final metrics and how to load the model."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from bco_ray.config.schema import Config
from bco_ray.data.sources import parse_hf

if TYPE_CHECKING:
    from bco_ray.data.checks import DataReport

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_id(spec: str | None) -> str | None:
    """A hub id as the card's metadata may name it (local paths and builtin names are not)."""
    return spec if spec and _HUB_ID.match(spec) and not Path(spec).exists() else None


def _hub_dataset(spec: str | None) -> str | None:
    if not spec or not spec.startswith("hf:"):
        return None
    return parse_hf(spec).repo_id


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _metadata(cfg: Config, adapter: bool) -> str:
    lines = [
        "---",
        "library_name: " + ("peft" if adapter else "transformers"),
        "pipeline_tag: text-generation",
        "tags:",
        "- bco",
        "- bco-ray",
        "- alignment",
    ]
    base = _hub_id(cfg.model.policy)
    if base:
        lines.append(f"base_model: {base}")
    data = [d for d in (_hub_dataset(cfg.data.train), _hub_dataset(cfg.data.eval)) if d]
    if data:
        lines += ["datasets:"] + [f"- {d}" for d in dict.fromkeys(data)]
    return "\n".join(lines + ["---", ""])


def _settings(cfg: Config) -> list[tuple[str, str]]:
    t, u, d = cfg.train, cfg.udm, cfg.data
    rows = [
        ("beta (train.beta)", _fmt(t.beta)),
        ("learning rate (train.lr)", _fmt(t.lr)),
        ("schedule", f"{t.lr_scheduler}, warmup ratio {_fmt(t.warmup_ratio)}"),
        (
            "batch",
            f"{t.num_workers} workers × {t.micro_batch_size} rows × {t.gradient_accumulation_steps} accumulation steps",
        ),
        ("epochs / max steps", f"{t.num_epochs} / {t.max_steps}"),
        ("max length / max prompt length", f"{d.max_length} / {d.max_prompt_length}"),
        ("DeepSpeed ZeRO stage", str(t.zero_stage)),
        (
            "UDM (underlying-distribution matching)",
            (
                f"on: {u.embedding_func and 'user embedding function' or u.embedding_model}, density ratio clamped to "
                f"[{_fmt(u.min_density_ratio)}, {_fmt(u.max_density_ratio)}], {u.prompt_sample_size} prompts per class"
            )
            if u.enabled
            else "off (every row weighs 1)",
        ),
    ]
    if t.lora.enabled:
        rows.append(("LoRA", f"r {t.lora.r}, alpha {t.lora.alpha}, modules {', '.join(t.lora.target_modules)}"))
    return rows


def _load_snippet(repo: str, adapter: bool, run_id: str | None) -> str:
    if adapter:
        code = (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")'
        )
    else:
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")'
        )
    text = f"```python\n{code}\n```\n"
    if run_id and not adapter:
        text += (
            "\nFrom MLflow, as a text-generation pipeline:\n\n```python\nimport mlflow\n\n"
            f'pipe = mlflow.transformers.load_model("runs:/{run_id}/model")\n```\n'
        )
    return text


def render(
    cfg: Config,
    final: dict,
    *,
    adapter: bool = False,
    run_id: str | None = None,
    run_name: str | None = None,
    data_report: DataReport | None = None,
    repo: str | None = None,
) -> str:
    """The card's text. `final`: the worker's final record (step, delta, eval/*); `data_report`: check_data's."""
    base = cfg.model.policy + (f" (revision {cfg.model.revision})" if cfg.model.revision else "")
    out = [
        _metadata(cfg, adapter),
        f"# {run_name or 'BCO policy'}\n",
        "A causal language model aligned with BCO (Binary Classifier Optimization, "
        "[arXiv 2404.04656](https://arxiv.org/abs/2404.04656)) on thumbs-up / thumbs-down feedback, trained "
        "with bco-ray (Ray Data + Ray Train + DeepSpeed, tracked in MLflow).\n",
        "## Base model\n",
        f"- policy: `{base}`",
        f"- reference: {f'`{cfg.model.reference}`' if cfg.model.reference else 'the policy initial weights'}\n",
        "## Data\n",
        "| split | source | rows | labels (desirable / undesirable) |",
        "|---|---|---|---|",
    ]
    for split in ("train", "eval"):
        spec = getattr(cfg.data, split)
        if spec:
            rep = getattr(data_report, split, None)
            counts = (rep.rows, rep.labels.desirable, rep.labels.undesirable) if rep else ("", "", "")
            out.append("| {} | `{}` | {} | {} / {} |".format(split, spec, *counts))
    out += ["", "## BCO settings\n", "| setting | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in _settings(cfg)]
    metrics = {k: v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out += [
        "",
        "## Final metrics\n",
        f"After {final.get('step', '?')} optimizer steps" + (f" (MLflow run `{run_id}`)" if run_id else "") + ":\n",
        "| metric | value |",
        "|---|---|",
    ]
    out += [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items()) if k != "step"]
    out += ["", "## How to load\n", _load_snippet(repo or "path/to/this/directory", adapter, run_id)]
    return "\n".join(out)


def write_model_card(model_dir: str | Path, cfg: Config, final: dict, **kw) -> Path:
    """`model_dir/README.md` (and `model_dir/merged/README.md` for a merged LoRA model); returns the first."""
    d = Path(model_dir)
    adapter = (d / "adapter_config.json").exists()
    repo = cfg.hub.repo_id
    path = d / "README.md"
    path.write_text(render(cfg, final, adapter=adapter, repo=repo, **kw))
    if (d / "merged").is_dir():
        (d / "merged" / "README.md").write_text(render(cfg, final, adapter=False, repo=repo, **kw))
    return path
