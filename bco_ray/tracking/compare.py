"""Compare the runs of an MLflow experiment (a β sweep, a UDM on/off ablation, ...): a table of the params
that differ between runs with the final and best value of one metric, as text, CSV and Markdown, and one PNG
that overlays that metric's curves across the runs. `jobs/compare.py` is the command line."""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from bco_ray.errors import InputError
from bco_ray.tracking.plots import ema, history

# Substrings of metric names where lower is better; everything else (auc, accuracy, margins, rewards, mfu,
# throughput) is taken as higher is better. `mode` overrides.
LOWER_IS_BETTER = ("loss", "error", "perplexity", "ppl", "grad_norm", "seconds", "latency", "dropped")
# Config params that differ between runs without changing what is trained: where runs are logged and where
# outputs, caches and checkpoints are written. Left out of "params that differ" unless asked for.
IGNORED_PARAMS = ("mlflow.", "output_dir", "precompute.cache_dir", "precompute.force", "train.storage_path")
DEFAULT_EXTRA = ("loss", "rewards/margins", "eval/auc", "eval/gen/score", "eval/gen/score_ref")


class CompareError(InputError, ValueError):
    """Nothing to compare (no such experiment, no runs): the message says what exists."""


@dataclass
class RunRow:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    final: float | None = None
    best: float | None = None
    best_step: int | None = None
    last_step: int | None = None
    extra: dict[str, float] = field(default_factory=dict)
    duration_s: float | None = None
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass
class Comparison:
    experiment: str
    metric: str
    mode: str  # "max" | "min"
    varying: list[str]  # params that differ between the runs, sorted
    extra: list[str]  # other metrics shown with their final value
    runs: list[RunRow]  # best first; runs without the metric last

    @property
    def header(self) -> list[str]:
        m = self.metric
        return [
            "run",
            "run_id",
            "status",
            *self.varying,
            f"{m} final",
            f"{m} best ({self.mode})",
            "best step",
            "last step",
            *(f"{k} final" for k in self.extra),
            "duration_s",
        ]

    def records(self, fmt=None) -> list[list]:
        f = fmt or (lambda v: "" if v is None else v)
        return [
            [
                r.name,
                r.run_id[:8] if fmt else r.run_id,
                r.status,
                *(r.params.get(p, "") for p in self.varying),
                f(r.final),
                f(r.best),
                "" if r.best_step is None else r.best_step,
                "" if r.last_step is None else r.last_step,
                *(f(r.extra.get(k)) for k in self.extra),
                "" if r.duration_s is None else round(r.duration_s, 1),
            ]
            for r in self.runs
        ]


def direction(metric: str, mode: str = "auto") -> str:
    if mode in ("max", "min"):
        return mode
    if mode != "auto":
        raise ValueError(f"mode must be auto, max or min (got {mode!r})")
    return "min" if any(s in metric.lower() for s in LOWER_IS_BETTER) else "max"


def varying_params(param_sets: list[dict[str, str]], ignore=IGNORED_PARAMS) -> list[str]:
    """Params whose value is not the same in every run (a param missing from a run counts as a value);
    `ignore`: names or prefixes (ending in ".") left out."""

    def ignored(k: str) -> bool:
        return any(k == i or (i.endswith(".") and k.startswith(i)) for i in ignore)

    keys = sorted({k for p in param_sets for k in p if not ignored(k)})
    return [k for k in keys if len({p.get(k) for p in param_sets}) > 1]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def metric_summary(steps: list[int], values: list[float], mode: str) -> tuple[float | None, float | None, int | None]:
    """(final, best, best step): final is the value at the last step; NaN/inf points are ignored."""
    pts = [(s, v) for s, v in zip(steps, values) if _finite(v)]
    if not pts:
        return None, None, None
    final = pts[-1][1]
    pick = max if mode == "max" else min
    best_step, best = pick(pts, key=lambda p: (p[1], -p[0]) if mode == "max" else (p[1], p[0]))
    return final, best, best_step


def search_all_runs(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            order_by=["attributes.start_time ASC"],
            max_results=1000,
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def compare_runs(
    client: MlflowClient,
    experiment: str,
    metric: str = "eval/auc",
    mode: str = "auto",
    filter_string: str = "",
    extra_metrics=DEFAULT_EXTRA,
    ignore_params=IGNORED_PARAMS,
) -> Comparison:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(f"no experiment named {experiment!r}; experiments here: {', '.join(names) or 'none'}")
    found = search_all_runs(client, exp.experiment_id, filter_string)
    if not found:
        raise CompareError(
            f"experiment {experiment!r} has no runs" + (f" matching {filter_string!r}" if filter_string else "")
        )
    mode = direction(metric, mode)
    rows = []
    for run in found:
        info = run.info
        steps, values = history(client, info.run_id, metric)
        final, best, best_step = metric_summary(steps, values, mode)
        rows.append(
            RunRow(
                run_id=info.run_id,
                name=info.run_name or info.run_id[:8],
                status=info.status,
                params=dict(run.data.params),
                final=final,
                best=best,
                best_step=best_step,
                last_step=steps[-1] if steps else None,
                extra={k: v for k, v in run.data.metrics.items() if k in extra_metrics and k != metric},
                duration_s=(info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None,
                steps=steps,
                values=values,
            )
        )
    extra = [k for k in extra_metrics if k != metric and any(k in r.extra for r in rows)]
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda r: (r.best is None, sign * r.best if r.best is not None else 0.0))
    return Comparison(experiment, metric, mode, varying_params([r.params for r in rows], ignore_params), extra, rows)


# ---------------------------------------------------------------------------------------------- output
def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _clip(s: str, width: int = 40) -> str:
    return s if len(s) <= width else s[: width - 1] + "…"


def format_table(comp: Comparison) -> str:
    """An aligned text table for the terminal (long param values clipped; the CSV has them whole)."""
    header = comp.header
    body = [[_clip(_fmt(v)) for v in row] for row in comp.records(fmt=_fmt)]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    numeric = [i > 1 and all(_is_number(r[i]) for r in body if r[i]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    title = (
        f"experiment {comp.experiment!r}: {len(comp.runs)} run(s), metric {comp.metric} "
        f"({'higher' if comp.mode == 'max' else 'lower'} is better)"
    )
    varying = (
        ("params that differ: " + ", ".join(comp.varying))
        if comp.varying
        else "params that differ: none (all runs share their config)"
    )
    return "\n".join([title, varying, "", line(header), line(["-" * w for w in widths]), *map(line, body)])


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def to_csv(comp: Comparison) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(comp.header)
    w.writerows(comp.records())
    return buf.getvalue()


def to_markdown(comp: Comparison) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    head = comp.header
    body = [[_clip(_fmt(v), 60) for v in row] for row in comp.records(fmt=_fmt)]
    numeric = [i > 1 and all(_is_number(r[i]) for r in body if r[i]) for i in range(len(head))]
    lines = [
        f"## {comp.experiment}: {comp.metric} ({'higher' if comp.mode == 'max' else 'lower'} is better)",
        "",
        "| " + " | ".join(esc(h) for h in head) + " |",
        "|" + "|".join("---:" if num else "---" for num in numeric) + "|",
    ]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def run_label(row: RunRow, varying: list[str], max_params: int = 3, first: str | None = None) -> str:
    """The run name and its values of the params that differ (`first` leads: the colour param of a sweep)."""
    if first in varying:
        varying = [first, *(p for p in varying if p != first)]
    shown = [
        f"{p.rsplit('.', 1)[-1] if _unique_leaf(p, varying) else p}={_clip(row.params.get(p, '–'), 24)}"
        for p in varying[:max_params]
    ]
    return row.name + (f" ({', '.join(shown)})" if shown else "")


def _unique_leaf(p: str, varying: list[str]) -> bool:
    leaf = p.rsplit(".", 1)[-1]
    return sum(q.rsplit(".", 1)[-1] == leaf for q in varying) == 1


def _colour_param(comp: Comparison) -> str | None:
    """The one varying param that is numeric in every run (a sweep), if there is exactly one."""
    numeric = [p for p in comp.varying if all(_is_number(r.params.get(p, "x")) for r in comp.runs)]
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
    if runs and max(sum(_finite(v) for v in r.values) for r in runs) <= 1:
        return _plot_bars(comp, runs, colours, cparam, path)
    fig, ax = plt.subplots(figsize=(9, 5))
    smoothed = False
    for r, c in zip(runs, colours):
        pts = [(s, v) for s, v in zip(r.steps, r.values) if _finite(v)]
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
    ax.set_xlabel("optimizer step")
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
    finite = [v for v in values if _finite(v)]
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
    at = f" (at step {steps[0]})" if len(steps) == 1 else ""
    ax.set_title(
        f"{comp.metric} of {len(runs)} run(s) of experiment '{comp.experiment}'{at}\n"
        f"one value per run; {'higher' if comp.mode == 'max' else 'lower'} is better",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "x"


def write_outputs(comp: Comparison, out_dir: str, smooth: bool | None = None) -> dict[str, str]:
    """CSV, Markdown and the overlay PNG under out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = Path(out_dir) / f"compare_{slug(comp.experiment)}_{slug(comp.metric)}"
    paths = {"csv": f"{stem}.csv", "markdown": f"{stem}.md", "png": f"{stem}.png"}
    Path(paths["csv"]).write_text(to_csv(comp))
    Path(paths["markdown"]).write_text(to_markdown(comp))
    plot_overlay(comp, paths["png"], smooth)
    return paths
