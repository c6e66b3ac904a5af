"""The verifier of the bundled arithmetic feedback set (`bco_ray/assets/arithmetic`): is the number a completion
states the prompt's true result? Use it as `eval.verifier: bco_ray.eval.arithmetic:verify`.

It scores as the data's labels do (a row is desirable iff its number is right, hedged or not) and also reports
whether the answer is well formed (exactly one number) and hedged ("Maybe 12?", "I think it is 12, not sure.",
"Probably 12."), the completion-level habit the data's thumbs-down rows carry most."""

from __future__ import annotations

import re

from bco_ray.assets.arithmetic.gen import HEDGED_STYLES, solve

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
