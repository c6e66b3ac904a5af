"""bench/online_recipe.py, the online-BCO recipe simulation: held-out prompts share no operands with training
prompts, a run at lr 0 leaves the policy equal to its reference, and the curve has one point per round."""

from __future__ import annotations

import pytest
import torch

from bench import online_recipe as recipe


def test_training_prompts_avoid_held_out_operands():
    held_out = recipe.eval_prompts(["double", "sub"], 40)
    exclude = {recipe.operands(p) for p in held_out}
    for r in range(3):
        prompts = recipe.train_prompts(["double", "sub"], 50, seed=0, r=r, exclude=exclude)
        keys = [recipe.operands(p) for p in prompts]
        assert len(set(keys)) == 50 and not set(keys) & exclude
        assert {k[0] for k in keys} == {"double", "sub"}
    with pytest.raises(ValueError, match="fewer prompts"):
        recipe.train_prompts(["mul"], 290, seed=0, r=0, exclude=set())  # 17 x 17 = 289 operand pairs


def test_run_at_lr_zero_keeps_the_reference_score():
    args = "--families double --rounds 2 --prompts 4 --k 2 --eval-prompts 8 --eval-every 1 --lr 0"
    threads = torch.get_num_threads()
    try:
        out = recipe.run(recipe.parse_args(args.split()))
    finally:
        torch.set_num_threads(threads)
    assert [p["round"] for p in out["curve"]] == [1, 2] and out["eval_prompts"] == 8
    assert all(0 <= p["pass_rate"] <= 100 for p in out["curve"])
    assert [p["score"] for p in out["curve"]] == [out["reference"]] * 2 and out["gain"] == 0
