"""The online job's Ray-free parts (fast tier): its checks before Ray (the online values, the cluster's fit for the
training workers beside the rollout actor), the rows each rank trains on in a round, the rollout's generation and
reference scoring in this process, and the `bco-ray online` command line. The job itself: tests/test_online_job.py."""

from __future__ import annotations

import math

import pytest

from bco_ray import cli
from bco_ray.config.schema import ConfigError, load_config
from bco_ray.job import online as online_job
from bco_ray.job.checks import ResourcesUnavailableError
from bco_ray.job.locations import resolve_locations
from bco_ray.job.online import check_online_fits, check_online_job
from bco_ray.online.prompts import PromptsError
from bco_ray.online.rollout import SCORED, Rollout
from bco_ray.train.online_loop import micro_batch_rows

from harness import ROOT, TEST_DATA

ONLINE = ROOT / "configs" / "online.yaml"


def config(tmp_path, *overrides):
    return load_config(ONLINE, [f"--output_dir={tmp_path}", TEST_DATA[0], "--data.eval=none", *overrides])


def conversations(round, n, seed):  # noqa: A002 - the prompt function contract's names
    return [[{"role": "user", "content": "What is 1 + 1?"}]] * n


@pytest.mark.parametrize(
    ("overrides", "error", "names"),
    [
        (["--online.prompts_per_round=3", "--online.samples_per_prompt=2"], ConfigError, "online.prompts_per_round"),
        ([f"--online.prompts={__name__}:conversations"], PromptsError, "online.prompts"),
        (["--train.max_steps=5"], ConfigError, "train.max_steps"),  # the rounds set the length
    ],
)
def test_online_checks_name_the_field(tmp_path, overrides, error, names):
    with pytest.raises(error, match=names.replace(".", r"\.")):
        check_online_job(config(tmp_path, *overrides))


def test_the_lr_schedule_spans_the_replayed_rows_too(tmp_path):
    """The LR schedule's length is every row the updates train on: with replay, round r trains its own rows and
    those of min(r, replay_rounds) previous rounds (else a linear schedule would reach 0 rounds early)."""
    o = config(tmp_path, "--online.rounds=4", "--online.prompts_per_round=2", "--online.samples_per_prompt=3").online
    assert online_job.planned_rows(o) == 4 * 6
    o.replay_rounds = 2
    assert online_job.planned_rows(o) == 6 * (1 + 2 + 3 + 3)


def test_the_workers_and_the_rollout_must_fit_together(tmp_path, monkeypatch):
    cfg = config(tmp_path, "--train.num_workers=2")
    monkeypatch.setattr(online_job.ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ResourcesUnavailableError) as e:
        check_online_fits(cfg, started_locally=True)
    msg = str(e.value)
    assert "train.num_workers × train.cpus_per_worker + online.rollout_cpus" in msg and "= 3 CPU" in msg
    assert "--train.num_workers=1" in msg
    assert check_online_fits(config(tmp_path), started_locally=True) == 2  # 1 + 1 on 2 CPUs; torch on both
    monkeypatch.setattr(online_job.ray, "cluster_resources", lambda: {})  # an autoscaling head may grow
    assert check_online_fits(cfg, started_locally=False) == 1


def test_each_rank_trains_its_own_rows_of_whole_steps():
    n, world, mb, gas = 37, 2, 4, 2
    per_rank = [micro_batch_rows(n, 0, 3, world, rank, mb, gas) for rank in range(world)]
    assert [len(steps) for steps in per_rank] == [2, 2]  # 37 rows: 2 steps of 16, 5 rows left out
    seen = [i for steps in per_rank for step in steps for batch in step for i in batch]
    assert all(len(batch) == mb for steps in per_rank for step in steps for batch in step)
    assert len(seen) == len(set(seen)) == 32 and set(seen) <= set(range(n))
    assert micro_batch_rows(n, 0, 3, world, 0, mb, gas) == per_rank[0]  # the same round: the same rows
    assert micro_batch_rows(n, 0, 4, world, 0, mb, gas) != per_rank[0]  # the next round: another shuffle


@pytest.fixture(scope="module")
def rollout(tmp_path_factory):
    from bco_ray.job.checks import resolve_paths

    cfg = config(tmp_path_factory.mktemp("rollout"), "--online.max_new_tokens=6", "--online.undesirable_weight=1")
    cfg = resolve_locations(cfg)
    return Rollout(cfg, resolve_paths(cfg)[0], threads=1)


def test_rollout_samples_k_per_prompt_seeded(rollout):
    prompts = ["What is 2 + 3?\nAnswer:", "What is 7 * 6?\nAnswer:"]
    out, empty = rollout.generate(prompts, 3, seed=5)
    assert [p for p, _ in out] == [prompts[0]] * 3 + [prompts[1]] * 3 and empty == 0
    assert all(isinstance(c, str) and c.strip() for _, c in out)
    assert rollout.generate(prompts, 3, seed=5) == (out, 0)


def test_rollout_leaves_out_empty_completions(rollout, monkeypatch):
    eos = rollout.tok.eos_token_id
    monkeypatch.setattr(rollout.backend, "sample", lambda ids, seed: [[eos], [29, eos]][: len(ids)])
    out, empty = rollout.generate(["What is 2 + 3?\nAnswer:"], 2, seed=0)
    assert empty == 1 and len(out) == 1 and out[0][1].strip()


def test_rollout_scores_as_the_pass(rollout):
    rows = [
        {"prompt": "What is 2 + 3?\nAnswer:", "completion": " 5", "label": True},
        {"prompt": "What is 2 + 3?\nAnswer:", "completion": "", "label": False},  # dropped, as the pass drops it
        {"prompt": "What is 7 * 6?\nAnswer:", "completion": " Maybe 40", "label": False},
    ]
    scored = rollout.score(rows)
    assert [sorted(r) for r in scored] == [sorted(SCORED)] * 2
    assert [r["label"] for r in scored] == [True, False] and [r["udm_weight"] for r in scored] == [1.0, 1.0]
    assert all(math.isfinite(r["ref_logps"]) and r["ref_logps"] < 0 for r in scored)
    assert all(0 < r["prompt_len"] < len(r["input_ids"]) for r in scored)


def test_online_command_line(tmp_path, capsys):
    assert cli.main(["online", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "num_workers: 1" in printed and "rollout_cpus: 1" in printed  # configs/online.yaml
    assert cli.main(["online", f"--output_dir={tmp_path}", "--online.samples_per_prompt=0", "--dry-run"]) == 2
    assert "online.samples_per_prompt" in capsys.readouterr().err
    assert "online" in cli.COMMANDS
    assert cli.main(["online", f"--output_dir={tmp_path}", "--dry-run"]) == 0  # the embedded demo checks out


def test_the_demos_training_prompts_never_ask_a_held_out_number():
    """configs/online.yaml trains on `double_prompts` and evaluates on builtin:arithmetic/eval-double: no number
    of the held-out prompts is ever asked in training, each round asks distinct numbers, the same (seed, round)
    asks the same prompts, and every prompt is one the verifier knows as `double`."""
    from bco_ray.assets.arithmetic.gen import solve
    from bco_ray.builtin import BUILTIN_EVAL_DOUBLE
    from bco_ray.eval.arithmetic import double_prompts
    from bco_ray.online.prompts import read_prompts

    held_out = {solve(p)[1] // 2 for p in read_prompts(BUILTIN_EVAL_DOUBLE)}
    assert len(read_prompts(BUILTIN_EVAL_DOUBLE)) == 67 and all(
        solve(p)[0] == "double" for p in read_prompts(BUILTIN_EVAL_DOUBLE)
    )
    asked = [double_prompts(r, 128, 42) for r in range(3)]
    numbers = [[solve(p)[1] // 2 for p in prompts] for prompts in asked]
    assert all(solve(p)[0] == "double" for prompts in asked for p in prompts)
    assert all(len(set(ns)) == 128 and not set(ns) & held_out for ns in numbers)
    assert double_prompts(1, 128, 42) == asked[1] and asked[0] != asked[1] != double_prompts(1, 128, 43)
    with pytest.raises(ValueError, match="at most 434"):
        double_prompts(0, 435, 42)


def test_a_round_checkpointed_but_not_marked_is_marked_not_trained_again(tmp_path):
    from bco_ray.errors import StorageError
    from bco_ray.online.store import RoundStore

    store = RoundStore(str(tmp_path / "rounds"))
    row = {"prompt": "What is 2 + 3?\nAnswer:", "completion": " 5", "label": True, "round": 0, "policy_step": 0}
    for r in range(2):
        store.write_rows(r, [{**row, "round": r}])
    store.mark_updated(0, {"round": 0})
    assert store.next_round() == (1, True)  # round 1: rows committed, its update not marked
    assert store.reconcile(2) == 2  # the checkpoint holds round 1: it was trained before the job stopped
    assert store.next_round() == (2, False) and store.updated_info(1)["from_checkpoint"]
    with pytest.raises(StorageError, match="checkpoint holds 1"):
        store.reconcile(1)


def test_udm_weighs_a_rounds_undesirable_rows_by_a_classifier_fitted_on_its_own_prompts(tmp_path):
    """udm.enabled: the classifier is fitted on the scored rows' prompts (desirable vs undesirable) with the pass's
    embedder; undesirable rows of prompts that are mostly answered well weigh more, within the clamp; too few
    rows of a label: every row weighs 1. online.undesirable_weight scales the undesirable rows' weights."""
    from bco_ray.job.checks import resolve_paths

    cfg = config(tmp_path, "--udm.enabled=true", "--udm.max_density_ratio=4", "--online.undesirable_weight=1")
    cfg = resolve_locations(cfg)
    rollout = Rollout(cfg, resolve_paths(cfg)[0], threads=1)
    easy, hard = "What is 2 + 3?\nAnswer:", "What is 123 * 47?\nAnswer:"
    rows = [{"prompt": easy, "completion": " 5", "label": True}] * 6 + [
        {"prompt": easy, "completion": " 6", "label": False},
        *[{"prompt": hard, "completion": " 11", "label": False}] * 5,
        {"prompt": hard, "completion": " 5781", "label": True},
    ]
    w = [r["udm_weight"] for r in rollout.score(rows)]
    report = rollout.udm_report()
    assert report["udm/fitted"] == 1.0 and 0 <= report["udm/accuracy"] <= 1
    assert all(x == 1.0 for x in w[:6]) and w[12] == 1.0  # desirable rows weigh 1
    assert w[6] > w[7] and all(0.5 <= x <= 4.0 for x in w)  # the easy prompt's failure weighs more
    assert report["udm/mean_rejected_weight"] == pytest.approx(sum(w[6:12]) / 6, rel=1e-5)
    rollout.cfg.online.undesirable_weight = 0.5  # scales the undesirable rows' UDM weights, not the desirable's
    assert [r["udm_weight"] for r in rollout.score(rows)] == pytest.approx([1.0] * 6 + [x / 2 for x in w[6:12]] + [1.0])
    rollout.cfg.online.undesirable_weight = 0.0
    assert [r["udm_weight"] for r in rollout.score(rows[:7])] == [1.0] * 6 + [0.0]  # 1 undesirable row: no fit
    assert rollout.udm_report()["udm/fitted"] == 0.0


def test_a_stop_signal_waits_for_a_deferred_block():
    """A round's metrics and its `logged` marker land together: SIGTERM inside `signals.deferred()` stops the job
    at the block's end (the job's handler: `Interrupted`, exit status 143), not inside it."""
    import os
    import signal

    from bco_ray.job import signals

    done = []
    with signals.stop_signals(), pytest.raises(signals.Interrupted) as stop:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("metrics")
            done.append("marker")
        done.append("after")
    assert done == ["metrics", "marker"] and stop.value.exit_code == 143
