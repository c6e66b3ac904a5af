"""What a Ray Train worker runs: the test/diagnostic hooks from the environment (bco_ray/train/hooks.py), then the
offline BCO recipe (bco_ray/train/recipe.py), top to bottom — setup (the policy updater) → resume from the latest
checkpoint → train (epochs of optimizer steps; log / evaluate / checkpoint) → save the final model; a run that
diverges saves its last good checkpoint's model instead (bco_ray/train/divergence.py)."""

from __future__ import annotations

from bco_ray.train import hooks
from bco_ray.train.divergence import Diverged
from bco_ray.train.recipe import BCORecipe


def train_loop_per_worker(config: dict) -> None:
    """`config`: {"spec": the WorkerSpec the driver built (bco_ray/job/train_stage.py)}."""
    hooks.install_from_env()
    recipe = BCORecipe(config["spec"])
    recipe.setup()
    if not recipe.resume():  # this run name had finished already: its final model was reported again
        return
    try:
        recipe.train()
    except Diverged as e:  # not a worker failure: restarting from the checkpoint would diverge again
        recipe.save_diverged(e)
        return
    recipe.save_final()
