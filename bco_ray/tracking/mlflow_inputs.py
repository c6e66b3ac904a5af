"""What a run trained on, in its MLflow run: the datasets as run inputs (`mlflow.log_input`) and the precompute
pass's summary (`precompute/*` and `udm/*` metrics at step 0, `precompute/summary.json`). Both are idempotent:
a resumed run logs neither twice."""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.tracking import MlflowClient

from bco_ray.builtin import resolve_data
from bco_ray.config.schema import Config
from bco_ray.data.checks import DataReport
from bco_ray.data.pass_summary import PrecomputeSummary
from bco_ray.data.sources import parse_hf, resolved_sha
from bco_ray.tracking.history import precompute_metrics


# -------------------------------------------------------------------------------------- precompute
def log_precompute(summary: PrecomputeSummary, run_id: str | None = None, client: MlflowClient | None = None) -> None:
    """Precompute summary metrics (`precompute/*`, `udm/*`) at step 0 and `precompute/summary.json`. Idempotent:
    a resumed run that has them already is left as it is, so step 0 appears once in every history."""
    run_id = run_id or mlflow.active_run().info.run_id
    client = client or MlflowClient()
    have = client.get_run(run_id).data.metrics
    new = {k: v for k, v in precompute_metrics(summary).items() if k not in have}
    if new:
        mlflow.log_metrics(new, step=0)
    if "precompute/summary.json" not in {a.path for a in client.list_artifacts(run_id, "precompute")}:
        mlflow.log_dict(summary.to_dict(), "precompute/summary.json")


# -------------------------------------------------------------------------------------------- inputs
def data_digest(fingerprint: str) -> str:
    """A dataset's MLflow digest: the first 32 hex digits of the sha256 of its fingerprint in the precompute
    cache key (MLflow allows 36 characters; a fingerprint can be longer: one hash per file of a directory)."""
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:32]


def _dataset_source(spec: str):
    if spec.startswith("hf:"):
        h = parse_hf(spec)
        return HuggingFaceDatasetSource(path=h.repo_id, config_name=h.subset, split=h.split, revision=resolved_sha(h))
    path = resolve_data(spec)
    return resolve_dataset_source(path if "://" in path else Path(path).resolve().as_uri())


def log_datasets(cfg: Config, report: DataReport) -> None:
    """The training (and eval) data as run inputs (`mlflow.log_input`): where it comes from (a file URI, an
    fsspec URI or a hub dataset at its resolved commit) and a digest of its cache-key fingerprint, so runs on
    the same data share one MLflow dataset. Idempotent: a resumed run does not log them twice."""
    have = {(d.dataset.name, d.dataset.digest) for d in (mlflow.active_run().inputs.dataset_inputs or [])}
    for split, context in (("train", "training"), ("eval", "evaluation")):
        spec, rep = getattr(cfg.data, split), getattr(report, split)
        if not spec or not rep:
            continue
        name = f"{split}:{spec.split('/')[-1]}"[:200]
        digest = data_digest(rep.fingerprint)
        if (name, digest) in have:
            continue
        ds = MetaDataset(_dataset_source(spec), name=name, digest=digest)
        mlflow.log_input(ds, context=context, tags={"rows": str(rep.rows), "spec": spec[:200]})
