"""`BCOTrainer.evaluate`: the trained model scored on this (driver) process with the run's final δ, by the same
functions the job uses. A new eval set goes through the pass's own stages (tokenize → reference log-probs →
UDM weights), called directly on one small table instead of through Ray Data."""

from __future__ import annotations

import dataclasses
import os

import fsspec
import pyarrow as pa
import torch

from bco_ray.api._io import _as_dataset, _cuda, _read_parquet_dir
from bco_ray.bco.loss import RunningMean
from bco_ray.bco.udm import classifier_from_json
from bco_ray.config.schema import Config
from bco_ray.data.reader import plan_units
from bco_ray.models import Paths, reference_dtype
from bco_ray.precompute import pipeline, read, stages
from bco_ray.train.evaluate import evaluate, table_batches


def eval_table(cfg: Config, paths: Paths, precompute_dir: str, eval_dataset=None) -> pa.Table:
    """The run's precomputed eval split (None), or `eval_dataset` (rows, a Dataset or a data spec) scored now with
    the models the job resolved (`paths`)."""
    if eval_dataset is None:
        return _read_parquet_dir(f"{precompute_dir}/split=eval")
    spec = (
        os.fspath(eval_dataset) if isinstance(eval_dataset, (str, os.PathLike)) else _as_dataset(eval_dataset, "eval")
    )
    d, p = cfg.data, cfg.precompute
    table = stages.tokenize(  # the rows read and checked as the pass reads them (one reader)
        read.checked_table(plan_units(spec, "eval"), d.on_bad_rows),
        tokenizer_path=paths.tokenizer,
        revision=cfg.model.revision,
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        split="eval",
    )
    gpus = 1.0 if _cuda() else 0.0
    table = stages.RefLogps(
        model_path=paths.reference,
        revision=cfg.model.revision,
        dtype=reference_dtype(cfg),
        num_gpus=gpus,
        token_budget=p.token_budget,
        chunk_size=p.logp_chunk_size,
        pad_id=paths.pad_id,
        attn_implementation=cfg.model.attn_implementation,
        packed=p.packed,
    )(table)
    if not cfg.udm.enabled:
        return stages.unit_weights(table)
    with fsspec.open(f"{precompute_dir}/classifier.json", "rb") as f:
        clf_bytes = f.read()
    classifier_from_json(clf_bytes)  # fail here, clearly, on a broken file
    kwargs = pipeline.embed_kwargs(cfg, paths, clf_bytes)
    kwargs["num_gpus"] = gpus
    return stages.Embed(**kwargs)(table)


def score(model, table: pa.Table, cfg: Config, pad_id: int, final_delta: float, batch_size: int) -> dict[str, float]:
    """eval/* metrics of `model` on the table's rows, as the job's eval computes them (one rank)."""
    eval_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=batch_size))
    device = next(model.parameters()).device
    delta = RunningMean(mean=float(final_delta), count=1.0)
    with torch.no_grad():
        return evaluate(model, table_batches(table, batch_size), delta, eval_cfg, pad_id, device, rank=0, world=1)
