"""The verifier of the bundled arithmetic feedback set (`bco_ray/assets/arithmetic`): is the number a completion
states the prompt's true result? Use it as `eval.verifier: bco_ray.eval.arithmetic:verify`.

It scores as the data's labels do (a row is desirable iff its number is right, hedged or not) and also reports
whether the answer is well formed (exactly one number) and hedged ("Maybe 12?", "I think it is 12, not sure.",
"Probably 12."), the completion-level habit the data's thumbs-down rows carry most."""

from __future__ import annotations

import functools
import json
import random
import re

from bco_ray.assets.arithmetic.gen import FAMILIES, HEDGED_STYLES, SUFFIX, solve

_NUMBER = re.compile(r"-?\d+")
# The words that open or close a hedged style: "Maybe", "I think it is", "not sure", "Probably".
_HEDGES = re.compile(
    "|".join(
        re.escape(part.strip(" .?,")) for style in HEDGED_STYLES for part in style.split("{n}") if part.strip(" .?,")
    ),
    re.IGNORECASE,
)


def verify(prompt: str, completion: str) -> dict[str, float]:
    """{"score": 1.0 if the completion states exactly one number and it is the true result else 0.0,
    "well_formed": 1.0 if it states exactly one number, "hedged": 1.0 if it hedges}. A prompt that is not one of
    the dataset's templates raises ValueError (this verifier knows only the bundled data)."""
    _, truth = solve(prompt)
    numbers = _NUMBER.findall(completion)
    well_formed = len(numbers) == 1
    return {
        "score": float(well_formed and int(numbers[0]) == truth),
        "well_formed": float(well_formed),
        "hedged": float(bool(_HEDGES.search(completion))),
    }


def double_prompts(round: int, n: int, seed: int) -> list[str]:
    """An `online.prompts` function: round `round`'s `n` generated `double` prompts ("What is twice 170?"), in the
    bundled set's phrasings, each of a different number, none of them a number of the held-out set
    (`builtin:arithmetic/eval-double`, the bundled eval set's `double` rows): a gain on the held-out set is the
    rule learned, not answers remembered. Deterministic in (seed, round)."""
    numbers = _training_doubles()
    if n > len(numbers):
        raise ValueError(f"double_prompts gives at most {len(numbers)} prompts a round, {n} were asked for")
    rng = random.Random(f"double-{seed}-{round}")
    phrasings = FAMILIES["double"][3]
    return [rng.choice(phrasings).format(a=a) + SUFFIX for a in rng.sample(numbers, n)]


@functools.cache
def _training_doubles() -> list[int]:
    """The `double` family's numbers (gen.py: 2..499) less the held-out set's."""
    return [a for a in range(2, 500) if a not in _held_out_doubles()]


@functools.cache
def _held_out_doubles() -> frozenset[int]:
    from bco_ray.builtin import BUILTIN_EVAL_DOUBLE, resolve_data

    with open(resolve_data(BUILTIN_EVAL_DOUBLE), encoding="utf-8") as f:
        return frozenset(solve(json.loads(line)["prompt"])[1] // 2 for line in f if line.strip())
