"""The PNG of `bco-ray compare` (bco_ray/tracking/compare.py): one metric's curves across the runs of an
experiment on one axis (a bar per run when each has one value), coloured along a sweep's numeric param."""

from __future__ import annotations

from bco_ray.tracking.compare import Comparison, RunRow, clip, finite, is_number
from bco_ray.tracking.plots import ema


def run_label(row: RunRow, varying: list[str], max_params: int = 3, first: str | None = None) -> str:
    """The run name and its values of the params that differ (`first` leads: the colour param of a sweep)."""
    if first in varying:
        varying = [first, *(p for p in varying if p != first)]
    shown = [
        f"{p.rsplit('.', 1)[-1] if _unique_leaf(p, varying) else p}={clip(row.params.get(p, '–'), 24)}"
        for p in varying[:max_params]
    ]
    return row.name + (f" ({', '.join(shown)})" if shown else "")


def _unique_leaf(p: str, varying: list[str]) -> bool:
    leaf = p.rsplit(".", 1)[-1]
    return sum(q.rsplit(".", 1)[-1] == leaf for q in varying) == 1


def _colour_param(comp: Comparison) -> str | None:
    """The one varying param that is numeric in every run (a sweep), if there is exactly one."""
    numeric = [p for p in comp.varying if all(is_number(r.params.get(p, "x")) for r in comp.runs)]
    return numeric[0] if len(numeric) == 1 else None


def plot_overlay(comp: Comparison, path: str, smooth: bool | None = None) -> str:
    """The metric's curve of every run on one axis; the best point of each run starred. With one numeric
    param varying (a sweep), runs are coloured along a colour map by it and the legend is sorted by it."""
    import matplotlib.pyplot as plt  # the Agg backend: bco_ray.tracking.plots sets it

    runs = [r for r in comp.runs if r.steps]
    cparam = _colour_param(comp)
    if cparam:
        runs.sort(key=lambda r: float(r.params[cparam]))
        cmap = plt.get_cmap("viridis")
        colours = [cmap(0.1 + 0.8 * i / max(len(runs) - 1, 1)) for i in range(len(runs))]
    else:
        cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
        colours = [cmap(i % cmap.N) for i in range(len(runs))]
    if runs and max(sum(finite(v) for v in r.values) for r in runs) <= 1:
        return _plot_bars(comp, runs, colours, cparam, path)
    fig, ax = plt.subplots(figsize=(9, 5))
    smoothed = False
    for r, c in zip(runs, colours):
        pts = [(s, v) for s, v in zip(r.steps, r.values) if finite(v)]
        if not pts:
            continue
        steps, values = [p[0] for p in pts], [p[1] for p in pts]
        do_smooth = len(pts) > 50 if smooth is None else smooth and len(pts) > 2
        label = run_label(r, comp.varying, first=cparam)
        if do_smooth:
            smoothed = True
            ax.plot(steps, values, color=c, lw=0.8, alpha=0.25)
            ax.plot(steps, ema(values), color=c, lw=2, label=label)
        else:
            ax.plot(steps, values, color=c, lw=2, marker="o" if len(pts) <= 30 else None, ms=4, label=label)
        if r.best_step is not None:
            ax.plot([r.best_step], [r.best], marker="*", ms=13, color=c, markeredgecolor="k", mew=0.6, zorder=5)
    if not runs:
        ax.text(0.5, 0.5, f"no run logged {comp.metric}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step" if comp.unit == "step" else "round (the policy after r rounds)")
    ax.set_ylabel(comp.metric)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    best_word = "highest" if comp.mode == "max" else "lowest"
    ax.set_title(
        f"{comp.metric} across {len(runs)} run(s) of experiment '{comp.experiment}'\n"
        f"★ = each run's {best_word} value" + (";  lines: EMA, faint: raw points" if smoothed else ""),
        fontsize=11,
    )
    if runs:
        legend_title = f"colour: {cparam}" if cparam else None
        if len(runs) > 8:
            ax.legend(fontsize=8, title=legend_title, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=9, title=legend_title, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_bars(comp: Comparison, runs: list[RunRow], colours: list, cparam: str | None, path: str) -> str:
    """One value per run (e.g. an evaluation only at the end): a bar per run, its value written on it."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(runs) + 2), 5))
    labels = [run_label(r, comp.varying, first=cparam).replace(" (", "\n(") for r in runs]
    values = [r.best if r.best is not None else float("nan") for r in runs]
    bars = ax.bar(range(len(runs)), values, color=colours, edgecolor="k", lw=0.6)
    for b, r in zip(bars, runs):
        if r.best is not None:
            ax.annotate(
                f"{r.best:.4g}",
                (b.get_x() + b.get_width() / 2, r.best),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
                fontsize=9,
            )
    finite = [v for v in values if finite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        span = (hi - lo) or abs(hi) or 1.0
        bottom = 0.0 if lo >= 0 and lo < 0.5 * hi else lo - 0.6 * span
        ax.set_ylim(bottom, hi + 0.25 * span)
    ax.set_xticks(
        range(len(runs)),
        labels,
        fontsize=8,
        rotation=0 if len(runs) <= 6 else 30,
        ha="center" if len(runs) <= 6 else "right",
    )
    ax.set_ylabel(comp.metric)
    ax.grid(axis="y", alpha=0.3)
    steps = sorted({r.steps[0] for r in runs if r.steps})
    at = f" (at {comp.unit} {steps[0]})" if len(steps) == 1 else ""
    ax.set_title(
        f"{comp.metric} of {len(runs)} run(s) of experiment '{comp.experiment}'{at}\n"
        f"one value per run; {'higher' if comp.mode == 'max' else 'lower'} is better",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
