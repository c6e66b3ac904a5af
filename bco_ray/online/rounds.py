"""One round of online BCO, in plain Python: the heavy steps are callables the caller injects, so the Ray-backed
generator, reference scorer and policy updater plug in without changing the round's logic, and the logic is tested
with fakes (tests/test_online_rounds.py).

    generate(prompts, k) -> [(prompt, completion), ...]   k samples of each prompt from the current policy
    label([(prompt, completion), ...]) -> [True | False | None, ...]   None: skipped (bco_ray/online/labeler.py)
    score(rows) -> rows                                    the rows with their reference log-probs
    update(rows) -> metrics                                the BCO update on them (δ over all rewards seen)

A round: generate → label → commit the rows (bco_ray/online/store.py) → score the rows and the replayed rows of
the previous `replay_rounds` rounds → update → mark the round trained. Every round goes to the update, even one
whose samples all got the same label (δ, the running mean of the rewards, still gives both signs a target), and
one whose rows fill no whole optimizer step (the workers then train nothing that round). A
round whose rows are committed but not marked (the run stopped during its update) runs its update again on the
same rows: no round is labelled or trained twice."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bco_ray.errors import InputError
from bco_ray.online.store import RoundStore

Generate = Callable[[Sequence[Any], int], list[tuple[Any, str]]]
Label = Callable[[list[tuple[Any, str]]], "list[bool | None]"]
Score = Callable[[list[dict]], list[dict]]
Update = Callable[[list[dict]], dict]


class RoundError(InputError, ValueError):
    """A round cannot train: the message names the round and the setting to change."""


@dataclass
class RoundResult:
    round: int
    rows: list[dict]  # the round's labelled rows as committed
    trained_rows: int  # rows the update saw: the round's and the replayed ones
    metrics: dict[str, float]  # online/* and time/round/*, once per round
    update_metrics: dict = field(default_factory=dict)  # what `update` returned
    resumed: bool = False  # the rows were committed by an earlier attempt: only score and update ran now


def label_samples(r: int, samples: list[tuple[Any, str]], label: Label, policy_step: int) -> tuple[list[dict], int]:
    """The round's rows from its samples, and how many samples the labeler skipped."""
    rows, skipped = [], 0
    for (prompt, completion), y in zip(samples, label(samples), strict=True):
        if y is None:
            skipped += 1
            continue
        rows.append(
            {"prompt": prompt, "completion": completion, "label": bool(y), "round": r, "policy_step": policy_step}
        )
    return rows, skipped


def round_metrics(rows: list[dict], label_errors: int) -> dict[str, float]:
    """online/pass_rate (share of the round's labelled samples that are desirable), the counts per label and the
    samples the labeler failed on."""
    up = sum(1 for row in rows if row["label"])
    return {
        "online/pass_rate": up / len(rows) if rows else 0.0,
        "online/desirable": float(up),
        "online/undesirable": float(len(rows) - up),
        "online/label_errors": float(label_errors),
    }


def _timed(times: dict, name: str, fn: Callable, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    times[f"time/round/{name}"] = time.perf_counter() - t0
    return out


def run_round(
    r: int,
    prompts: Sequence[Any],
    generate: Generate,
    label: Label,
    score: Score,
    update: Update,
    store: RoundStore,
    *,
    samples_per_prompt: int = 1,
    policy_step: int = 0,
    replay_rounds: int = 0,
) -> RoundResult:
    """Round r (see the module doc). Raises RoundError if round r is already trained, or if no sample survived
    labelling."""
    if store.is_updated(r):
        raise RoundError(f"round {r} is already trained (marked in {store.uri(r, 'updated')}): it is not run twice")
    times: dict[str, float] = {}
    resumed = store.has_rows(r)
    if resumed:
        rows, errors = store.read_rows(r), store.label_errors(r)
    else:
        samples = _timed(times, "generate", generate, prompts, samples_per_prompt)
        rows, errors = _timed(times, "label", label_samples, r, samples, label, policy_step)
        if not rows and errors:
            raise RoundError(
                f"round {r}: online.labeler failed on all {errors} samples (online.on_label_error=skip): nothing to "
                "train on; fix the labeler or check the samples"
            )
        if not rows:
            raise RoundError(
                f"round {r}: every sampled completion was empty (the policy ended each at once): nothing to label; "
                "check the policy's generations, or sample more (online.temperature, online.samples_per_prompt)"
            )
        store.write_rows(r, rows, errors)
        rows = store.read_rows(r)  # as the one reader reads them back (what a resumed round trains on)
    replayed = [row for q in range(max(0, r - replay_rounds), r) for row in store.read_rows(q)]
    scored = _timed(times, "score", score, rows + replayed)
    update_metrics = _timed(times, "update", update, scored)
    metrics = {**round_metrics(rows, errors), "online/replay_rows": float(len(replayed)), **times}
    update_metrics = dict(update_metrics or {})
    info = {"round": r, "rows": len(rows), "trained_rows": len(scored), "metrics": metrics, "update": update_metrics}
    store.mark_updated(r, info)
    return RoundResult(r, rows, len(scored), metrics, update_metrics, resumed)


def run_rounds(
    rounds: int,
    prompts_of: Callable[[int], Sequence[Any]],
    *parts: Any,
    policy_step: Callable[[], int] = lambda: 0,
    after_round: Callable[[RoundResult], None] | None = None,
    **options: int,
) -> list[RoundResult]:
    """Rounds from where the store says the run stopped (`RoundStore.next_round`) up to `rounds`; `prompts_of(r)`
    gives round r's prompts (a PromptSource's, deterministic in the round), `policy_step()` the current policy's
    optimizer step (recorded with each round's rows), `after_round(result)` (if given) is called as each round
    ends (a job logs the round there). `parts` are `run_round`'s (generate, label, score, update, store) and
    `options` its keywords (samples_per_prompt, replay_rounds)."""
    store: RoundStore = parts[-1]
    start, _ = store.next_round()
    results = []
    for r in range(start, rounds):
        results.append(run_round(r, prompts_of(r), *parts, policy_step=policy_step(), **options))
        if after_round is not None:
            after_round(results[-1])
    return results


def stored_result(store: RoundStore, r: int) -> RoundResult:
    """Round r as its marker recorded it, for a resumed job that must still log it: its rows, its metrics and the
    update's (a round marked from the workers' checkpoint has only the metrics its rows give)."""
    rows, info = store.read_rows(r), store.updated_info(r)
    metrics = info.get("metrics") or round_metrics(rows, store.label_errors(r))
    return RoundResult(r, rows, int(info.get("trained_rows", len(rows))), metrics, info.get("update", {}), True)
