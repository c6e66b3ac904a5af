"""The Ray Data pass, spelled out: read → tokenize → shuffle → reference log-probs → prompt embeddings
→ write; fit the UDM classifier on a sample; → weights → write; commit the cache atomically."""
from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy

from bco_ray.bco.udm import fit_udm_classifier, sample_rows
from bco_ray.config import Config
from bco_ray.data.sources import read_source, source_fingerprint
from bco_ray.precompute.cache import Cache, cache_key, fingerprint_path
from bco_ray.precompute.stages import AddWeights, Counters, Embed, RefLogps, Tokenize

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
        parts.update(embedder=fingerprint_path(paths.embedder), prompt_sample_size=u.prompt_sample_size,
                     min_density_ratio=u.min_density_ratio, max_density_ratio=u.max_density_ratio,
                     max_embed_length=u.max_embed_length)
    return parts


def _score(cfg: Config, paths: Paths, spec: str, counters) -> ray.data.Dataset:
    p, d, u = cfg.precompute, cfg.data, cfg.udm
    ds = read_source(spec)
    ds = ds.map_batches(Tokenize, batch_format="pyarrow", batch_size=p.batch_size,
                        compute=ActorPoolStrategy(min_size=1, max_size=max(1, p.ref_actors[1])),
                        fn_constructor_kwargs=dict(
                            tokenizer_path=paths.tokenizer, revision=cfg.model.revision,
                            max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                            on_bad_rows=d.on_bad_rows, source=spec, counters=counters))
    # Paired data arrives chosen/rejected adjacent: shuffle so micro-batches mix labels.
    ds = ds.random_shuffle(seed=d.seed)
    gpu = {"num_gpus": p.num_gpus_per_actor} if p.num_gpus_per_actor > 0 else {}
    ds = ds.map_batches(RefLogps, batch_format="pyarrow", batch_size=p.batch_size,
                        compute=ActorPoolStrategy(min_size=p.ref_actors[0], max_size=p.ref_actors[1]),
                        fn_constructor_kwargs=dict(
                            model_path=paths.reference, revision=cfg.model.revision, dtype=cfg.model.dtype,
                            num_gpus=p.num_gpus_per_actor, token_budget=p.token_budget,
                            chunk_size=p.logp_chunk_size, pad_id=paths.pad_id,
                            attn_implementation=cfg.model.attn_implementation), **gpu)
    if u.enabled:
        ds = ds.map_batches(Embed, batch_format="pyarrow", batch_size=p.batch_size,
                            compute=ActorPoolStrategy(min_size=p.embed_actors[0], max_size=p.embed_actors[1]),
                            fn_constructor_kwargs=dict(model_path=paths.embedder, num_gpus=p.num_gpus_per_actor,
                                                       max_length=u.max_embed_length, token_budget=p.token_budget),
                            **gpu)
    return ds


def _of_class(ds: ray.data.Dataset, label: bool) -> ray.data.Dataset:
    return ds.map_batches(lambda t: t.filter(pc.equal(t["label"], label)), batch_format="pyarrow")


def _class_sample(ds: ray.data.Dataset, label: bool, n_class: int, size: int, rng) -> np.ndarray:
    """`size` prompt embeddings of one class, drawn with replacement. Streams a random subset of about
    2×size rows (all rows for small classes) instead of collecting the class on the driver."""
    sub = _of_class(ds, label).select_columns(["prompt_embedding"])
    if n_class > 2 * size:
        sub = sub.random_sample(2 * size / n_class, seed=int(rng.integers(1 << 31)))
    batches = [b["prompt_embedding"] for b in sub.iter_batches(batch_size=4096, batch_format="numpy")]
    emb = np.concatenate([np.stack(list(b)) if b.dtype == object else b for b in batches]).astype(np.float32)
    return emb[sample_rows(len(emb), size, rng)]


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


def run_precompute(cfg: Config, paths: Paths) -> PrecomputeResult:
    root = cfg.precompute.cache_dir or f"{cfg.output_dir}/cache"
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
    counters = Counters.remote()
    splits = {"train": cfg.data.train, **({"eval": cfg.data.eval} if cfg.data.eval else {})}
    for name, spec in splits.items():
        _score(cfg, paths, spec, counters).write_parquet(f"{adir}/stage1/{name}")

    clf, udm_metrics = None, {}
    u = cfg.udm
    if u.enabled:
        stage1 = ray.data.read_parquet(f"{adir}/stage1/train")
        n_chosen, n_total = _of_class(stage1, True).count(), stage1.count()
        rng = np.random.default_rng(cfg.data.seed)
        chosen = _class_sample(stage1, True, n_chosen, u.prompt_sample_size, rng)
        rejected = _class_sample(stage1, False, n_total - n_chosen, u.prompt_sample_size, rng)
        clf, udm_metrics = fit_udm_classifier(chosen, rejected)
        log.info("UDM classifier accuracy %.3f (chosen %.3f, rejected %.3f)", udm_metrics["udm/accuracy"],
                 udm_metrics["udm/accuracy_chosen"], udm_metrics["udm/accuracy_rejected"])
        with cache.fs.open(f"{cache.key_dir}/{attempt}/classifier.pkl", "wb") as f:
            pickle.dump(clf, f)

    clf_bytes = pickle.dumps(clf) if clf is not None else None
    out = {}
    summary: dict = {"udm": udm_metrics, "dropped": {}}
    for name in splits:
        final = ray.data.read_parquet(f"{adir}/stage1/{name}").map_batches(
            AddWeights, batch_format="pyarrow", compute=ActorPoolStrategy(min_size=1, max_size=2),
            fn_constructor_kwargs=dict(clf_bytes=clf_bytes, min_ratio=u.min_density_ratio,
                                       max_ratio=u.max_density_ratio))
        out[name] = f"{adir}/{name}"
        final.write_parquet(out[name])
        summary[name] = _summarise(ray.data.read_parquet(out[name]), u.min_density_ratio, u.max_density_ratio)
    summary["dropped"] = ray.get(counters.get.remote())
    summary["seconds"] = round(time.time() - t0, 2)
    cache.fs.rm(f"{cache.key_dir}/{attempt}/stage1", recursive=True)
    cache.write_json(f"{cache.key_dir}/{attempt}/summary.json", summary)
    cache.commit(attempt, {"train": out["train"], "eval": out.get("eval"), "summary": summary})
    return PrecomputeResult(key, adir, out["train"], out.get("eval"), summary, False)
