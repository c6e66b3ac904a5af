"""The online Python API (bco_ray/api/online_config.py, online_trainer.py; reward functions:
bco_ray/online/rewards.py). Fast, no Ray: OnlineBCOConfig's mapping of trl 1.13's GRPOConfig fields onto online.*,
the reward functions as a labeler (bco-ray's per-sample contract and TRL's batch one, several summed, errors
before Ray), the prompts dataset. One run (marked e2e): OnlineBCOTrainer.train() in this process on the session's
Ray head, the tiny SFT'd policy, 1 round of 8 prompts × 2 samples, labelled by a TRL-style batch function."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch

from bco_ray import BCOConfig, BCOConfigWarning, OnlineBCOConfig
from bco_ray.builtin import ASSETS, SFT_DIR
from bco_ray.config.schema import ConfigError
from bco_ray.eval.arithmetic import verify
from bco_ray.online.labeler import Labeler, LabelerError
from bco_ray.online.prompts import PromptsError, read_prompts
from bco_ray.online.rewards import IN_PROCESS, RewardFunctionError, RewardLabel
from bco_ray.online.store import RoundStore

from harness import sqlite_store

ROWS = [json.loads(line) for line in (ASSETS / "arithmetic" / "train.jsonl").read_text().splitlines()[:8]]
PROMPT, RIGHT = ROWS[0]["prompt"], ROWS[0]["completion"]


def accuracy(prompts, completions, **kwargs):  # TRL's reward-function contract
    return [verify(p, c)["score"] for p, c in zip(prompts, completions, strict=True)]


def brevity(prompts, completions, **kwargs):
    return [1.0 if len(c) < 6 else 0.0 for c in completions]


# ------------------------------------------------------------------------------------------ config mapping
def test_grpo_fields_map_onto_the_online_section():
    args = OnlineBCOConfig(
        output_dir="out", per_device_train_batch_size=8, gradient_accumulation_steps=2, num_generations=4,
        temperature=0.7, top_p=0.9, max_completion_length=24, learning_rate=1e-4, max_steps=6, threshold=0.25,
        replay_rounds=1, beta=0.2, undesirable_weight=0.5,
    )  # fmt: skip
    cfg = args.to_config()
    o = cfg.online
    # trl: generation batch = 8 × 1 worker × steps_per_generation (= accumulation 2) = 16 completions = 4 prompts × 4
    assert (o.samples_per_prompt, o.prompts_per_round, o.temperature, o.top_p) == (4, 4, 0.7, 0.9)
    assert (o.max_new_tokens, o.threshold, o.replay_rounds, o.labeler) == (24, 0.25, 1, IN_PROCESS)
    assert o.rounds == 6 and o.undesirable_weight == 0.5  # one optimizer step a round: max_steps rounds
    assert (cfg.train.lr, cfg.train.beta, cfg.train.max_steps, cfg.udm.enabled) == (1e-4, 0.2, -1, False)
    assert (cfg.mlflow.experiment, cfg.eval.generate, cfg.data.eval) == ("bco-ray-online", False, None)


def test_rounds_and_prompts_from_generation_batch_epochs_or_extras():
    a = OnlineBCOConfig(per_device_train_batch_size=4, generation_batch_size=32, num_generations=4, max_steps=3)
    assert a.prompts_a_round() == 8 and a.rounds_for(None) == 1  # 3 steps × 4 rows ≤ one round of 32 rows
    a = OnlineBCOConfig(per_device_train_batch_size=4, num_generations=2, num_train_epochs=1.5)
    assert a.prompts_a_round() == 2 and a.rounds_for(10) == 8 and a.rounds_for(None) is None
    a = OnlineBCOConfig(prompts_per_round=5, rounds=2, num_generations=3, max_steps=100)
    assert a.to_config(1000).online.rounds == 2 and a.to_config().online.prompts_per_round == 5
    with pytest.raises(ValueError, match="divisible by num_generations"):
        OnlineBCOConfig(per_device_train_batch_size=6, num_generations=4).prompts_a_round()
    with pytest.raises(ValueError, match="not both"):
        OnlineBCOConfig(generation_batch_size=16, steps_per_generation=2).prompts_a_round()


def test_grpo_only_settings_warn_and_bad_values_name_the_field():
    with pytest.warns(BCOConfigWarning, match=r"OnlineBCOConfig.top_k=5 .*temperature and top_p"):
        assert OnlineBCOConfig(top_k=5).ignored_fields == {"top_k": 5}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the online fields are mapped, not ignored
        OnlineBCOConfig(num_generations=2, max_completion_length=16, reward_weights=[1.0], num_train_epochs=0.5)
    with pytest.raises(TypeError, match="OnlineBCOConfig got unknown field.*'num_generation'.*num_generations"):
        OnlineBCOConfig(num_generation=2)
    with pytest.raises(ConfigError, match="online.top_p.*OnlineBCOConfig field: top_p"):
        OnlineBCOConfig(top_p=1.5).to_config()
    assert isinstance(OnlineBCOConfig(), BCOConfig)  # every BCOConfig field, mapped the same way


# ------------------------------------------------------------------------------------------ reward functions
def test_per_sample_and_batch_functions_label_as_the_labeler_contract():
    per_sample = Labeler.checked(RewardLabel([verify]), "verify", PROMPT)
    batch = Labeler.checked(RewardLabel([accuracy]), "accuracy", PROMPT)
    for completion in (RIGHT, " 7", ""):
        want = verify(PROMPT, completion)["score"] >= 0.5
        assert per_sample.label(PROMPT, completion) is want and batch.label(PROMPT, completion) is want
    boolean = Labeler.checked(RewardLabel([lambda p, c: c == RIGHT]), "eq", PROMPT, threshold=5.0)
    assert boolean.label(PROMPT, RIGHT) is True  # one function's bool is the label, whatever the threshold
    batch_bools = Labeler.checked(
        RewardLabel([lambda prompts, completions: [c == RIGHT for c in completions]]), "eq", PROMPT, threshold=0.0
    )  # a batch function's bools are labels too, not 1.0 / 0.0 against the threshold
    samples = [(PROMPT, RIGHT), (PROMPT, " 7")]
    assert batch_bools.label_batch(samples) == [batch_bools.label(p, c) for p, c in samples] == [True, False]


def test_several_functions_weighted_sum_thresholded():
    summed = RewardLabel([accuracy, brevity, verify], weights=[1.0, 0.5, 1.0])
    assert summed(PROMPT, RIGHT) == pytest.approx(2.5) and summed(PROMPT, " the answer is 7") == 0.0
    lab = Labeler.checked(summed, summed.__name__, PROMPT, threshold=2.0)
    assert lab.label(PROMPT, RIGHT) is True and lab.label(PROMPT, " 7") is False  # 0 + 0.5 + 0
    none_too = RewardLabel([accuracy, lambda prompts, completions, **kw: [None]])
    assert none_too(PROMPT, RIGHT) == 1.0  # None: no reward from that function (trl's nansum)


def test_batch_functions_get_the_prompts_other_columns():
    seen = {}

    def reward(prompts, completions, solution, **kwargs):
        seen.update(solution=solution, kwargs=kwargs)
        return [float(completions[0].strip() == solution[0])]

    lab = RewardLabel([reward], columns={PROMPT: {"solution": "19", "level": 2}})
    assert lab(PROMPT, " 19") == 1.0 and seen == {"solution": ["19"], "kwargs": {"level": [2]}}


def test_a_rounds_samples_reach_a_batch_function_in_one_call():
    """`label_batch` (what a round calls): a TRL batch function once for all the samples, with each prompt's
    columns; the labels equal the per-sample ones. A batch call that raises is redone sample by sample, so the
    error names the sample (or, with skip, only that sample is skipped)."""
    calls = []

    def judge(prompts, completions, solution, **kwargs):
        calls.append(len(completions))
        if any("boom" in c for c in completions):
            raise RuntimeError("cannot judge")
        return [float(c.strip() == s) for c, s in zip(completions, solution, strict=True)]

    other = ROWS[1]["prompt"]
    columns = {PROMPT: {"solution": RIGHT.strip()}, other: {"solution": "-1"}}
    samples = [(PROMPT, RIGHT), (PROMPT, " 7"), (other, " -1"), (other, RIGHT)]
    lab = Labeler.checked(RewardLabel([judge, brevity], columns=columns), "judge", PROMPT, threshold=1.5)
    calls.clear()
    assert lab.label_batch(samples) == [lab.label(p, c) for p, c in samples] and calls[0] == 4
    assert calls == [4, 1, 1, 1, 1] and lab.label_batch(samples)[:3] == [True, False, True]
    skip = Labeler.checked(RewardLabel([judge], columns=columns), "judge", PROMPT, on_error="skip")
    assert skip.label_batch([*samples[:2], (PROMPT, " boom")]) == [True, False, None] and skip.errors == 1
    with pytest.raises(LabelerError, match="the completion ' boom'.*cannot judge"):
        lab.label_batch([*samples, (PROMPT, " boom")])


@pytest.mark.parametrize(
    "funcs, weights, match",
    [
        ([], None, "reward_funcs is empty"),
        (["org/reward-model"], None, r"reward_funcs\[0\] is str.*not supported"),
        ([accuracy, brevity], [1.0], "2 reward functions"),
        (
            [verify, lambda prompt: True],
            None,
            r"reward_funcs\[1\] <lambda> cannot be called as f\(prompt, completion\)",
        ),
    ],
)
def test_bad_reward_function_setups_fail_at_once(funcs, weights, match):
    with pytest.raises(RewardFunctionError, match=match):
        RewardLabel(funcs, weights)


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda prompts, completions, **kw: [1.0, 0.0], r"reward_funcs\[0\] <lambda> returned 2 values"),
        (lambda prompts, completions, **kw: ["yes"], "not a number"),
        (lambda prompts, completions, **kw: [None], "returned None"),
        (lambda prompts, completions: 1 / 0, "ZeroDivisionError"),
    ],
)
def test_bad_reward_functions_fail_on_the_probe_with_one_clear_error(fn, match):
    with pytest.raises(LabelerError, match=match):
        Labeler.checked(RewardLabel([fn]), "fn", PROMPT, field="labeler")


def test_online_labeler_spec_takes_a_trl_batch_function():
    lab = Labeler.load(f"{__name__}:accuracy", PROMPT)
    assert lab.label(PROMPT, RIGHT) is True and lab.label(PROMPT, " 7") is False
    with pytest.raises(LabelerError, match="given in-process"):
        Labeler.load(IN_PROCESS, PROMPT)


# ------------------------------------------------------------------------------------------ the prompts
def test_prompt_only_datasets_are_online_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": r["prompt"], "solution": "x"}) + "\n" for r in ROWS * 2))
    assert read_prompts(str(f)) == [r["prompt"] for r in ROWS]
    f.write_text(json.dumps({"prompt": ""}) + "\n")
    with pytest.raises(PromptsError, match="row 0: the prompt must be a non-empty text"):
        read_prompts(str(f))


def test_trainer_checks_its_arguments_before_saving(tmp_path):
    from bco_ray import OnlineBCOTrainer

    args = OnlineBCOConfig(output_dir=str(tmp_path))
    prompts = [{"prompt": r["prompt"]} for r in ROWS]
    bad = {
        "reward_funcs": ({"reward_funcs": None}, ValueError, "needs reward_funcs"),
        "args": ({"args": BCOConfig()}, TypeError, "OnlineBCOConfig"),
        "eval": ({"eval_dataset": prompts}, ValueError, "eval_dataset"),
        "column": ({"train_dataset": [{"question": "q"}]}, ValueError, "no 'prompt' column"),
        "chat": ({"train_dataset": [{"prompt": [{"role": "user", "content": "hi"}]}]}, ValueError, "conversation"),
        "reward": ({"reward_funcs": [accuracy, "org/rm"]}, RewardFunctionError, r"reward_funcs\[1\] is str"),
    }
    for kw, error, match in bad.values():
        call = {"model": str(SFT_DIR), "reward_funcs": accuracy, "args": args, "train_dataset": prompts, **kw}
        with pytest.raises(error, match=match):
            OnlineBCOTrainer(**call)
    assert not (tmp_path / "inputs").exists()


# ------------------------------------------------------------------------------------------ the run (e2e)
@pytest.fixture(scope="module")
def online_run(ray_client, tmp_path_factory):
    """The issue's snippet: 1 round of 8 prompts × 2 samples, one optimizer step of 16 rows, no held-out eval."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bco_ray import OnlineBCOTrainer

    tmp = tmp_path_factory.mktemp("online-api")
    model, tok = AutoModelForCausalLM.from_pretrained(SFT_DIR), AutoTokenizer.from_pretrained(SFT_DIR)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    args = OnlineBCOConfig(
        output_dir=str(tmp / "out"), per_device_train_batch_size=16, num_generations=2, max_completion_length=8,
        max_steps=1, learning_rate=1e-3, logging_steps=1, bf16=False, use_cpu=True, run_name="online-api",
        mlflow_tracking_uri=sqlite_store(tmp / "mlflow.db"),
    )  # fmt: skip
    trainer = OnlineBCOTrainer(
        model, reward_funcs=[accuracy], args=args, train_dataset=[{"prompt": r["prompt"]} for r in ROWS],
        processing_class=tok,
    )  # fmt: skip
    result = trainer.train()
    return SimpleNamespace(trainer=trainer, result=result, model=model, initial=initial, tmp=tmp)


@pytest.mark.e2e
def test_online_trainer_trains_the_users_model(online_run):
    r, trainer = online_run.result, online_run.trainer
    online = r.raw
    assert r.global_step == 1 and online.final["rounds"] == 1 and len(online.rounds) == 1
    assert online.final["delta_count"] == pytest.approx(16)  # 8 prompts × 2 samples, labelled here
    rows = RoundStore(f"{online_run.tmp}/out/ray/online-api/online/rounds").read_rows(0)
    assert len(rows) == 16 and all(
        row["label"] == (accuracy([row["prompt"]], [row["completion"]])[0] >= 0.5) for row in rows
    )
    assert online.rounds[0]["online/pass_rate"] == sum(row["label"] for row in rows) / 16
    changed = [k for k, v in online_run.model.state_dict().items() if not torch.equal(v, online_run.initial[k])]
    assert changed and trainer.model is online_run.model  # the object passed holds the trained weights
    logs = trainer.state.log_history
    assert [h["step"] for h in logs if "loss" in h] == [1] and any("online/pass_rate" in h for h in logs)
    saved = trainer.save_model(str(online_run.tmp / "saved"))
    assert (online_run.tmp / "saved" / "model.safetensors").is_file() and saved.endswith("saved")
