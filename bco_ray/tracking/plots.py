"""PNG plots of a finished run, drawn from its MLflow metric history (matplotlib, no display).

One PNG per panel (loss, rewards chosen/rejected, margins, δ, eval AUC/accuracy, generation-eval score and
implicit reward, policy vs reference), an `overview.png` with all
of them (and the learning rate) on one page, and the UDM weight histogram. Noisy training curves get an
exponential moving average over the raw points; evaluation points are drawn as markers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

DPI = 120
EVAL_PREFIX = "eval/"  # metrics logged at evaluation points only: drawn as markers, never smoothed
COLORS = {
    "loss": "#1f77b4",
    "eval/loss": "#d62728",
    "rewards/chosen": "#2ca02c",
    "rewards/rejected": "#d62728",
    "rewards/margins": "#9467bd",
    "delta": "#ff7f0e",
    "eval/auc": "#1f77b4",
    "eval/accuracy": "#2ca02c",
    "learning_rate": "#7f7f7f",
    "eval/gen/score": "#2ca02c",
    "eval/gen/score_ref": "#7f7f7f",
    "eval/gen/reward": "#2ca02c",
    "eval/gen/reward_ref": "#7f7f7f",
}
LABELS = {
    "loss": "train loss",
    "eval/loss": "eval loss",
    "rewards/chosen": "chosen (desirable)",
    "rewards/rejected": "rejected (undesirable)",
    "rewards/margins": "chosen − rejected",
    "delta": "δ (running mean reward)",
    "eval/auc": "eval ROC AUC",
    "eval/accuracy": "eval accuracy",
    "learning_rate": "learning rate",
    "eval/gen/score": "policy",
    "eval/gen/score_ref": "reference",
    "eval/gen/reward": "policy's completions",
    "eval/gen/reward_ref": "reference's completions",
}


@dataclass
class Panel:
    name: str  # file name stem
    title: str
    keys: list[str]
    ylabel: str = ""
    zero_line: bool = False  # a y = 0 reference
    unit_range: bool = False  # values in [0, 1]: fixed axis, chance line at 0.5
    sci: bool = False
    smooth: bool = True  # EMA over the raw points when there are many (not for δ, lr: smooth already)


PANELS = [
    Panel("loss", "BCO loss", ["loss", "eval/loss"], "loss"),
    Panel(
        "rewards",
        "Implicit rewards β·(log π − log π_ref)",
        ["rewards/chosen", "rewards/rejected"],
        "reward",
        zero_line=True,
    ),
    Panel("margins", "Reward margin (chosen − rejected)", ["rewards/margins"], "margin", zero_line=True),
    Panel("delta", "Reward shift δ", ["delta"], "δ", zero_line=True, smooth=False),
    Panel(
        "eval_auc",
        "Evaluation: reward as a classifier of the label",
        ["eval/auc", "eval/accuracy"],
        "score",
        unit_range=True,
    ),
    Panel(
        "gen_score",
        "Generation eval: verifier score of greedy completions",
        ["eval/gen/score", "eval/gen/score_ref"],
        "mean score",
    ),
    Panel(
        "gen_reward",
        "Generation eval: implicit reward of the completions",
        ["eval/gen/reward", "eval/gen/reward_ref"],
        "β·(log π − log π_ref)",
        zero_line=True,
    ),
]
OVERVIEW_EXTRA = Panel("learning_rate", "Learning rate", ["learning_rate"], "lr", sci=True, smooth=False)


def ema(values: list[float], alpha: float | None = None) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled towards 0."""
    if alpha is None:
        alpha = min(0.5, 10.0 / max(len(values), 1))
    out, m, w = [], 0.0, 0.0
    for v in values:
        m = (1 - alpha) * m + alpha * v
        w = (1 - alpha) * w + alpha
        out.append(m / w)
    return out


def history(client: MlflowClient, run_id: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a metric, one point per step (the latest logged, should a step repeat)."""
    by_step = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
        by_step[m.step] = m.value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _draw(
    ax,
    panel: Panel,
    series: dict[str, tuple[list[int], list[float]]],
    title: str | None = None,
    xlim: tuple[float, float] | None = None,
) -> bool:
    drawn = False
    for i, key in enumerate(panel.keys):
        steps, values = series.get(key, ([], []))
        if not steps:
            continue
        color = COLORS.get(key)
        label = LABELS.get(key, key)
        if key.startswith(EVAL_PREFIX) or len(steps) < 3:
            ax.plot(steps, values, marker="o", ms=5, lw=1.5, color=color, label=label)
            # the last value, written next to it (one series above its point, the next below)
            ax.annotate(
                f"{values[-1]:.3g}",
                (steps[-1], values[-1]),
                textcoords="offset points",
                ha="right",
                xytext=(-6, 7 if i % 2 == 0 else -13),
                fontsize=8,
                color=color,
            )
        elif len(steps) > 20 and panel.smooth:
            ax.plot(steps, values, lw=0.8, alpha=0.3, color=color)
            ax.plot(steps, ema(values), lw=1.8, color=color, label=f"{label} (EMA)")
        else:
            ax.plot(steps, values, marker="." if len(steps) <= 30 else None, ms=6, lw=1.5, color=color, label=label)
        drawn = True
    if not drawn:
        return False
    if panel.zero_line:
        ax.axhline(0, color="k", lw=0.7, alpha=0.5)
    if panel.unit_range:
        ax.axhline(0.5, color="k", lw=0.7, ls="--", alpha=0.5, label="chance")
        ax.set_ylim(-0.02, 1.02)
    if panel.sci:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if xlim:  # every panel on the run's step range: an evaluation at the end sits at the end
        ax.set_xlim(*xlim)
    ax.set_title(panel.title + (f"  ·  {title}" if title else ""), fontsize=10)
    ax.set_xlabel("optimizer step")
    if panel.ylabel:
        ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="best")
    return True


def plot_run(client: MlflowClient, run_id: str, out_dir: str, title: str | None = None) -> list[str]:
    """PNG files written to out_dir: one per panel with data, then overview.png. `title` (e.g. the run name)
    heads every figure."""
    os.makedirs(out_dir, exist_ok=True)
    if title is None:
        run = client.get_run(run_id)
        title = run.info.run_name or run_id
    online = bool(history(client, run_id, ONLINE_KEY)[0])
    panels = [p for p in PANELS if not (online and p.name in ONLINE_PANELS)] + [OVERVIEW_EXTRA]
    series = {k: history(client, run_id, k) for p in panels for k in p.keys}
    steps = [s for st, _ in series.values() for s in st]
    xlim = None
    if steps and max(steps) > min(steps):
        pad = max(0.3, 0.03 * (max(steps) - min(steps)))
        xlim = (min(steps) - pad, max(steps) + pad)
    paths = [plot_online(client, run_id, os.path.join(out_dir, "online.png"), title)] if online else []
    for panel in panels[:-1]:
        fig, ax = plt.subplots(figsize=(7, 4))
        if _draw(ax, panel, series, title, xlim):
            fig.tight_layout()
            path = os.path.join(out_dir, f"{panel.name}.png")
            fig.savefig(path, dpi=DPI)
            paths.append(path)
        plt.close(fig)
    with_data = [p for p in panels if any(series[k][0] for k in p.keys)]
    if with_data:
        cols = 3 if len(with_data) > 4 else 2 if len(with_data) > 1 else 1
        rows = -(-len(with_data) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
        for ax, panel in zip(axes.flat, with_data):
            _draw(ax, panel, series, xlim=xlim)
        for ax in list(axes.flat)[len(with_data) :]:
            ax.axis("off")
        fig.suptitle(f"{title}: training overview", fontsize=12)
        fig.tight_layout()
        path = os.path.join(out_dir, "overview.png")
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        paths.append(path)
    return paths


ONLINE_KEY = "online/pass_rate"  # an online run's: its eval steps count rounds, not optimizer steps
ONLINE_PANELS = ("gen_score", "gen_reward")  # drawn over rounds in online.png instead


def plot_online(client: MlflowClient, run_id: str, out_path: str, title: str | None = None) -> str:
    """An online run over its rounds (bco_ray/job/online.py): the share of each round's samples labelled
    desirable (online/pass_rate at step r: sampled from the policy trained on r rounds) and the held-out greedy
    verifier score of the policy after r rounds (eval/gen/score at step r) vs the reference's."""
    keys = (ONLINE_KEY, "eval/gen/score", "eval/gen/score_ref")
    labels = {ONLINE_KEY: "pass rate of the round's samples", **LABELS}
    labels["eval/gen/score"], labels["eval/gen/score_ref"] = "held-out score: policy", "held-out score: reference"
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, color in zip(keys, ("#1f77b4", COLORS["eval/gen/score"], COLORS["eval/gen/score_ref"])):
        steps, values = history(client, run_id, key)
        if steps:
            ls = "--" if key.endswith("_ref") else "-"
            ax.plot(steps, values, marker="o", ms=5, lw=1.5, ls=ls, color=color, label=labels[key])
    ax.set_title("Online BCO: pass rate and held-out score" + (f"  ·  {title}" if title else ""), fontsize=10)
    ax.set_xlabel("rounds trained (the policy's)")
    ax.set_ylabel("share / mean score")
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out_path, dpi=DPI)
    plt.close(fig)
    return out_path


def plot_weight_hist(hist: dict, out_path: str, title: str | None = None, mean: float | None = None) -> str:
    """Bar chart of the UDM density-ratio weights of the undesirable rows (edges/counts from the pass);
    `mean`: the exact mean weight (else estimated from the bins)."""
    edges, counts = hist["edges"], hist["counts"]
    total = sum(counts)
    fig, ax = plt.subplots(figsize=(7, 4))
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color="#9467bd", edgecolor="white", lw=0.8)
    if total:
        exact = mean is not None
        if not exact:
            mean = sum((a + w / 2) * c for a, w, c in zip(edges[:-1], widths, counts)) / total
        ax.axvline(mean, color="k", ls="--", lw=1, label=f"mean {mean:.2f}" if exact else f"mean ≈ {mean:.2f}")
        ax.axvline(1.0, color="#ff7f0e", lw=1, label="w = 1 (no reweighting)")
        ax.legend(fontsize=8)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("UDM weight w = clamp(p / (1 − p)) of an undesirable row")
    ax.set_ylabel("rows")
    ax.set_title(
        f"UDM density-ratio weights of {total:,} undesirable rows" + (f"  ·  {title}" if title else ""), fontsize=10
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=DPI)
    plt.close(fig)
    return out_path
