"""What a job logged, step by step, as plain data (the job's result: `JobResult.history`): a list of entries
`{"step": s, **metrics}` in the order they were logged: the pass's summary at step 0, every train and eval record
of rank 0, the generation eval at its steps, the driver's phase timings at the last step. A step may hold several
entries (train and eval); a later value of a metric at the same step replaces an earlier one. Readers (the model
card, the Python API's `trainer.state`) take it from the result, never back from the tracker."""

from __future__ import annotations

from bco_ray.data.pass_summary import PrecomputeSummary

SPLIT_METRICS = ("rows", "tokens", "chosen", "rejected", "padding_fraction", "mean_rejected_weight")
CARD_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def precompute_metrics(summary: PrecomputeSummary) -> dict[str, float]:
    """`precompute/<count>` of the train split, `precompute/seconds`, `precompute/dropped/<reason>` and the
    UDM classifier's `udm/*`."""
    metrics = {f"precompute/{k}": getattr(summary.train, k) for k in SPLIT_METRICS}
    metrics["precompute/seconds"] = summary.seconds
    metrics.update({f"precompute/dropped/{k}": v for k, v in summary.dropped.items()})
    metrics.update(summary.udm.to_dict() if summary.udm is not None else {})
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def entry(step: int, metrics: dict) -> dict:
    """One history entry: the step, then the metrics (numbers) logged at it."""
    return {"step": int(step), **{k: float(v) for k, v in metrics.items() if k != "step"}}


def by_step(history: list[dict]) -> dict[int, dict[str, float]]:
    """{step: {metric: value}}, steps in order (the last value where a step holds a metric several times)."""
    out: dict[int, dict[str, float]] = {}
    for e in sorted(history, key=lambda e: e["step"]):  # stable: entries of one step keep their order
        out.setdefault(int(e["step"]), {}).update({k: v for k, v in e.items() if k != "step"})
    return out


def last_values(history: list[dict]) -> dict[str, float]:
    """Every metric's value at its last step (what a tracker shows as the run's metrics)."""
    out: dict[str, float] = {}
    for metrics in by_step(history).values():
        out.update(metrics)
    return out


def values(history: list[dict], key: str) -> list[float]:
    """Every logged value of `key`, step by step."""
    return [e[key] for e in sorted(history, key=lambda e: e["step"]) if key in e]


def card_metrics(history: list[dict], final: dict) -> dict:
    """The model card's metrics: the run's last training values (loss, rewards, log-probs) and the worker's
    final record (step, delta, eval/*)."""
    last = last_values(history)
    return {**{k: last[k] for k in CARD_METRICS if k in last}, **final}
