"""What a finished job leaves in its MLflow run: the final model (an MLflow 3 LoggedModel of the transformers
flavour, or the plain directory) and the plots (training curves, the UDM weight histogram)."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from importlib.metadata import version
from pathlib import Path

import mlflow
import mlflow.transformers
import transformers
from huggingface_hub import ModelCard
from mlflow.tracking import MlflowClient
from mlflow.transformers.flavor_config import build_flavor_config_from_local_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from bco_ray.data.pass_summary import WeightHist
from bco_ray.tracking.mlflow_run import set_tags

log = logging.getLogger(__name__)

MODEL_TASK = "text-generation"
# The transformers flavour saves from a loaded pipeline: above this many bytes of weights the driver does not
# load the model and the checkpoint is logged as a plain directory instead (override with the variable).
MODEL_FLAVOUR_MAX_BYTES = int(os.environ.get("BCO_RAY_MLFLOW_MODEL_MAX_BYTES", 4 << 30))


def _weights_bytes(model_dir: Path) -> int:
    return sum(
        p.stat().st_size
        for p in model_dir.iterdir()
        if p.suffix in (".safetensors", ".bin", ".pt", ".pth") and p.is_file()
    )


def _log_transformers(model_dir: str, name: str, card: str, step: int, registered_model_name: str | None):
    """`model_dir` (a Hugging Face checkpoint with its tokenizer) as an MLflow 3 LoggedModel of the transformers
    flavour, task text-generation, without any hub access; linked to the run and to the run's metrics at
    `step` (the final step: loss, rewards, eval/*). First from the checkpoint path (no weights loaded; not
    every MLflow/transformers pair supports it), else from the model loaded on CPU. Returns its ModelInfo."""
    reqs = [
        f"transformers=={transformers.__version__}",
        f"torch=={version('torch')}",
        f"safetensors=={version('safetensors')}",
        f"tokenizers=={version('tokenizers')}",
    ]
    kw = dict(
        name=name,
        task=MODEL_TASK,
        pip_requirements=reqs,
        model_card=ModelCard(card),
        step=step,
        registered_model_name=registered_model_name,
    )
    if _checkpoint_path_supported(model_dir):
        return mlflow.transformers.log_model(transformers_model=str(model_dir), **kw)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    tok = AutoTokenizer.from_pretrained(model_dir)
    return mlflow.transformers.log_model(transformers_model={"model": model, "tokenizer": tok}, **kw)


def _checkpoint_path_supported(model_dir: str) -> bool:
    """Whether this MLflow can log the checkpoint directory without loading it. Probed with the flavour's own
    config builder (cheap, reads config files only) rather than by trying: a failed `log_model` would leave a
    FAILED LoggedModel in the run. (MLflow 3.17 with transformers 5 cannot: it expects pipeline classes where
    transformers 5 registers names.)"""
    try:
        build_flavor_config_from_local_checkpoint(str(model_dir), MODEL_TASK)
        return True
    except Exception as e:  # noqa: BLE001 - any failure: log from the loaded model
        log.info(
            "transformers flavour from the checkpoint path not available (%s: %s); logging the loaded model",
            type(e).__name__,
            e,
        )
        return False


def _model_card(model_dir: Path, description: str) -> str:
    card = model_dir / "README.md"  # written by bco_ray.tracking.model_card
    return card.read_text() if card.is_file() else f"---\nlibrary_name: transformers\n---\n{description}\n"


def log_model(
    model_dir: str, name: str = "model", description: str = "", step: int = 0, registered_model_name: str | None = None
) -> str:
    """The final model into the active run, named `name`: an MLflow 3 LoggedModel of the transformers flavour
    (`mlflow.transformers.load_model("runs:/<run id>/model")` or `models:/<model id>` gives a text-generation
    pipeline; its metrics are the run's at `step`; registered as `registered_model_name` when given), or the
    plain directory as run artifacts under `name/` where that flavour cannot be used: a LoRA adapter (logged
    as saved, with `merged/` if there), weights above MODEL_FLAVOUR_MAX_BYTES (not loaded on the driver), or
    an error from MLflow. Returns the format used ("mlflow-transformers", "hf-directory", "peft-adapter"),
    also set as tag `model.format`; the LoggedModel's id is tag `model.id`."""
    src = Path(model_dir)
    fmt = "peft-adapter" if (src / "adapter_config.json").exists() else "hf-directory"
    tags: dict = {}
    if fmt == "hf-directory" and _weights_bytes(src) <= MODEL_FLAVOUR_MAX_BYTES:
        try:
            info = _log_transformers(
                str(src), name, _model_card(src, description or "BCO-trained policy."), step, registered_model_name
            )
            fmt = "mlflow-transformers"
            tags = {
                "model.id": info.model_id,
                "model.uri": info.model_uri,
                "model.registered_version": getattr(info, "registered_model_version", None),
            }
        except Exception as e:  # noqa: BLE001 - the plain directory is the fallback
            log.warning(
                "could not log the model in MLflow's transformers flavour (%s: %s); logging the "
                "Hugging Face directory instead",
                type(e).__name__,
                e,
            )
    if fmt != "mlflow-transformers":
        mlflow.log_artifacts(str(src), name)
    set_tags({"model.format": fmt, **tags})
    return fmt


def log_plots(
    client: MlflowClient,
    run_id: str,
    weight_hist: WeightHist | None = None,
    title: str | None = None,
    mean_weight: float | None = None,
) -> list[str]:
    """Matplotlib PNGs of the run's metric histories, an overview page and the UDM weight histogram (when
    given) into the run's `plots/`; returns their artifact paths."""
    from bco_ray.tracking import plots  # matplotlib: only where plots are drawn

    with tempfile.TemporaryDirectory() as d:
        paths = plots.plot_run(client, run_id, d, title=title)
        if weight_hist is not None and weight_hist.edges:
            paths.append(
                plots.plot_weight_hist(
                    dataclasses.asdict(weight_hist), os.path.join(d, "udm_weights.png"), title=title, mean=mean_weight
                )
            )
        for p in paths:
            mlflow.log_artifact(p, "plots")
    return [f"plots/{os.path.basename(p)}" for p in paths]
