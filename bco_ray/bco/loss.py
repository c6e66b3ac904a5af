"""BCO loss and its reward shift δ (a running mean of every reward seen, chosen and rejected pooled)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def reward_sums(rewards: torch.Tensor, mb: torch.Tensor, n_mb: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[2, n_mb]: the sum of the rewards and the rows of each micro-batch (`mb`: each row's index, `valid`: 1
    for rows that count, 0 for an empty pack's dummy row), float32 on the rewards' device."""
    r = rewards.detach().float()
    w = torch.ones_like(r) if valid is None else valid.float()
    out = torch.zeros(2, n_mb, dtype=torch.float32, device=r.device)
    return out.index_add_(1, mb, torch.stack([r * w, w]))


class RunningMean:
    """δ of the BCO paper, held as 0-d tensors on `device` (CPU is a device like any other): updated with
    device ops and all-reduces only, read back (`float(delta.mean)`) where a value is logged or saved.

    `count` starts at ~0 (1e-24) as in the reference, so the first update sets δ to the first micro-batch's
    mean reward. Under torch.distributed an update pools the rewards of all ranks (sum and count all-reduced),
    so δ is identical everywhere. The increment is float32, the mean accumulated in float64."""

    def __init__(self, mean: float = 0.0, count: float = 1e-24, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.load_state_dict({"mean": mean, "count": count})

    @torch.no_grad()
    def update(self, rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Absorb the rewards of this micro-batch on every rank (`valid`: 1 for rows that count, 0 else)."""
        rewards = rewards.detach().reshape(-1)
        mb = torch.zeros(rewards.shape[0], dtype=torch.long, device=rewards.device)
        self.absorb(reward_sums(rewards, mb, 1, valid))
        return self.mean

    @torch.no_grad()
    def absorb(self, sums: torch.Tensor) -> torch.Tensor:
        """Absorb micro-batches 0..K-1 in turn; `sums` [2, K]: each one's reward sum and row count on this rank
        (`reward_sums`), all-reduced here. Returns δ after each micro-batch, [K] (float64)."""
        sums = sums.to(self.device)
        if _distributed():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        after = []
        for total, n in zip(sums[0], sums[1].double()):
            batch_mean = total.float() / n.clamp(min=1).float()
            tot_count = self.count + n
            step = ((batch_mean - self.mean.float()) * n.float() / tot_count.float()).double()
            self.mean = torch.where(n > 0, self.mean + step, self.mean)
            self.count = torch.where(n > 0, tot_count, self.count)
            after.append(self.mean)
        return torch.stack(after)

    def state_dict(self) -> dict:
        return {"mean": float(self.mean), "count": float(self.count)}

    def load_state_dict(self, state: dict) -> None:
        self.mean = torch.tensor(float(state["mean"]), dtype=torch.float64, device=self.device)
        self.count = torch.tensor(float(state["count"]), dtype=torch.float64, device=self.device)


def bco_losses(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    beta: float,
    delta: float | torch.Tensor,
):
    """Per-row BCO loss and rewards.

    r = beta * (logp_policy - logp_ref); desirable: -log sigmoid(r - delta);
    undesirable: -w * log sigmoid(-(r - delta)). Returns (losses, rewards), both [B] float32.
    """
    rewards = beta * (policy_logps.float() - ref_logps.float())
    shifted = rewards - delta
    losses = torch.where(labels.bool(), -F.logsigmoid(shifted), -weights.float() * F.logsigmoid(-shifted))
    return losses, rewards
