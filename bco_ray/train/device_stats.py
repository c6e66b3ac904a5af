"""δ and the logging window's sums kept on the training device: updated with device ops and device
all-reduces only, read back (one copy) at logging and checkpoint steps. Same numbers as `RunningMean` and
`WindowSums`, whose state formats they keep (checkpoints and metrics are interchangeable)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from bco_ray.train.metrics import KEYS, WindowSums


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


class DeviceRunningMean:
    """δ of the BCO paper as `bco_ray.bco.loss.RunningMean` computes it (count starting at 1e-24, each
    micro-batch's rewards of all ranks pooled; the increment in float32, the mean accumulated in float64),
    held as device tensors. `absorb` takes several micro-batches at once (one all-reduce). `mean` is a 0-d tensor: use it in the loss as is, `float()` it only to log."""

    def __init__(self, device: torch.device | str = "cpu", mean: float = 0.0, count: float = 1e-24):
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float64, device=self.device)
        self.count = torch.tensor(count, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Absorb the rewards of this micro-batch on every rank (`valid`: 1 for rows that count, 0 else)."""
        mb = torch.zeros(rewards.shape[0], dtype=torch.long, device=rewards.device)
        self.absorb(reward_sums(rewards, mb, 1, valid))
        return self.mean

    @torch.no_grad()
    def absorb(self, sums: torch.Tensor) -> torch.Tensor:
        """Absorb micro-batches 0..K-1 in turn; `sums` [2, K]: each one's reward sum and row count on this rank
        (`reward_sums`), all-reduced here. Returns δ after each micro-batch, [K] (float64)."""
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


class DeviceWindowSums(WindowSums):
    """`WindowSums` accumulated on the device (no copy per micro-batch); `reduce()` all-reduces and reads it."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        super().__init__()

    def reset(self) -> None:
        self.sums = torch.zeros(len(KEYS) - 2, dtype=torch.float64, device=getattr(self, "device", "cpu"))
        self.host = [0.0, 0.0, 0.0]  # tokens, computed tokens, model FLOPs: host counts (no copy per batch)

    @torch.no_grad()
    def add(
        self, losses, rewards, logps, labels, tokens: int, padded_tokens: int = 0, valid=None, flops: float = 0.0
    ) -> None:
        w = torch.ones_like(losses, dtype=torch.float64) if valid is None else valid.double()
        ch = labels.bool().double() * w
        rj = (1 - labels.bool().double()) * w
        r, lp, ls = rewards.detach().double(), logps.detach().double(), losses.detach().double()
        self.sums += torch.stack(
            [
                (ls * w).sum(),
                w.sum(),
                (r * ch).sum(),
                ch.sum(),
                (r * rj).sum(),
                rj.sum(),
                (lp * ch).sum(),
                (lp * rj).sum(),
            ]
        )
        self.host[0] += tokens
        self.host[1] += padded_tokens
        self.host[2] += flops

    def reduce(self) -> dict[str, float]:
        assert KEYS[-2:] == ("tokens", "padded_tokens")
        self.v = torch.cat([self.sums, torch.tensor(self.host[:2], dtype=torch.float64, device=self.device)])
        flops = torch.tensor([self.host[2]], dtype=torch.float64, device=self.device)
        if _distributed():
            dist.all_reduce(flops, op=dist.ReduceOp.SUM)
        return {**super().reduce(), "flops": float(flops[0])}
