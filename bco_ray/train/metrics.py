"""Metric sums of a logging window, kept on the training device (CPU is a device like any other): added with
device ops only, all-reduced across ranks and read back (one copy) when the window is logged."""

from __future__ import annotations

import torch
import torch.distributed as dist

# Device sums, then the host counts (added as Python numbers: no copy per micro-batch).
DEVICE_KEYS = ("loss_sum", "rows", "chosen_rewards", "chosen", "rejected_rewards", "rejected")
DEVICE_KEYS += ("chosen_logps", "rejected_logps")
HOST_KEYS = ("tokens", "padded_tokens", "flops")


class WindowSums:
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(DEVICE_KEYS), dtype=torch.float64, device=self.device)
        self.host = [0.0] * len(HOST_KEYS)

    @torch.no_grad()
    def add(self, losses, rewards, logps, labels, tokens: int, padded_tokens: int = 0, valid=None, flops=0.0) -> None:
        """One micro-batch's rows (`valid`: 1 for rows that count, 0 for an empty pack's dummy row)."""
        w = torch.ones_like(losses, dtype=torch.float64) if valid is None else valid.double()
        ch = labels.bool().double() * w
        rj = (1 - labels.bool().double()) * w
        r, lp, ls = rewards.detach().double(), logps.detach().double(), losses.detach().double()
        parts = [(ls * w).sum(), w.sum(), (r * ch).sum(), ch.sum(), (r * rj).sum(), rj.sum()]
        self.sums += torch.stack(parts + [(lp * ch).sum(), (lp * rj).sum()]).to(self.device)
        for i, v in enumerate((tokens, padded_tokens, flops)):
            self.host[i] += v

    def reduce(self) -> dict[str, float]:
        """The window's metrics over all ranks: mean loss, rewards and log-probs by label, counts, tokens and
        model FLOPs (one all-reduce, one host read)."""
        v = torch.cat([self.sums, torch.tensor(self.host, dtype=torch.float64, device=self.device)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(v, op=dist.ReduceOp.SUM)
        s = dict(zip(DEVICE_KEYS + HOST_KEYS, v.tolist()))
        out = {
            "loss": s["loss_sum"] / max(s["rows"], 1),
            "count/chosen": s["chosen"],
            "count/rejected": s["rejected"],
            "tokens": s["tokens"],
            "flops": s["flops"],
        }
        if s["padded_tokens"]:
            out["padding_fraction"] = 1 - s["tokens"] / s["padded_tokens"]
        for side in ("chosen", "rejected"):
            if s[side]:
                out[f"rewards/{side}"] = s[f"{side}_rewards"] / s[side]
                out[f"logps/{side}"] = s[f"{side}_logps"] / s[side]
        if s["chosen"] and s["rejected"]:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out
