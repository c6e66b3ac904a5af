"""What a Ray Train worker runs: the BCO recipe (bco_ray/train/recipe.py), top to bottom —
setup (policy, DeepSpeed engine) → resume from the latest checkpoint → train (epochs of micro-batches: BCO
forward, backward, step; log / evaluate / checkpoint) → save the final model; a run that diverges saves its last
good checkpoint's model instead (bco_ray/train/divergence.py)."""

from __future__ import annotations

from bco_ray.train.divergence import Diverged
from bco_ray.train.recipe import BCORecipe


def train_loop_per_worker(config: dict) -> None:
    recipe = BCORecipe(config)
    recipe.setup()
    if not recipe.resume():  # this run name had finished already: its final model was reported again
        return
    try:
        recipe.train()
    except Diverged as e:  # not a worker failure: restarting from the checkpoint would diverge again
        recipe.save_diverged(e)
        return
    recipe.save_final()
