"""A run that diverges: a non-finite loss, gradient norm or weight stops training at the optimizer step that shows
it, and the run ends with the model of its last good checkpoint (bco_ray/train/recipe.py: save_diverged).

Nothing here reads the device per micro-batch: the loss and gradient norm are checked where the logging step
reads them anyway, and the loss sums and weights once before each evaluation, checkpoint and final save (one
small host read next to work that reads the device itself), so no NaN reaches an evaluation or a checkpoint."""

from __future__ import annotations

import math

import ray.train
import torch
import torch.distributed as dist


class Diverged(Exception):
    """Training diverged at optimizer step `step`; `what` says which values were not finite."""

    def __init__(self, step: int, what: str):
        super().__init__(f"training diverged at step {step}: {what}")
        self.step, self.what = step, what


def check_values(step: int, **values: float) -> None:
    """Raise Diverged if one of these host values (the logging step's loss, grad norm) is not finite."""
    bad = [f"{k} = {v}" for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise Diverged(step, ", ".join(bad))


@torch.no_grad()
def check_device(step: int, window_sums: torch.Tensor, module: torch.nn.Module) -> None:
    """Raise Diverged (on every rank alike) unless the logging window's sums (losses, rewards, log-probs) and the
    trainable weights are finite on every rank. ZeRO-3 weights are checked in the partitions each rank holds.
    One all-reduce and one host read."""
    dev = window_sums.device
    flags = [torch.isfinite(window_sums).all()]
    weights = [torch.isfinite(getattr(p, "ds_tensor", p)).all().to(dev) for p in module.parameters() if p.requires_grad]
    ok = torch.stack(flags + weights).all().float().reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not bool(ok[0]):
        raise Diverged(step, "a non-finite loss, reward or weight")


def last_good_checkpoint() -> ray.train.Checkpoint | None:
    """The newest checkpoint of this run (every one was checked before it was written), or the one this
    worker group resumed from; None when there is none."""
    reported = ray.train.get_all_reported_checkpoints()
    if reported:
        return max(reported, key=lambda r: (r.metrics or {}).get("step", -1)).checkpoint
    return ray.train.get_checkpoint()
