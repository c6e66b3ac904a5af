"""The `online` section: online BCO, where each round's prompts are answered by the current policy, the answers
labelled by a program (`online.labeler`, the `eval.verifier` contract) and the policy updated with BCO on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bco_ray.builtin import BUILTIN_TRAIN
from bco_ray.config.fields import ranged

BUILTIN_LABELER = "bco_ray.eval.arithmetic:verify"


@dataclass
class OnlineConfig:
    prompts: str = BUILTIN_TRAIN  # a data spec as data.train takes (its distinct prompts, shuffled, cycled) or
    # "module:function" called as function(round, n, seed) -> list of n prompts
    prompts_per_round: int = ranged(64, ">= 1")  # prompts each round
    samples_per_prompt: int = ranged(4, ">= 1")  # completions the policy samples per prompt each round
    rounds: int = ranged(10, ">= 1")  # rounds of generate → label → update
    temperature: float = ranged(1.0, "> 0")  # sampling temperature of the round's completions
    top_p: float = ranged(1.0, "(0, 1]")  # nucleus sampling: the probability mass kept
    max_new_tokens: int = ranged(32, ">= 1")  # tokens generated per completion
    labeler: str = BUILTIN_LABELER  # "module:function": label(prompt, completion) -> bool | float | dict with
    # "score" or "correct" (the eval.verifier contract)
    threshold: float = ranged(0.5, "finite")  # a number the labeler returns is desirable iff it is >= this
    on_label_error: Literal["error", "skip"] = "error"  # error: a labeler that raises stops the job; skip: the
    # sample is dropped and counted (online/label_errors)
    undesirable_weight: float = ranged(1.0, ">= 0")  # scales the undesirable rows' loss (times their UDM weight),
    # as KTOConfig's undesirable_weight; 0 trains on the desirable rows only (δ still averages every row's reward)
    replay_rounds: int = ranged(0, ">= 0")  # each update also trains on the rows of this many previous rounds
    eval_every: int = ranged(1, ">= 0")  # generation eval every this many rounds; 0: never
    rollout_cpus: float = ranged(1.0, "> 0")  # CPUs the rollout actor (generation and reference scoring)
    # reserves, beside the train.num_workers × train.cpus_per_worker of the training workers
