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
from bco_ray.tracking.plots import history

# Substrings of metric names where lower is better; everything else (auc, accuracy, margins, rewards, mfu,
# throughput) is taken as higher is better. `mode` overrides.
LOWER_IS_BETTER = ("loss", "error", "perplexity", "ppl", "grad_norm", "seconds", "latency", "dropped")
# Config params that differ between runs without changing what is trained: where runs are logged and where
# outputs, caches and checkpoints are written. Left out of "params that differ" unless asked for.
IGNORED_PARAMS = ("mlflow.", "output_dir", "precompute.cache_dir", "precompute.force", "train.storage_path")
DEFAULT_EXTRA = ("loss", "rewards/margins", "eval/auc", "eval/gen/score", "eval/gen/score_ref", "online/pass_rate")
# An online run (bco_ray/job/online.py) logs these once per round (step r: round r, or the policy after r rounds)
# and its training metrics once per optimizer step.
ONLINE_KEY, PER_ROUND = "online/pass_rate", ("online/", "time/round/", "eval/")


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
    unit: str = "step"  # what the metric's steps count: "step" (optimizer steps) or "round" (online runs)

    @property
    def header(self) -> list[str]:
        m, u = self.metric, self.unit
        return [
            "run",
            "run_id",
            "status",
            *self.varying,
            f"{m} final",
            f"{m} best ({self.mode})",
            f"best {u}",
            f"last {u}",
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


def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def metric_summary(steps: list[int], values: list[float], mode: str) -> tuple[float | None, float | None, int | None]:
    """(final, best, best step): final is the value at the last step; NaN/inf points are ignored."""
    pts = [(s, v) for s, v in zip(steps, values) if finite(v)]
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
    varying = varying_params([r.params for r in rows], ignore_params)
    return Comparison(experiment, metric, mode, varying, extra, rows, step_unit(metric, found))


def step_unit(metric: str, runs: list) -> str:
    """ "round" when the metric is one an online run logs per round and every run with it is online; else
    "step" (optimizer steps; a mix of online and offline runs is drawn over their steps as logged)."""
    with_it = [r for r in runs if metric in r.data.metrics]
    online = bool(with_it) and all(ONLINE_KEY in r.data.metrics for r in with_it)
    return "round" if online and metric.startswith(PER_ROUND) else "step"


# ---------------------------------------------------------------------------------------------- output
def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def clip(s: str, width: int = 40) -> str:
    return s if len(s) <= width else s[: width - 1] + "…"


def format_table(comp: Comparison) -> str:
    """An aligned text table for the terminal (long param values clipped; the CSV has them whole)."""
    header = comp.header
    body = [[clip(_fmt(v)) for v in row] for row in comp.records(fmt=_fmt)]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    numeric = [i > 1 and all(is_number(r[i]) for r in body if r[i]) for i in range(len(header))]

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


def is_number(s: str) -> bool:
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
    body = [[clip(_fmt(v), 60) for v in row] for row in comp.records(fmt=_fmt)]
    numeric = [i > 1 and all(is_number(r[i]) for r in body if r[i]) for i in range(len(head))]
    lines = [
        f"## {comp.experiment}: {comp.metric} ({'higher' if comp.mode == 'max' else 'lower'} is better)",
        "",
        "| " + " | ".join(esc(h) for h in head) + " |",
        "|" + "|".join("---:" if num else "---" for num in numeric) + "|",
    ]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "x"


def write_outputs(comp: Comparison, out_dir: str, smooth: bool | None = None) -> dict[str, str]:
    """CSV, Markdown and the overlay PNG under out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = Path(out_dir) / f"compare_{slug(comp.experiment)}_{slug(comp.metric)}"
    paths = {"csv": f"{stem}.csv", "markdown": f"{stem}.md", "png": f"{stem}.png"}
    Path(paths["csv"]).write_text(to_csv(comp))
    Path(paths["markdown"]).write_text(to_markdown(comp))
    from bco_ray.tracking.compare_plots import plot_overlay

    plot_overlay(comp, paths["png"], smooth)
    return paths
