"""The Ray Data pass, spelled out: read → tokenize → shuffle → reference log-probs → prompt embeddings
→ write; fit the UDM classifier on a sample; → weights → write; commit the cache atomically."""
from __future__ import annotations

import json
import logging
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy

from bco_ray.bco.udm import fit_udm_classifier, sample_rows
from bco_ray.config import Config
from bco_ray.data.sources import read_source, source_fingerprint
from bco_ray.precompute.cache import Cache, cache_key, fingerprint_path
from bco_ray.precompute.stages import Counters, Embed, RefLogps, tokenize, unit_weights

log = logging.getLogger(__name__)
HIST_BINS = 20


@dataclass
class Paths:
    """Resolved locations of the models (builtin names already materialised)."""
    policy: str
    reference: str
    tokenizer: str
    embedder: str | None
    pad_id: int


@dataclass
class PrecomputeResult:
    key: str
    dir: str                # the committed attempt directory (URI)
    train: str
    eval: str | None
    summary: dict
    reused: bool


def key_parts(cfg: Config, paths: Paths) -> dict:
    d, u, m = cfg.data, cfg.udm, cfg.model
    parts = {
        "reference": fingerprint_path(paths.reference, m.revision),
        "tokenizer": fingerprint_path(paths.tokenizer, m.revision),
        "dtype": m.dtype, "max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
        "train": source_fingerprint(d.train), "eval": source_fingerprint(d.eval) if d.eval else None,
        "seed": d.seed, "on_bad_rows": d.on_bad_rows, "udm": u.enabled,
    }
    if u.enabled:
        parts.update(embedder=fingerprint_path(u.embedding_func or paths.embedder),
                     prompt_sample_size=u.prompt_sample_size,
                     min_density_ratio=u.min_density_ratio, max_density_ratio=u.max_density_ratio,
                     max_embed_length=u.max_embed_length, embed_special_tokens=u.embed_special_tokens)
    return parts


def _tokenized(cfg: Config, paths: Paths, split: str, spec, counters=None) -> ray.data.Dataset:
    d = cfg.data
    return read_source(spec).map_batches(
        tokenize, batch_format="pyarrow", batch_size=cfg.precompute.batch_size,
        fn_kwargs=dict(tokenizer_path=paths.tokenizer, revision=cfg.model.revision, max_length=d.max_length,
                       max_prompt_length=d.max_prompt_length, on_bad_rows=d.on_bad_rows,
                       source=spec if isinstance(spec, str) else "dataset", split=split, counters=counters))


def _gpu(cfg: Config) -> dict:
    g = cfg.precompute.num_gpus_per_actor
    return {"num_gpus": g} if g > 0 else {}


def _embed_kwargs(cfg: Config, paths: Paths, clf_bytes: bytes | None = None) -> dict:
    u = cfg.udm
    return dict(model_path=paths.embedder, num_gpus=cfg.precompute.num_gpus_per_actor, max_length=u.max_embed_length,
                token_budget=cfg.precompute.token_budget, special_tokens=u.embed_special_tokens, clf_bytes=clf_bytes, min_ratio=u.min_density_ratio,
                max_ratio=u.max_density_ratio, func_path=u.embedding_func)


def _of_class(ds: ray.data.Dataset, label: bool) -> ray.data.Dataset:
    return ds.map_batches(lambda t: t.filter(pc.equal(t["label"], label)), batch_format="pyarrow")


def fit_classifier(cfg: Config, paths: Paths, counts: dict[bool, int]):
    """UDM: min(class size, `prompt_sample_size`) prompts per class, drawn with replacement, embedded by the embedding actors,
    then a balanced logistic regression. Streams a random subset of about 2×size rows of each class
    (all rows of a small class) rather than collecting the class on the driver."""
    u, p = cfg.udm, cfg.precompute
    rng = np.random.default_rng(cfg.data.seed)
    samples = {}
    for label in (True, False):
        ds = _of_class(_tokenized(cfg, paths, "train", cfg.data.train), label).select_columns(["prompt_text", "label"])
        if counts[label] > 2 * u.prompt_sample_size:
            ds = ds.random_sample(2 * u.prompt_sample_size / counts[label], seed=int(rng.integers(1 << 31)))
        ds = ds.map_batches(Embed, batch_format="pyarrow", batch_size=p.batch_size,
                            compute=ActorPoolStrategy(min_size=p.embed_actors[0], max_size=p.embed_actors[1]),
                            fn_constructor_kwargs=_embed_kwargs(cfg, paths), **_gpu(cfg))
        emb = np.concatenate([np.stack(list(b["prompt_embedding"])) for b in
                              ds.iter_batches(batch_size=4096, batch_format="numpy")]).astype(np.float32)
        # As the reference: min(class size, prompt_sample_size) draws with replacement.
        samples[label] = emb[sample_rows(len(emb), min(counts[label], u.prompt_sample_size), rng)]
    return fit_udm_classifier(samples[True], samples[False])


def enriched(cfg: Config, paths: Paths, clf_bytes: bytes | None, counters) -> ray.data.Dataset:
    """train (+ eval) rows: tokenized, shuffled, reference log-probs, UDM weights; a `split` column."""
    p = cfg.precompute
    ds = _tokenized(cfg, paths, "train", cfg.data.train, counters)
    if cfg.data.eval:
        ds = ds.union(_tokenized(cfg, paths, "eval", cfg.data.eval, counters))
    # Paired data arrives chosen/rejected adjacent: shuffle so micro-batches mix labels.
    ds = ds.random_shuffle(seed=cfg.data.seed)
    ds = ds.map_batches(RefLogps, batch_format="pyarrow", batch_size=p.batch_size,
                        compute=ActorPoolStrategy(min_size=p.ref_actors[0], max_size=p.ref_actors[1]),
                        fn_constructor_kwargs=dict(
                            model_path=paths.reference, revision=cfg.model.revision, dtype=cfg.model.dtype,
                            num_gpus=p.num_gpus_per_actor, token_budget=p.token_budget,
                            chunk_size=p.logp_chunk_size, pad_id=paths.pad_id,
                            attn_implementation=cfg.model.attn_implementation), **_gpu(cfg))
    if clf_bytes is None:
        return ds.map_batches(unit_weights, batch_format="pyarrow")
    return ds.map_batches(Embed, batch_format="pyarrow", batch_size=p.batch_size,
                          compute=ActorPoolStrategy(min_size=p.embed_actors[0], max_size=p.embed_actors[1]),
                          fn_constructor_kwargs=_embed_kwargs(cfg, paths, clf_bytes), **_gpu(cfg))


def _stats(table: pa.Table, lo: float, hi: float) -> pa.Table:
    labels = np.asarray(table.column("label").to_pylist(), dtype=bool)
    lengths = np.asarray([len(x) for x in table.column("input_ids").to_pylist()])
    plen = np.asarray(table.column("prompt_len").to_pylist())
    w = np.asarray(table.column("udm_weight").to_pylist(), dtype=np.float32)[~labels]
    hist, _ = np.histogram(w, bins=HIST_BINS, range=(lo, hi))
    return pa.table({"rows": [len(labels)], "chosen": [int(labels.sum())], "tokens": [int(lengths.sum())],
                     "completion_tokens": [int((lengths - plen).sum())],
                     "pad_tokens": [int(np.asarray(table.column("pad_tokens").to_pylist()).sum())],
                     "weight_sum": [float(w.sum())], "hist": [hist.tolist()]})


def _summarise(ds: ray.data.Dataset, lo: float, hi: float) -> dict:
    tot = {"rows": 0, "chosen": 0, "tokens": 0, "completion_tokens": 0, "pad_tokens": 0, "weight_sum": 0.0}
    hist = np.zeros(HIST_BINS, dtype=np.int64)
    for row in ds.map_batches(_stats, batch_format="pyarrow", fn_kwargs={"lo": lo, "hi": hi}).iter_rows():
        for k in tot:
            tot[k] += row[k]
        hist += np.asarray(row["hist"])
    rejected = tot["rows"] - tot["chosen"]
    return {**tot, "rejected": rejected,
            "padding_fraction": tot["pad_tokens"] / max(1, tot["pad_tokens"] + tot["tokens"]),
            "mean_rejected_weight": tot["weight_sum"] / max(1, rejected),
            "weight_hist": {"edges": np.linspace(lo, hi, HIST_BINS + 1).tolist(), "counts": hist.tolist()}}


def run_precompute(cfg: Config, paths: Paths, label_counts: dict[bool, int] | None = None) -> PrecomputeResult:
    """label_counts: rows per class of the train split (from the driver's data check), for the UDM sample."""
    root = cfg.precompute.cache_dir or f"{Path(cfg.output_dir).resolve()}/cache"
    key = cache_key(key_parts(cfg, paths))
    cache = Cache(root, key)
    if cfg.precompute.force:
        cache.invalidate()
    record = cache.complete()
    if record is not None:
        adir = cache.uri(f"{cache.key_dir}/{record['attempt']}")
        log.info("precompute cache hit: %s (reusing, pass --precompute.force to recompute)", adir)
        return PrecomputeResult(key, adir, record["train"], record.get("eval"), record["summary"], True)

    t0 = time.time()
    attempt = cache.new_attempt()
    adir = cache.uri(f"{cache.key_dir}/{attempt}")
    log.info("precompute cache miss (key %s): scoring into %s", key, adir)
    u = cfg.udm
    clf, udm_metrics = None, {}
    if u.enabled:
        clf, udm_metrics = fit_classifier(cfg, paths, label_counts or {True: 1 << 62, False: 1 << 62})
        log.info("UDM classifier accuracy %.3f (chosen %.3f, rejected %.3f)", udm_metrics["udm/accuracy"],
                 udm_metrics["udm/accuracy_chosen"], udm_metrics["udm/accuracy_rejected"])
        with cache.fs.open(f"{cache.key_dir}/{attempt}/classifier.pkl", "wb") as f:
            pickle.dump(clf, f)
    counters = Counters.remote()
    enriched(cfg, paths, pickle.dumps(clf) if clf is not None else None, counters).write_parquet(
        adir, partition_cols=["split"])
    out = {"train": f"{adir}/split=train", "eval": f"{adir}/split=eval" if cfg.data.eval else None}
    summary: dict = {"udm": udm_metrics, "dropped": ray.get(counters.get.remote())}
    for name, path in out.items():
        if path:
            summary[name] = _summarise(ray.data.read_parquet(path), u.min_density_ratio, u.max_density_ratio)
    summary["seconds"] = round(time.time() - t0, 2)
    cache.write_json(f"{cache.key_dir}/{attempt}/summary.json", summary)
    cache.commit(attempt, {"train": out["train"], "eval": out["eval"], "summary": summary})
    log.info("precompute done in %.1f s: %s", summary["seconds"], json.dumps(
        {k: summary["train"][k] for k in ("rows", "tokens", "chosen", "rejected", "padding_fraction")}))
    return PrecomputeResult(key, adir, out["train"], out["eval"], summary, False)
