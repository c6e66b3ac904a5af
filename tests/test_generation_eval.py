"""The generation eval's parts (no Ray): the arithmetic verifier against the data's labels, batched generation
against one-prompt generation, completion log-probs against the training function, the per-step metrics on
hand-computed rows, snapshots, config checks, and the shipped SFT reference (its config, hash, determinism)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from bco_ray.bco.logprobs import policy_completion_logps
from bco_ray.builtin import ASSETS, BUILTIN_SFT_MODEL, SFT_DIR, resolve_model, tokenizer_path
from bco_ray.config.schema import ConfigError, load_config
from bco_ray.eval import report
from bco_ray.eval.arithmetic import verify
from bco_ray.eval.generation import VerifierError, completion_logps, generate, load_verifier, verifier_scores
from bco_ray.eval.pipeline import held_out_prompts
from bco_ray.train.snapshots import list_snapshots, save_snapshot


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config.from_pretrained(ASSETS / "tiny-qwen2")).eval()


def test_arithmetic_verifier_agrees_with_every_label():
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (ASSETS / "arithmetic" / f"{split}.jsonl").read_text().splitlines()]
        assert all(verify(r["prompt"], r["completion"])["score"] == float(r["label"]) for r in rows)
    p = "Compute 12 + 16.\nAnswer:"
    assert verify(p, " 28") == {"score": 1.0, "well_formed": 1.0, "hedged": 0.0}
    assert verify(p, " Maybe 28?") == {"score": 1.0, "well_formed": 1.0, "hedged": 1.0}
    assert verify(p, " I think it is 27, not sure.") == {"score": 0.0, "well_formed": 1.0, "hedged": 1.0}
    assert verify(p, " 2 8") == {"score": 0.0, "well_formed": 0.0, "hedged": 0.0}


def test_verifier_loading_and_results():
    assert load_verifier("bco_ray.eval.arithmetic:verify") is verify
    for bad, says in (
        ("nocolon", "package.module:function"),
        ("no_such_mod_xyz:f", "cannot import"),
        ("bco_ray.eval.arithmetic:nope", "no function"),
    ):
        with pytest.raises(VerifierError, match=says):
            load_verifier(bad)
    assert verifier_scores(lambda p, c: True, "p", "c") == {"score": 1.0}
    assert verifier_scores(lambda p, c: 0.25, "p", "c") == {"score": 0.25}
    assert verifier_scores(None, "p", "c") == {}
    with pytest.raises(VerifierError, match="bool, a number, or a dict"):
        verifier_scores(lambda p, c: "yes", "p", "c")


def test_eval_config_checks():
    cfg = load_config(overrides=["--eval.generate=true", "--eval.verifier=bco_ray.eval.arithmetic:verify"])
    assert cfg.eval.generate and cfg.eval.at_start and cfg.eval.num_prompts == 32
    for bad, says in (
        ("--eval.verifier=verify", "eval.verifier"),
        ("--eval.max_new_tokens=0", "eval.max_new_tokens"),
        ("--eval.top_p=0", "eval.top_p"),
        ("--eval.temperature=-1", "eval.temperature"),
    ):
        with pytest.raises(ConfigError, match=says):
            load_config(overrides=[bad])


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny):
    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    prompts = [
        [0] + tok(t, add_special_tokens=False)["input_ids"]
        for t in ("What is 3 + 4?\nAnswer:", "Which is larger, 120 or 7?\nAnswer:", "Double 9.\nAnswer:")
    ]
    kw = dict(max_new_tokens=6, eos_id=1, pad_id=2)
    batched = generate(tiny, prompts, batch_size=3, **kw)
    assert batched == [generate(tiny, [p], batch_size=1, **kw)[0] for p in prompts]
    assert all(0 < len(c) <= 6 for c in batched)
    sampled = generate(tiny, prompts, sample=True, seed=3, **kw)
    assert sampled == generate(tiny, prompts, sample=True, seed=3, **kw)  # seeded: repeatable


def test_completion_logps_is_the_training_quantity(tiny):
    prompts, completions = [[0, 5, 6, 7], [0, 9]], [[11, 12, 1], [13]]
    got = completion_logps(tiny, prompts, completions, pad_id=2)
    ids = torch.tensor([[0, 5, 6, 7, 11, 12, 1], [0, 9, 13, 2, 2, 2, 2]])
    mask = (torch.arange(7) < torch.tensor([[7], [3]])).long()
    want = policy_completion_logps(tiny, ids, mask, torch.tensor([4, 2]))
    assert got == pytest.approx(want.tolist(), abs=1e-5)
    assert completion_logps(tiny, [[0, 5]], [[]], pad_id=2) == [0.0]


def _row(step, i, score, score_ref, reward, reward_ref, length, kind="greedy"):
    return {
        "step": step,
        "kind": kind,
        "prompt_index": i,
        "prompt": f"p{i}",
        "completion": f"c{step}{i}",
        "completion_ref": f"r{i}",
        "length": length,
        "length_ref": 3,
        "finished": 1.0,
        "reward": reward,
        "reward_ref": reward_ref,
        "verifier/score": score,
        "verifier_ref/score": score_ref,
        "verifier/hedged": 1.0 - score,
        "verifier_ref/hedged": 1.0,
    }


def test_step_metrics_and_tables_by_hand():
    rows = [
        _row(0, 0, 0.0, 0.0, 0.0, 0.0, 3),
        _row(0, 1, 1.0, 1.0, 0.0, 0.0, 3),
        _row(20, 0, 1.0, 0.0, 0.5, -0.25, 2),
        _row(20, 1, 1.0, 1.0, 0.25, 0.0, 4),
        _row(20, 0, 0.0, 0.0, 0.0, 0.0, 9, kind="sampled"),
    ]
    m = report.step_metrics(rows)
    assert m[0]["eval/gen/score"] == 0.5 and m[0]["eval/gen/score_ref"] == 0.5 and m[0]["eval/gen/reward"] == 0.0
    assert m[20]["eval/gen/score"] == 1.0 and m[20]["eval/gen/score_ref"] == 0.5
    assert m[20]["eval/gen/reward"] == 0.375 and m[20]["eval/gen/reward_ref"] == -0.125
    assert m[20]["eval/gen/hedged"] == 0.0 and m[20]["eval/gen/hedged_ref"] == 1.0 and m[20]["eval/gen/length"] == 3
    assert m[20]["eval/gen/sampled/length"] == 9 and m[20]["eval/gen/sampled/score"] == 0.0
    table = report.final_table(rows)
    assert table["step"] == [20, 20] and table["prompt"] == ["p0", "p1"] and table["policy"] == ["c200", "c201"]
    assert table["reference"] == ["r0", "r1"] and table["score"] == [1.0, 1.0] and table["score_ref"] == [0.0, 1.0]
    assert len(report.steps_table(rows)["completion"]) == 5
    assert "score 1 (reference 0.5)" in report.summary_line(m)


def test_held_out_prompts_are_distinct_and_tokenized_as_in_training():
    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    prompts = held_out_prompts("builtin:arithmetic/eval", tok, 5, max_prompt_length=48)
    first = json.loads((ASSETS / "arithmetic" / "eval.jsonl").read_text().splitlines()[0])["prompt"]
    assert len(prompts) == 5 and len({p["prompt"] for p in prompts}) == 5 and prompts[0]["prompt"] == first
    assert prompts[0]["prompt_ids"] == [tok.bos_token_id] + tok(first, add_special_tokens=False)["input_ids"]


def test_snapshots_are_written_whole_and_listed(tmp_path, tiny):
    from bco_ray.train.policy import save_final_model

    def export(d: str) -> None:  # what PolicyUpdater.export_weights does on one rank at ZeRO-0
        save_final_model(tiny, d, str(tokenizer_path()), rank=0, zero_stage=0)

    for step in (20, 40):
        save_snapshot(export, str(tmp_path), step, rank=0)
    save_snapshot(export, str(tmp_path), 20, rank=0)  # again
    (tmp_path / "generation" / "step_0000060").mkdir()  # an interrupted write: not listed
    snaps = list_snapshots(str(tmp_path))
    assert sorted(snaps) == [20, 40]
    assert Qwen2ForCausalLM.from_pretrained(snaps[40]).config.hidden_size == tiny.config.hidden_size


def test_sft_asset_matches_its_config_and_hash():
    from tools.build_sft import RECIPE, sha256

    path = resolve_model(BUILTIN_SFT_MODEL, "/nonexistent")
    assert path == str(SFT_DIR)
    info = json.loads((SFT_DIR / "sft.json").read_text())
    assert info["recipe"] == RECIPE and info["max_steps"] is None
    assert info["model.safetensors.sha256"] == sha256(SFT_DIR / "model.safetensors")
    shipped, base = AutoConfig.from_pretrained(SFT_DIR), AutoConfig.from_pretrained(ASSETS / "tiny-qwen2")
    for k in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "tie_word_embeddings",
    ):
        assert getattr(shipped, k) == getattr(base, k), k
    weights, fresh = load_file(str(SFT_DIR / "model.safetensors")), Qwen2ForCausalLM(base).state_dict()
    assert set(weights) <= set(fresh) and all(fresh[k].shape == v.shape for k, v in weights.items())


def test_sft_build_is_deterministic(tmp_path):
    """Two short builds give byte-identical weights (the full build is `python -m tools.build_sft --check`)."""
    from tools.build_sft import build, sha256

    a, b = build(tmp_path / "a", max_steps=3), build(tmp_path / "b", max_steps=3)
    assert sha256(a / "model.safetensors") == sha256(b / "model.safetensors")
    assert json.loads((a / "sft.json").read_text())["max_steps"] == 3


def test_sft_reference_answers_in_the_data_form():
    """The shipped reference's greedy completions of held-out prompts are answers (one number), right or wrong."""
    tok = AutoTokenizer.from_pretrained(SFT_DIR)
    model = Qwen2ForCausalLM.from_pretrained(SFT_DIR).eval()
    prompts = held_out_prompts("builtin:arithmetic/eval", tok, 24, max_prompt_length=48)
    outs = generate(model, [p["prompt_ids"] for p in prompts], max_new_tokens=16, eos_id=1, pad_id=2)
    texts = [tok.decode([t for t in o if t != 1]) for o in outs]
    scores = [verify(p["prompt"], t) for p, t in zip(prompts, texts)]
    assert sum(s["well_formed"] for s in scores) >= 0.9 * len(scores), texts
    assert all(o[-1] == 1 for o in outs) and not math.isnan(sum(s["score"] for s in scores))


def test_a_remote_snapshot_is_a_temporary_copy_and_a_remote_model_comes_from_the_node_cache(tmp_path, monkeypatch):
    """The generation actors' model loading (bco_ray/eval/pipeline.py): a snapshot on object storage is copied for
    its loading and removed after; a model (the reference, a step-0 policy) comes from the node's remote cache."""
    import fsspec

    from bco_ray.eval.pipeline import _local_model_dir

    monkeypatch.setenv("BCO_RAY_REMOTE_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    for name in ("config.json", "merged/config.json"):
        fs.pipe_file(f"/gen-test/step_1/{name}", b"{}")
    with _local_model_dir("memory://gen-test/step_1", snapshot=True) as d:
        assert d.endswith("merged") and os.path.exists(os.path.join(d, "config.json"))
    assert not os.path.exists(d)  # removed once loaded
    with _local_model_dir("memory://gen-test/step_1", snapshot=False) as d:
        assert str(tmp_path / "cache") in d
    assert os.path.exists(d)  # the node cache keeps it for the next actor
    with _local_model_dir(str(tmp_path), snapshot=True) as d:
        assert d == str(tmp_path)  # local paths as they are
