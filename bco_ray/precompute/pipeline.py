"""The Ray Data pass, spelled out: read → one pool of scoring actors (tokenize, reference log-probs, prompt
embeddings) → write; fit the UDM classifier on a sample; → shuffle, weights → write; commit atomically."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import ray
from ray.data import ActorPoolStrategy

from bco_ray.bco.udm import classifier_to_json, fit_udm_classifier, sample_rows
from bco_ray.config.schema import Config
from bco_ray.data.checks import DataReport, check_trainable
from bco_ray.data.fingerprint import fingerprint_path
from bco_ray.data.pass_summary import PrecomputeSummary, SplitSummary, UdmFit, WeightHist
from bco_ray.data.sources import source_fingerprint
from bco_ray.models import Paths, reference_dtype
from bco_ray.precompute.cache import Cache, cache_key, reuse_or_compute
from bco_ray.precompute.read import count_rows, input_error_of, read_rows
from bco_ray.precompute.rows import HIST_BINS, block_stats, finalize
from bco_ray.precompute.sizing import PassResources, pass_resources
from bco_ray.precompute.stages import Counters, Score

log = logging.getLogger(__name__)


@dataclass
class PrecomputeResult:
    key: str
    dir: str  # the committed attempt directory (URI)
    train: str
    eval: str | None
    summary: PrecomputeSummary
    reused: bool


def key_parts(cfg: Config, paths: Paths, report: DataReport | None = None) -> dict:
    """Everything that changes the pass's output; `report`: the data check's (its fingerprints, no second hub call)."""
    d, u, m = cfg.data, cfg.udm, cfg.model
    parts = {
        "reference": fingerprint_path(paths.reference, m.revision, etags=True),
        "tokenizer": fingerprint_path(paths.tokenizer, m.revision, etags=True),
        "dtype": reference_dtype(cfg),
        "max_length": d.max_length,
        "max_prompt_length": d.max_prompt_length,
        "train": report.train.fingerprint if report else source_fingerprint(d.train),
        "eval": (report.eval.fingerprint if report and report.eval else source_fingerprint(d.eval)) if d.eval else None,
        "seed": d.seed,
        "on_bad_rows": d.on_bad_rows,
        "udm": u.enabled,
        "local_shuffle_max_rows": cfg.precompute.local_shuffle_max_rows,
    }
    if cfg.precompute.packed:  # padded entries keep the key they had before packing existed
        parts["packed"] = True
    if u.enabled:
        parts.update(
            embedder=fingerprint_path(u.embedding_func or paths.embedder, etags=True),
            prompt_sample_size=u.prompt_sample_size,
            min_density_ratio=u.min_density_ratio,
            max_density_ratio=u.max_density_ratio,
            max_embed_length=u.max_embed_length,
            embed_special_tokens=u.embed_special_tokens,
        )
    return parts


def _gpu(cfg: Config) -> dict:
    g = cfg.precompute.num_gpus_per_actor
    return {"num_gpus": g} if g > 0 else {}


def embed_kwargs(cfg: Config, paths: Paths, clf_json: bytes | None = None) -> dict:
    """The UDM embedding stage's arguments (the pass's actors, and the Python API's in-process weights)."""
    u = cfg.udm
    return dict(
        model_path=paths.embedder,
        num_gpus=cfg.precompute.num_gpus_per_actor,
        max_length=u.max_embed_length,
        token_budget=cfg.precompute.token_budget,
        special_tokens=u.embed_special_tokens,
        clf_json=clf_json,
        min_ratio=u.min_density_ratio,
        max_ratio=u.max_density_ratio,
        func_path=u.embedding_func,
    )


def _score_kwargs(cfg: Config, paths: Paths, counts: dict[bool, int], counters) -> dict:
    d, p, u = cfg.data, cfg.precompute, cfg.udm
    return dict(
        tokenize_kwargs=dict(
            tokenizer_path=paths.tokenizer,
            revision=cfg.model.revision,
            max_length=d.max_length,
            max_prompt_length=d.max_prompt_length,
        ),
        ref_kwargs=dict(
            model_path=paths.reference,
            revision=cfg.model.revision,
            dtype=reference_dtype(cfg),
            num_gpus=p.num_gpus_per_actor,
            token_budget=p.token_budget,
            chunk_size=p.logp_chunk_size,
            pad_id=paths.pad_id,
            attn_implementation=cfg.model.attn_implementation,
            packed=p.packed,
        ),
        embed_kwargs=embed_kwargs(cfg, paths) if u.enabled else None,
        # About 2×prompt_sample_size rows of each class are embedded for the classifier's sample (all rows
        # of a small class); every undesirable row is embedded anyway, for its weight.
        sample_rates={lab: min(1.0, 2 * u.prompt_sample_size / max(1, n)) for lab, n in counts.items()},
        seed=d.seed,
        counters=counters,
    )


def score(
    cfg: Config, paths: Paths, report: DataReport, counts: dict[bool, int], counters, res: PassResources
) -> ray.data.Dataset:
    """train (+ eval) rows, one read through the one reader (checked, unpaired, one schema whatever each file's
    format) → one pool of scoring actors (tokenize, reference log-probs, embeddings)."""
    p = cfg.precompute
    ds = read_rows(report.units(), cfg.data.on_bad_rows, res.task_cpus)
    lo, hi = p.ref_actors
    return ds.map_batches(
        Score,
        batch_format="pyarrow",
        batch_size=p.batch_size,
        num_cpus=res.actor_cpus,
        compute=ActorPoolStrategy(min_size=min(lo, res.max_actors), max_size=min(hi, res.max_actors)),
        fn_constructor_kwargs={**_score_kwargs(cfg, paths, counts, counters), "threads": res.actor_threads},
        **_gpu(cfg),
    )


def fit_classifier(cfg: Config, scored_train: str, counts: dict[bool, int], res: PassResources):
    """UDM: from the embedded sample rows of each class, min(class size, `prompt_sample_size`) draws with
    replacement (as the reference), then a balanced logistic regression."""
    u = cfg.udm
    rng = np.random.default_rng(cfg.data.seed)
    ds = ray.data.read_parquet(
        scored_train, columns=["label", "prompt_embedding", "fit_sample"], num_cpus=res.task_cpus
    )
    ds = ds.map_batches(lambda t: t.filter(t["fit_sample"]), batch_format="pyarrow", num_cpus=res.task_cpus)
    labels, emb = [], []
    for b in ds.iter_batches(batch_size=4096, batch_format="pyarrow"):
        labels.append(np.asarray(b.column("label").to_pylist(), dtype=bool))
        emb.extend(np.asarray(x, dtype=np.float32) for x in b.column("prompt_embedding").to_pylist())
    labels = np.concatenate(labels) if labels else np.zeros(0, dtype=bool)
    emb = np.stack(emb) if emb else np.zeros((0, 1), dtype=np.float32)
    samples = {}
    for label in (True, False):
        of_class = emb[labels == label]
        samples[label] = of_class[sample_rows(len(of_class), min(counts[label], u.prompt_sample_size), rng)]
    return fit_udm_classifier(samples[True], samples[False])


def finalized(
    cfg: Config, scored_split: str, shuffle: bool, rows: int, clf_json: bytes | None, res: PassResources
) -> ray.data.Dataset:
    """Scored rows of one split → shuffled, weighted training rows. Paired data arrives chosen/rejected
    adjacent: shuffle so micro-batches mix labels. A split of up to precompute.local_shuffle_max_rows rows
    is permuted in one seeded task (one block); a larger one takes Ray Data's all-to-all random shuffle."""
    u, seed = cfg.udm, cfg.data.seed
    ds = ray.data.read_parquet(scored_split, num_cpus=res.task_cpus)
    local = shuffle and rows <= cfg.precompute.local_shuffle_max_rows
    if shuffle:
        ds = ds.repartition(1) if local else ds.random_shuffle(seed=seed)
    return ds.map_batches(
        finalize,
        batch_format="pyarrow",
        batch_size=None if local else cfg.precompute.batch_size,
        num_cpus=res.task_cpus,
        fn_kwargs=dict(
            clf_json=clf_json,
            min_ratio=u.min_density_ratio,
            max_ratio=u.max_density_ratio,
            permute_seed=seed if local else None,
        ),
    )


def _summarise(ds: ray.data.Dataset, lo: float, hi: float, res: PassResources) -> SplitSummary:
    tot = {"rows": 0, "chosen": 0, "tokens": 0, "completion_tokens": 0, "pad_tokens": 0, "weight_sum": 0.0}
    hist = np.zeros(HIST_BINS, dtype=np.int64)
    for row in ds.map_batches(
        block_stats, batch_format="pyarrow", num_cpus=res.task_cpus, fn_kwargs={"lo": lo, "hi": hi}
    ).iter_rows():
        for k in tot:
            tot[k] += row[k]
        hist += np.asarray(row["hist"])
    tot = {k: float(v) if k == "weight_sum" else int(v) for k, v in tot.items()}  # plain JSON numbers
    rejected = tot["rows"] - tot["chosen"]
    return SplitSummary(
        **tot,
        rejected=rejected,
        padding_fraction=tot["pad_tokens"] / max(1, tot["pad_tokens"] + tot["tokens"]),
        mean_rejected_weight=tot["weight_sum"] / max(1, rejected),
        weight_hist=WeightHist(np.linspace(lo, hi, HIST_BINS + 1).tolist(), hist.tolist()),
    )


def run_precompute(
    cfg: Config, paths: Paths, report: DataReport | None = None, resources: PassResources | None = None
) -> PrecomputeResult:
    """cfg: with its locations resolved by the job (bco_ray/job/checks.py: run_checks), taken as given.
    report: the driver's data check (its read units, fingerprints and, for data it checked whole, its
    counts; default: checked now). A split larger than the driver checks is checked and counted here, by the
    read alone, before any model loads (then `check_trainable`). resources: the stages' CPU asks (default:
    sized to the cluster as it is now)."""
    if not cfg.precompute.cache_dir:
        raise ValueError("run_precompute needs a config with its locations resolved (bco_ray.job.checks.run_checks)")
    if report is None:
        from bco_ray.data.checks import check_data

        report = check_data(cfg)
    key = cache_key(key_parts(cfg, paths, report))
    cache = Cache(cfg.precompute.cache_dir, key)

    def reuse(record: dict) -> PrecomputeResult:
        adir = cache.uri(f"{cache.key_dir}/{record['attempt']}")
        log.info("precompute cache hit: %s (reusing, pass --precompute.force to recompute)", adir)
        _restore_counts(report, record.get("data") or {})
        return PrecomputeResult(
            key, adir, record["train"], record.get("eval"), PrecomputeSummary.from_dict(record["summary"]), True
        )

    def compute() -> PrecomputeResult:
        res = resources
        if res is None:  # a cluster with no CPU yet can only be one that autoscales
            cpus = ray.cluster_resources().get("CPU", 0)
            res = pass_resources(cpus, cfg.precompute.ref_actors[1], can_grow=cpus == 0)
        if not report.complete:
            _count_every_row(cfg, report, res)
        return _run_pass(cfg, paths, cache, report, res)

    # One job computes (under the key's lease), concurrent ones wait and reuse; a damaged entry is recomputed.
    return reuse_or_compute(cache, compute, reuse, force=cfg.precompute.force)


def _count_every_row(cfg: Config, report: DataReport, res: PassResources) -> None:
    """Data larger than the driver checked: every row checked and counted by the read alone (no model loads)."""
    t0 = time.time()
    for name, rep in count_rows(report.units(), cfg.data.on_bad_rows, res.task_cpus).items():
        getattr(report, name).update_counts(rep)
    log.info("data: every row checked in %.1f s (%d train rows)", time.time() - t0, report.train.rows)
    check_trainable(cfg, report)


def _counts(report: DataReport) -> dict:
    """The data check's counts, kept in the cache record (a hit on data the driver checked only in part)."""
    splits = {"train": report.train, "eval": report.eval}
    return {
        name: {
            "rows": r.rows,
            "bad_rows": r.bad_rows,
            "duplicates": r.duplicates,
            "desirable": r.labels.desirable,
            "undesirable": r.labels.undesirable,
            "bad_reasons": r.bad_reasons,
        }
        for name, r in splits.items()
        if r is not None
    }


def _restore_counts(report: DataReport, data: dict) -> None:
    for name, c in data.items():
        rep = getattr(report, name, None)
        if rep is None or rep.complete:
            continue
        full = type(rep)()
        full.add(c["rows"], c["bad_rows"], c["duplicates"], c["desirable"], c["undesirable"])
        full.bad_reasons = dict(c.get("bad_reasons") or {})
        rep.update_counts(full)


def _score_into(uri: str, scored: ray.data.Dataset, res: PassResources) -> None:
    """Write the scored rows by split; a row the read refuses raises its file/row/field error, not Ray's wrapper."""
    try:
        scored.write_parquet(uri, partition_cols=["split"], ray_remote_args={"num_cpus": res.task_cpus})
    except Exception as e:
        err = input_error_of(e)
        if err is None:
            raise
        raise err from None


def _run_pass(cfg: Config, paths: Paths, cache: Cache, report: DataReport, res: PassResources) -> PrecomputeResult:
    """Score → fit the UDM classifier → finalize each split into a new attempt of `cache`, then commit it."""
    t0 = time.time()
    counts = report.train.labels.by_label()
    attempt = cache.new_attempt()
    adir = cache.uri(f"{cache.key_dir}/{attempt}")
    log.info("precompute cache miss (key %s): scoring into %s", cache.key, adir)
    counters = Counters.remote()
    _score_into(f"{adir}/scored", score(cfg, paths, report, counts, counters, res), res)
    u = cfg.udm
    clf, udm_metrics = None, {}
    if u.enabled:
        clf, udm_metrics = fit_classifier(cfg, f"{adir}/scored/split=train", counts, res)
        log.info(
            "UDM classifier accuracy %.3f (chosen %.3f, rejected %.3f)",
            udm_metrics["udm/accuracy"],
            udm_metrics["udm/accuracy_chosen"],
            udm_metrics["udm/accuracy_rejected"],
        )
    clf_json = classifier_to_json(clf) if clf is not None else None
    if clf_json is not None:  # plain parameters, never a pickle: nothing executable in the cache
        with cache.fs.open(f"{cache.key_dir}/{attempt}/classifier.json", "wb") as f:
            f.write(clf_json)
    out = {"train": f"{adir}/split=train", "eval": f"{adir}/split=eval" if cfg.data.eval else None}
    splits: dict[str, SplitSummary] = {}
    for name, path in out.items():
        if path:
            finalized(
                cfg, f"{adir}/scored/split={name}", name == "train", counts[True] + counts[False], clf_json, res
            ).write_parquet(path, ray_remote_args={"num_cpus": res.task_cpus})
            splits[name] = _summarise(
                ray.data.read_parquet(path, num_cpus=res.task_cpus),
                u.min_density_ratio,
                u.max_density_ratio,
                res,
            )
    cache.fs.rm(f"{cache.key_dir}/{attempt}/scored", recursive=True)
    summary = PrecomputeSummary(
        udm=UdmFit.from_dict(udm_metrics),
        dropped=ray.get(counters.get.remote()),
        train=splits["train"],
        eval=splits.get("eval"),
        seconds=round(time.time() - t0, 2),
    )
    cache.write_json(f"{cache.key_dir}/{attempt}/summary.json", summary.to_dict())
    cache.commit(
        attempt, {"train": out["train"], "eval": out["eval"], "summary": summary.to_dict(), "data": _counts(report)}
    )
    log.info(
        "precompute done in %.1f s: %s",
        summary.seconds,
        json.dumps(
            {k: getattr(summary.train, k) for k in ("rows", "tokens", "chosen", "rejected", "padding_fraction")}
        ),
    )
    return PrecomputeResult(cache.key, adir, out["train"], out["eval"], summary, False)
