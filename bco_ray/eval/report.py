"""From the generation pass's rows to what a user looks at: per-step metrics (`eval/gen/*`), the final
reference-vs-policy table, and their records in the job's tracker. Plain Python; the score-vs-step PNG is a panel of
bco_ray/tracking/plots.py, drawn from these metrics."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from bco_ray.eval.generation import mean

if TYPE_CHECKING:  # annotations only
    from bco_ray.tracking.tracker import Tracker

TABLE = "eval/generations.json"  # final step: prompt | reference | policy | scores, one row a prompt
STEPS_TABLE = "eval/generations_by_step.json"  # every evaluated step, one row a (step, prompt)


def _prefix(kind: str) -> str:
    return "eval/gen/" if kind == "greedy" else f"eval/gen/{kind}/"


def step_metrics(rows: list[dict]) -> dict[int, dict[str, float]]:
    """{step: {metric: value}}: per completion kind (greedy: `eval/gen/*`, sampled: `eval/gen/sampled/*`) the
    mean verifier values of the policy's completions (`score`, any other key the verifier returns) and of the
    reference's (`score_ref`, ...), lengths in tokens, the share that ended with EOS, and the implicit rewards
    β·(log π − log π_ref) of both completions under the policy of that step."""
    groups: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["step"], r["kind"])].append(r)
    out: dict[int, dict[str, float]] = defaultdict(dict)
    for (step, kind), rs in sorted(groups.items()):
        pre = _prefix(kind)
        keys = sorted({k for r in rs for k in r if k.startswith(("verifier/", "verifier_ref/"))})
        for k in keys:
            name = k.split("/", 1)[1] + ("_ref" if k.startswith("verifier_ref/") else "")
            out[step][pre + name] = mean([r[k] for r in rs if r.get(k) is not None])
        for k in ("length", "length_ref", "finished", "reward", "reward_ref"):
            out[step][pre + k] = mean([float(r[k]) for r in rs])
    return dict(out)


def final_table(rows: list[dict], kind: str = "greedy") -> dict[str, list]:
    """The last step's rows as columns: prompt, reference, policy, then the scores of each side."""
    last = max((r["step"] for r in rows if r["kind"] == kind), default=None)
    rs = sorted((r for r in rows if r["kind"] == kind and r["step"] == last), key=lambda r: r["prompt_index"])
    cols: dict[str, list] = {
        "step": [r["step"] for r in rs],
        "prompt": [r["prompt"] for r in rs],
        "reference": [r["completion_ref"] for r in rs],
        "policy": [r["completion"] for r in rs],
    }
    keys = sorted({k.split("/", 1)[1] for r in rs for k in r if k.startswith("verifier/")})
    for k in keys:
        cols[f"{k}_ref"] = [r.get(f"verifier_ref/{k}") for r in rs]
        cols[k] = [r.get(f"verifier/{k}") for r in rs]
    cols["reward_ref"] = [round(r["reward_ref"], 4) for r in rs]
    cols["reward"] = [round(r["reward"], 4) for r in rs]
    return cols


def steps_table(rows: list[dict]) -> dict[str, list]:
    """Every row, long format: step, kind, prompt, completion and its scores (the reference's in `step` 0)."""
    base = ("step", "kind", "prompt_index", "prompt", "completion", "length", "reward")
    keys = sorted({k for r in rows for k in r if k.startswith("verifier/")})
    return {k.replace("verifier/", ""): [r.get(k) for r in rows] for k in (*base, *keys)}


def log_report(tracker: Tracker, rows: list[dict]) -> dict[int, dict[str, float]]:
    """Metrics at their steps, the two tables; returns the metrics."""
    metrics = step_metrics(rows)
    for step, m in sorted(metrics.items()):
        tracker.log_metrics(m, step=step)
    tracker.log_table(final_table(rows), TABLE)
    tracker.log_table(steps_table(rows), STEPS_TABLE)
    return metrics


def summary_line(metrics: dict[int, dict[str, float]]) -> str:
    """'generation eval (32 prompts) at step 60: verifier score 0.41 (reference 0.22), ...' for the job log."""
    if not metrics:
        return "no generation eval rows"
    step = max(metrics)
    m = metrics[step]
    parts = [
        f"{k.removeprefix('eval/gen/')} {m[k]:.3g} (reference {m[k + '_ref']:.3g})"
        for k in sorted(m)
        if k.startswith("eval/gen/") and "/sampled/" not in k and k + "_ref" in m
    ]
    return f"generation eval at step {step}: " + ", ".join(parts)
