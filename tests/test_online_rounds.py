"""Online BCO's Ray-free parts (fast tier: no Ray, no DeepSpeed): the online config section, the prompt source, the
labeler (the bundled arithmetic verifier, and bad ones), and the round logic with a fake generator, scorer and
updater: the stored labels are the labeler's, the metrics, replay, and resuming without labelling or training a
round twice."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from bco_ray.assets.arithmetic.gen import solve
from bco_ray.config.schema import ConfigError, load_config
from bco_ray.data.checks import check_data, check_source
from bco_ray.errors import StorageError
from bco_ray.eval.arithmetic import verify
from bco_ray.online.checks import check_online
from bco_ray.online.labeler import Labeler, LabelerError
from bco_ray.online.prompts import PromptsError, PromptSource, is_function_spec
from bco_ray.online.rounds import RoundError, run_round, run_rounds, stored_result
from bco_ray.online.store import RoundStore

ME = __name__  # the labelers and prompt functions below are imported by name, as a user's would be
K = 4  # samples per prompt: the fake policy gets the first one right
P = "What is 5 times 14?\nAnswer:"  # a bundled arithmetic prompt


# ------------------------------------------------------------ functions named in configs ("module:function")
def one_arg(prompt):
    return True


def says_text(prompt, completion):
    return "good"


def dict_without_score(prompt, completion):
    return {"quality": 1.0}


def fails_on_empty(prompt, completion):
    return {"score": float(int(completion) == solve(prompt)[1])}


def raises_on_seven(prompt, completion):
    if "7" in completion:
        raise RuntimeError("cannot parse")
    return verify(prompt, completion)


def half_score(prompt, completion):
    return 0.5 if completion == "half" else 0.25


def prompts_fn(round, n, seed):
    return [f"What is {round} plus {i + seed}?\nAnswer:" for i in range(n)]


def prompts_wrong_type(round, n, seed):
    return "What is 1 plus 2?"


def prompts_too_few(round, n, seed):
    return ["What is 1 plus 2?\nAnswer:"]


# ------------------------------------------------------------ fakes of the heavy steps
def fake_generate(calls: list):
    def generate(prompts, k):
        calls.append(list(prompts))
        return [(p, str(solve(p)[1] + j)) for p in prompts for j in range(k)]  # j == 0: the right answer

    return generate


def fake_score(rows):
    return [{**row, "ref_logp": -float(len(row["completion"]))} for row in rows]


class FakeUpdate:
    def __init__(self, fail_at: int | None = None):
        self.seen: list[list[dict]] = []
        self.fail_at = fail_at

    def __call__(self, rows):
        if self.fail_at == len(self.seen):
            self.fail_at = None
            raise RuntimeError("worker killed during the update")
        self.seen.append(rows)
        return {"loss": 0.1 * len(rows)}


@pytest.fixture(scope="module")
def source():
    return PromptSource.from_spec("builtin:arithmetic/train", seed=7)


@pytest.fixture()
def labeler(source):
    return Labeler.load("bco_ray.eval.arithmetic:verify", source.round(0, 1)[0])


# ------------------------------------------------------------ config
@pytest.mark.parametrize(
    "override, message",
    [
        ("--online.samples_per_prompt=0", "online.samples_per_prompt must be >= 1 (got 0)"),
        ("--online.prompts_per_round=0", "online.prompts_per_round must be >= 1 (got 0)"),
        ("--online.top_p=0", "online.top_p must be in (0, 1] (got 0.0)"),
        ("--online.threshold=nan", "online.threshold must be a finite number (got nan)"),
        ("--online.on_label_error=skp", "online.on_label_error must be error or skip (got 'skp')"),
        ("--online.labeler=verify", "online.labeler 'verify' must name a function as 'package.module:function'"),
    ],
)
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert str(e.value).startswith(message), str(e.value)


def test_config_defaults_check_out():
    source, labeler = check_online(load_config())
    assert len(source.prompts) == 3000 and labeler.spec == "bco_ray.eval.arithmetic:verify"


# ------------------------------------------------------------ prompts
def test_data_prompts_are_distinct_shuffled_and_cycled_per_seed(source):
    m = len(source.prompts)
    assert len({json.dumps(p) for p in source.prompts}) == m == 3000
    n = 700  # not a divisor of 3000: round 4 straddles the first and second pass
    first_pass = [p for r in range(4) for p in source.round(r, n)] + source.round(4, n)[: m - 4 * n]
    assert sorted(first_pass) == sorted(source.prompts)  # a pass is a permutation
    second_pass_start = source.round(4, n)[m - 4 * n :]
    assert second_pass_start != first_pass[: len(second_pass_start)]  # reshuffled per pass
    again = PromptSource.from_spec("builtin:arithmetic/train", seed=7)
    assert again.round(3, 5) == source.round(3, 5)  # deterministic in (seed, round)
    assert PromptSource.from_spec("builtin:arithmetic/train", seed=8).round(0, 5) != source.round(0, 5)


def test_paired_rows_give_their_prompt_once(tmp_path):
    f = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"q{i % 3}", "chosen": "a", "rejected": "b"} for i in range(9)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sorted(PromptSource.from_spec(str(f), seed=0).prompts) == ["q0", "q1", "q2"]


def test_prompt_function():
    assert is_function_spec(f"{ME}:prompts_fn") and not is_function_spec("hf:imdb")
    src = PromptSource.from_spec(f"{ME}:prompts_fn", seed=5)
    assert src.round(2, 3) == ["What is 2 plus 5?\nAnswer:", "What is 2 plus 6?\nAnswer:", "What is 2 plus 7?\nAnswer:"]


@pytest.mark.parametrize(
    "spec, says",
    [
        ("no_such_module_xyz:prompts", "cannot import 'no_such_module_xyz'"),
        (f"{ME}:no_such_function", "has no function 'no_such_function'"),
        (f"{ME}:prompts_wrong_type", "returned str for round 0 (n=2)"),
        (f"{ME}:prompts_too_few", "returned list of 1 for round 0 (n=2)"),
        ("missing_dir/rows.jsonl", "does not exist"),
    ],
)
def test_bad_prompt_sources(spec, says):
    with pytest.raises(PromptsError) as e:
        PromptSource.from_spec(spec, seed=0).round(0, 2)
    assert str(e.value).startswith("online.prompts ") and says in str(e.value), str(e.value)


def test_an_empty_prompt_source_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PromptsError, match=r"online\.prompts .*has no valid rows"):
        PromptSource.from_spec(str(tmp_path / "empty.jsonl"), seed=0)


# ------------------------------------------------------------ labeler
@pytest.mark.parametrize(
    "spec, says",
    [
        ("no_such_module_xyz:verify", "cannot import 'no_such_module_xyz'"),
        (f"{ME}:nothing_here", "has no function 'nothing_here'"),
        (f"{ME}:one_arg", "cannot be called as one_arg(prompt, completion)"),
        (f"{ME}:says_text", "returned str 'good'"),
        (f"{ME}:dict_without_score", 'returned a dict without a "score" or "correct" entry'),
        (f"{ME}:fails_on_empty", "raised ValueError"),
    ],
)
def test_bad_labelers_fail_before_any_work(source, spec, says):
    with pytest.raises(LabelerError) as e:
        Labeler.load(spec, source.round(0, 1)[0])
    assert str(e.value).startswith(f"online.labeler {spec!r}") and says in str(e.value), str(e.value)


def test_labels_follow_the_verifier_and_threshold(labeler):
    p = "What is 5 times 14?\nAnswer:"
    assert labeler.label(p, "70") is True and labeler.label(p, "71") is False and labeler.label(p, "") is False
    low = Labeler.load(f"{ME}:half_score", p, threshold=0.5)
    assert low.label(p, "half") is True and low.label(p, "other") is False
    assert Labeler.load(f"{ME}:half_score", p, threshold=0.6).label(p, "half") is False


def test_a_labeler_raising_at_run_time_errors_or_skips():
    p = "What is 5 times 14?\nAnswer:"
    strict = Labeler.load(f"{ME}:raises_on_seven", p)
    with pytest.raises(LabelerError) as e:
        strict.label(p, "70")
    assert "'What is 5 times 14?\\nAnswer:'" in str(e.value) and "completion '70'" in str(e.value)
    assert "online.on_label_error=skip" in str(e.value)
    lenient = Labeler.load(f"{ME}:raises_on_seven", p, on_error="skip")
    assert lenient.label(p, "70") is None and lenient.label(p, "12") is False and lenient.errors == 1


# ------------------------------------------------------------ rounds
def test_a_round_stores_the_labelers_labels_and_reads_back_as_offline_data(tmp_path, source, labeler):
    store, calls, update = RoundStore(str(tmp_path / "rounds")), [], FakeUpdate()
    res = run_round(
        3,
        source.round(3, 8),
        fake_generate(calls),
        labeler.label_batch,
        fake_score,
        update,
        store,
        samples_per_prompt=K,
        policy_step=12,
    )
    table = pq.read_table(store.uri(3)).to_pylist()
    assert len(table) == 8 * K and all(row["round"] == 3 and row["policy_step"] == 12 for row in table)
    assert all(row["label"] == (verify(row["prompt"], row["completion"])["score"] >= 0.5) for row in table)
    assert res.metrics["online/pass_rate"] == pytest.approx(1 / K)
    assert (res.metrics["online/desirable"], res.metrics["online/undesirable"]) == (8, 8 * (K - 1))
    assert res.metrics["online/label_errors"] == 0 and res.trained_rows == 8 * K
    assert set(res.metrics) >= {f"time/round/{s}" for s in ("generate", "label", "score", "update")}
    assert [r["ref_logp"] for r in update.seen[0]] == [-len(r["completion"]) for r in table]
    assert store.updated_info(3)["metrics"]["online/pass_rate"] == res.metrics["online/pass_rate"]
    split = check_source(store.uri(3), "error")  # the one reader, as `--data.train=<rows>` reads it
    assert (split.rows, split.labels.desirable, split.labels.undesirable) == (8 * K, 8, 8 * (K - 1))
    cfg = load_config(overrides=[f"--data.train={tmp_path / 'rounds'}", "--data.eval=none"])
    assert check_data(cfg).train.unpaired_rows == 8 * K  # the run's directory as a train split


def test_a_round_with_one_label_still_updates_and_skips_are_counted(tmp_path, source):
    store, update = RoundStore(str(tmp_path)), FakeUpdate()
    every_wrong = lambda prompts, k: [(p, "-999") for p in prompts for _ in range(k)]  # noqa: E731
    res = run_round(
        0,
        source.round(0, 4),
        every_wrong,
        Labeler.load(f"{ME}:raises_on_seven", P).label_batch,
        fake_score,
        update,
        store,
        samples_per_prompt=2,
    )
    assert len(update.seen) == 1 and {r["label"] for r in update.seen[0]} == {False}
    assert res.metrics["online/pass_rate"] == 0.0
    skipping = Labeler.load(f"{ME}:raises_on_seven", P, on_error="skip")
    sevens = lambda prompts, k: [(p, c) for p in prompts for c in ("7", "17", "12")]  # noqa: E731
    res = run_round(1, source.round(1, 4), sevens, skipping.label_batch, fake_score, update, store)
    assert res.metrics["online/label_errors"] == 8 and len(res.rows) == 4 and store.label_errors(1) == 8
    with pytest.raises(RoundError, match="failed on all 8 samples"):
        run_round(
            2,
            source.round(2, 4),
            lambda ps, k: [(p, "7") for p in ps for _ in "ab"],
            skipping.label_batch,
            fake_score,
            update,
            store,
        )


def test_replay_adds_the_previous_rounds_rows(tmp_path, source, labeler):
    store, update = RoundStore(str(tmp_path)), FakeUpdate()
    results = run_rounds(
        4,
        lambda r: source.round(r, 3),
        fake_generate([]),
        labeler.label_batch,
        fake_score,
        update,
        store,
        samples_per_prompt=2,
        replay_rounds=2,
    )
    assert [r.trained_rows for r in results] == [6, 12, 18, 18]
    assert [r.metrics["online/replay_rows"] for r in results] == [0, 6, 12, 12]
    round3 = {(r["prompt"], r["completion"]) for r in update.seen[3]}
    expected = {(r["prompt"], r["completion"]) for q in (1, 2, 3) for r in store.read_rows(q)}
    assert round3 == expected


def test_resume_never_labels_or_trains_a_round_twice(tmp_path, source, labeler):
    store, calls, update = RoundStore(str(tmp_path)), [], FakeUpdate(fail_at=2)  # killed during round 2's update
    counted = []
    label = lambda samples: counted.extend(samples) or labeler.label_batch(samples)  # noqa: E731
    args = (lambda r: source.round(r, 3), fake_generate(calls), label, fake_score, update, store)
    with pytest.raises(RuntimeError, match="killed"):
        run_rounds(4, *args, samples_per_prompt=2)
    assert store.next_round() == (2, True) and len(calls) == 3 and len(counted) == 18
    rows_before = store.read_rows(2)
    results = run_rounds(4, *args, samples_per_prompt=2)  # the resubmitted run
    assert [r.round for r in results] == [2, 3] and results[0].resumed and not results[1].resumed
    assert len(calls) == 4 and len(counted) == 24  # round 2 was not generated or labelled again; round 3 was
    assert update.seen[2] == fake_score(rows_before) and len(update.seen) == 4  # each round trained once
    assert "time/round/generate" not in results[0].metrics and results[0].metrics["online/pass_rate"] == 0.5
    assert store.next_round() == (4, False) and run_rounds(4, *args) == []
    with pytest.raises(RoundError, match="round 1 is already trained"):
        run_round(1, [], *args[1:])
    with pytest.raises(StorageError, match="labelled once"):
        store.write_rows(3, rows_before)


def test_a_store_with_gaps_is_refused(tmp_path, source, labeler):
    store = RoundStore(str(tmp_path))
    store.write_rows(2, [{"prompt": "p", "completion": "c", "label": True, "round": 2, "policy_step": 0}])
    with pytest.raises(StorageError, match=r"round 0 is the first not trained, yet rounds \[2\]"):
        store.next_round()


def test_a_round_trained_before_a_stop_is_logged_once_after_it(tmp_path, source, labeler):
    """The job logs a round after its marker; stopped in between, the resumed job finds it unlogged and logs it
    from what the marker recorded (a round marked from the workers' checkpoint: from its rows)."""
    store, update = RoundStore(str(tmp_path)), FakeUpdate()
    args = (lambda r: source.round(r, 3), fake_generate([]), labeler.label_batch, fake_score, update, store)
    first = run_rounds(2, *args, samples_per_prompt=2)
    assert store.unlogged() == [0, 1]
    store.mark_logged(0)
    assert store.unlogged() == [1] and not store.is_evaluated(2)
    again = stored_result(store, 1)
    assert (again.round, again.rows, again.metrics) == (1, first[1].rows, first[1].metrics)
    assert again.update_metrics == {"loss": 0.1 * 6} and again.resumed
    store.mark_logged(1)
    store.mark_evaluated(2)
    assert store.unlogged() == [] and store.is_evaluated(2) and store.next_round() == (2, False)
    store.write_rows(2, store.read_rows(1))  # round 2 trained and checkpointed, the job stopped before its marker
    assert store.reconcile(3) == 3 and store.unlogged() == [2]
    from_ckpt = stored_result(store, 2)
    assert from_ckpt.update_metrics == {} and from_ckpt.metrics["online/pass_rate"] == 0.5
