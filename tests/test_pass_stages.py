"""The pass's stages without Ray: the scoring actor's work (tokenize → reference log-probs → embeddings),
the seeded local shuffle and weights, the classifier sample, the reference's precision, and how the pass and
the worker group are sized to a small cluster."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from bco_ray.builtin import BUILTIN_TRAIN, resolve_data
from bco_ray.config.schema import load_config
from bco_ray.data.reader import ReadUnit
from bco_ray.job.resources import usable_cpus
from bco_ray.models import reference_dtype
from bco_ray.precompute import pipeline, read, rows, stages
from bco_ray.precompute.sizing import pass_resources

ROWS = [json.loads(line) for line in open(resolve_data(BUILTIN_TRAIN)).read().splitlines()[:40]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from bco_ray.job.run import resolve_paths

    cfg = load_config(overrides={"output_dir": str(tmp_path_factory.mktemp("o")), "udm": {"prompt_sample_size": 4}})
    paths, _ = resolve_paths(cfg)
    return cfg, paths


def _raw(raw_rows, split="train"):
    """The rows as the pass's read yields them (bco_ray/precompute/read.py)."""
    return read.checked_table([ReadUnit(split, "mem", kind="memory", dataset=raw_rows)], "error")


def test_score_tokenizes_scores_and_embeds_what_udm_needs(setup):
    cfg, paths = setup
    counts = {True: sum(r["label"] for r in ROWS), False: sum(not r["label"] for r in ROWS)}
    kw = pipeline._score_kwargs(cfg, paths, counts, None)
    score = stages.Score(**kw)
    raw = pa.concat_tables([_raw(ROWS[:30]), _raw(ROWS[30:], "eval")])
    out = score(raw)
    assert out.num_rows == 40 and set(out.column("split").to_pylist()) == {"train", "eval"}
    # the reference log-probs are those of the reference actor on the same tokenized rows
    tok = stages.tokenize(_raw(ROWS[:30]), split="train", **kw["tokenize_kwargs"])
    ref = stages.RefLogps(**kw["ref_kwargs"])(tok)
    train = np.asarray(out.column("split").to_pylist()) == "train"
    np.testing.assert_allclose(out.column("ref_logps").to_numpy()[train], ref.column("ref_logps").to_numpy(), atol=1e-5)
    labels = np.asarray(out.column("label").to_pylist())
    has = np.asarray([len(e) > 0 for e in out.column("prompt_embedding").to_pylist()])
    sample = np.asarray(out.column("fit_sample").to_pylist())
    assert has[~labels].all()  # every undesirable row: its weight needs it
    assert (has == (~labels | sample)).all() and not sample[~train].any()  # chosen rows: only the train sample
    assert len(out.column("prompt_embedding")[0].as_py() or out.column("prompt_embedding")[1].as_py()) == 384


def test_sample_mask_does_not_depend_on_batching():
    ids = [list(range(i, i + 5)) for i in range(200)]
    labels = np.arange(200) % 2 == 0
    rates = {True: 0.3, False: 0.6}
    whole = rows.fit_sample_mask(ids, labels, rates, seed=7)
    parts = np.concatenate(
        [rows.fit_sample_mask(ids[i : i + 13], labels[i : i + 13], rates, seed=7) for i in range(0, 200, 13)]
    )
    assert (whole == parts).all()
    assert 0.15 < whole[labels].mean() < 0.45 and 0.45 < whole[~labels].mean() < 0.75
    assert (rows.fit_sample_mask(ids, labels, rates, seed=8) != whole).any()


def _scored(n=50):
    rng = np.random.default_rng(0)
    labels = rng.random(n) < 0.5
    return pa.table(
        {
            "input_ids": pa.array([list(range(i % 7 + 2)) + [i] for i in range(n)], pa.list_(pa.int32())),
            "prompt_len": pa.array(np.ones(n, dtype=np.int32)),
            "label": pa.array(labels),
            "ref_logps": pa.array(rng.normal(size=n).astype(np.float32)),
            "prompt_embedding": pa.array(
                [rng.normal(size=3).astype(np.float32).tolist() for _ in range(n)], pa.list_(pa.float32())
            ),
            "split": pa.array(["train"] * n),
        }
    )


def test_finalize_permutes_with_the_seed_and_weighs_rejected_rows():
    from bco_ray.bco.udm import fit_udm_classifier, udm_weights

    t = _scored()
    emb = np.stack([np.asarray(x, dtype=np.float32) for x in t.column("prompt_embedding").to_pylist()])
    labels = np.asarray(t.column("label").to_pylist())
    clf, _ = fit_udm_classifier(emb[labels], emb[~labels])
    from bco_ray.bco.udm import classifier_to_json

    kw = dict(clf_json=classifier_to_json(clf), min_ratio=0.5, max_ratio=10.0)
    a, b = rows.finalize(t, permute_seed=3, **kw), rows.finalize(t, permute_seed=3, **kw)
    assert a.equals(b)  # seeded: the same order every run
    assert a.column("row_id").to_pylist() != rows.finalize(t, permute_seed=4, **kw).column("row_id").to_pylist()
    assert sorted(a.column("row_id").to_pylist()) == sorted(rows.row_ids(t).to_pylist())  # a permutation
    assert set(a.column_names) == {"input_ids", "prompt_len", "label", "ref_logps", "udm_weight", "row_id"}
    plain = rows.finalize(t, permute_seed=None, **kw)
    np.testing.assert_array_equal(plain.column("udm_weight").to_numpy(), udm_weights(clf, emb, labels))
    assert len(set(rows.row_ids(t).to_pylist())) == t.num_rows
    unit = rows.finalize(t, clf_json=None, min_ratio=0.5, max_ratio=10.0, permute_seed=None)
    assert (unit.column("udm_weight").to_numpy() == 1).all()


def test_reference_scores_in_the_training_dtype():
    def ref_dtype(**train):
        return reference_dtype(
            load_config(
                overrides={"train": train, "precompute": {"num_gpus_per_actor": 1 if train.get("use_gpu") else 0}}
            )
        )

    assert ref_dtype() == "float32"  # CPU: float32 training
    assert ref_dtype(use_gpu=True) == "bfloat16"  # GPU: bf16 training, bf16 reference
    assert ref_dtype(use_gpu=True, bf16=False) == "float32"
    assert ref_dtype(bf16=True) == "bfloat16"
    assert reference_dtype(load_config(overrides={"model": {"dtype": "float16"}})) == "float16"


@pytest.mark.parametrize("packed", [True, False])
def test_bf16_reference_equal_to_the_policy_gives_zero_step0_rewards(setup, packed):
    """The reference = the policy's initial weights, both in bf16 (as on a GPU): r = β(log π − log π_ref) = 0,
    bitwise, with the pass and the trainer each in its default layout (packed: rows packed differently on each
    side, as they are) or both padded (precompute.packed=false, train.micro_batch_tokens=0)."""
    from bco_ray.bco.logprobs import packed_completion_logps, policy_completion_logps
    from bco_ray.data.packing import collate_packed
    from bco_ray.models import load_causal_lm
    from bco_ray.train.batches import collate

    cfg, paths = setup
    cfg = load_config(overrides={**cfg.to_dict(), "train": {"bf16": True}, "precompute": {"packed": packed}})
    kw = pipeline._score_kwargs(cfg, paths, {True: 20, False: 20}, None)
    tok = stages.tokenize(_raw(ROWS[:16]), split="train", **kw["tokenize_kwargs"])
    ref = stages.RefLogps(**kw["ref_kwargs"])(tok)
    policy = load_causal_lm(paths.policy, dtype=torch.bfloat16)  # as build_policy loads it for bf16
    cols = {
        k: np.asarray(ref.column(k).to_pylist(), dtype=object if k == "input_ids" else None)
        for k in ("input_ids", "prompt_len", "label", "ref_logps")
    } | {"udm_weight": np.ones(16, dtype=np.float32)}
    with torch.no_grad():
        if packed:  # the trainer's packs: here, every other row, in reverse order
            order = list(range(15, -1, -2)) + list(range(14, -1, -2))
            batch = collate_packed(cols, order, paths.pad_id, 16)
            logps = torch.empty(16, dtype=torch.float32)
            logps[order] = packed_completion_logps(policy, batch).float()
            expected = torch.as_tensor(cols["ref_logps"], dtype=torch.float32)
        else:
            batch = collate(cols, paths.pad_id)
            logps = policy_completion_logps(policy, batch.input_ids, batch.attention_mask, batch.prompt_len)
            expected = batch.ref_logps
    assert torch.equal(logps.float(), expected.float())


@pytest.mark.parametrize("cpus", [1, 2])
def test_small_fixed_cluster_fits_the_whole_pass_at_once(cpus):
    r = pass_resources(cpus, wanted_actors=4, can_grow=False)
    assert r.max_actors == 1 and r.actor_cpus + 3 * r.task_cpus <= cpus + 1e-9  # actor + read, write, finalize
    assert r.actor_threads == cpus


def test_large_or_growing_cluster_keeps_a_cpu_for_the_light_tasks():
    assert pass_resources(8, wanted_actors=4, can_grow=False).max_actors == 4
    assert pass_resources(4, wanted_actors=8, can_grow=False).max_actors == 3
    grow = pass_resources(0, wanted_actors=2, can_grow=True)
    assert grow.actor_cpus == 1.0 and grow.max_actors == 1


def test_usable_cpus_follows_affinity_and_cgroup_quota(monkeypatch):
    import os

    from bco_ray.job import resources

    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(resources, "_cgroup_quota", lambda: None)
    assert usable_cpus() == 4  # the affinity mask, not os.cpu_count()
    monkeypatch.setattr(resources, "_cgroup_quota", lambda: 1.5)
    assert usable_cpus() == 2  # a quota of 1.5 CPUs caps it (rounded up)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    assert usable_cpus() == 1


def test_a_worker_group_that_can_never_fit_fails_before_any_work(monkeypatch):
    import ray

    from bco_ray.job.run import ResourcesUnavailableError, check_cluster_fits

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    cfg = load_config(overrides={"train": {"num_workers": 2}})
    with pytest.raises(
        ResourcesUnavailableError,
        match=r"2 × 1 CPU = 2 CPU.*has 1 CPU and cannot grow.*"
        r"--train.cpus_per_worker=0.5",
    ):
        check_cluster_fits(cfg, started_locally=True)
    assert check_cluster_fits(load_config(overrides={"train": {"num_workers": 1}}), True).actor_cpus == 0.5
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})  # an autoscaling head with no CPU yet
    assert check_cluster_fits(cfg, started_locally=False).actor_cpus == 1.0
