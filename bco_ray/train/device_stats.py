"""δ and the logging window's sums kept on the training device: updated with device ops and device
all-reduces only, read back (one copy) at logging and checkpoint steps. Same numbers as `RunningMean` and
`WindowSums`, whose state formats they keep (checkpoints and metrics are interchangeable)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from bco_ray.train.metrics import KEYS, WindowSums


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DeviceRunningMean:
    """δ of the BCO paper as `bco_ray.bco.loss.RunningMean` computes it (count starting at 1e-24, each
    micro-batch's rewards of all ranks pooled; the increment in float32, the mean accumulated in float64),
    held as device tensors. `mean` is a 0-d tensor: use it in the loss as is, `float()` it only to log."""

    def __init__(self, device: torch.device | str = "cpu", mean: float = 0.0, count: float = 1e-24):
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float64, device=self.device)
        self.count = torch.tensor(count, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Absorb the rewards of this micro-batch on every rank (`valid`: 1 for rows that count, 0 else)."""
        r = rewards.detach().float()
        w = torch.ones_like(r) if valid is None else valid.float()
        stats = torch.stack([(r * w).sum(), w.sum()])
        if _distributed():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        total, n = stats[0], stats[1].double()
        batch_mean = total / n.clamp(min=1).float()
        tot_count = self.count + n
        step = ((batch_mean - self.mean.float()) * n.float() / tot_count.float()).double()
        self.mean = torch.where(n > 0, self.mean + step, self.mean)
        self.count = torch.where(n > 0, tot_count, self.count)
        return self.mean

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
