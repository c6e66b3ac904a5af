"""Metric sums and counts kept per logging window, all-reduced across ranks before they are logged."""

from __future__ import annotations

import torch
import torch.distributed as dist

KEYS = (
    "loss_sum",
    "rows",
    "chosen_rewards",
    "chosen",
    "rejected_rewards",
    "rejected",
    "chosen_logps",
    "rejected_logps",
    "tokens",
    "padded_tokens",
)


class WindowSums:
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.v = torch.zeros(len(KEYS), dtype=torch.float64)

    @torch.no_grad()
    def add(self, losses, rewards, logps, labels, tokens: int, padded_tokens: int = 0) -> None:
        lab = labels.bool().cpu()
        r, lp, ls = rewards.detach().double().cpu(), logps.detach().double().cpu(), losses.detach().double().cpu()
        self.v += torch.tensor(
            [
                ls.sum(),
                len(lab),
                r[lab].sum(),
                lab.sum(),
                r[~lab].sum(),
                (~lab).sum(),
                lp[lab].sum(),
                lp[~lab].sum(),
                tokens,
                padded_tokens,
            ],
            dtype=torch.float64,
        )

    def reduce(self) -> dict[str, float]:
        v = self.v.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(v, op=dist.ReduceOp.SUM)
        s = dict(zip(KEYS, v.tolist()))
        out = {
            "loss": s["loss_sum"] / max(s["rows"], 1),
            "count/chosen": s["chosen"],
            "count/rejected": s["rejected"],
            "tokens": s["tokens"],
        }
        if s["padded_tokens"]:
            out["padding_fraction"] = 1 - s["tokens"] / s["padded_tokens"]
        if s["chosen"]:
            out["rewards/chosen"] = s["chosen_rewards"] / s["chosen"]
            out["logps/chosen"] = s["chosen_logps"] / s["chosen"]
        if s["rejected"]:
            out["rewards/rejected"] = s["rejected_rewards"] / s["rejected"]
            out["logps/rejected"] = s["rejected_logps"] / s["rejected"]
        if s["chosen"] and s["rejected"]:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out
