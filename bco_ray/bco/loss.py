"""BCO loss and its reward shift δ (a running mean of every reward seen, chosen and rejected pooled)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class RunningMean:
    """δ of the BCO paper. `count` starts at ~0 (1e-24) as in the reference, so the first update sets δ
    to the first micro-batch's mean reward. Under torch.distributed the update pools the rewards of all
    ranks (sum and count all-reduced), so δ is identical everywhere."""

    mean: float = 0.0
    count: float = 1e-24

    @torch.no_grad()
    def update(self, rewards: torch.Tensor) -> float:
        stats = torch.stack(
            [rewards.detach().float().sum(), torch.tensor(float(rewards.numel()), device=rewards.device)]
        )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        total, n = stats.tolist()
        if n == 0:
            return self.mean
        batch_mean = torch.tensor(total / n, dtype=torch.float32)
        tot_count = self.count + n
        self.mean += ((batch_mean - self.mean) * n / tot_count).item()
        self.count = tot_count
        return self.mean

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), float(state["count"])


def bco_losses(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    beta: float,
    delta: float,
):
    """Per-row BCO loss and rewards.

    r = beta * (logp_policy - logp_ref); desirable: -log sigmoid(r - delta);
    undesirable: -w * log sigmoid(-(r - delta)). Returns (losses, rewards), both [B] float32.
    """
    rewards = beta * (policy_logps.float() - ref_logps.float())
    shifted = rewards - delta
    losses = torch.where(labels.bool(), -F.logsigmoid(shifted), -weights.float() * F.logsigmoid(-shifted))
    return losses, rewards
