"""Reward functions as one labeler: the Python API's `reward_funcs` (bco_ray/api/online.py), or a TRL-style
function named by `online.labeler`, turned into the labeler contract `(prompt, completion) -> verdict`.

Two contracts are taken, told apart by the function's parameters:

- per sample (the `eval.verifier` / `online.labeler` contract): `f(prompt, completion) -> bool | number | dict`
  with "score" (or "correct");
- TRL's batch reward function (trl 1.13's GRPOTrainer / OnlineDPOTrainer `reward_funcs`), any function with a
  parameter named `completions`: called as `f(prompts=[...], completions=[...], **columns)`, where each column
  of the prompt's dataset row (other than "prompt") is a list, and returning one number (or None: no reward
  from this function) per completion.

One function, unweighted: its verdict is the label as the labeler contract says (a bool is the label, a number
is compared with `online.threshold`). Several functions (or `reward_weights`): each sample's reward is the
weighted sum of the functions' numbers (a bool counts 1 / 0; None is left out, as trl's `nansum`), and the label
is reward >= `online.threshold`. A sample every function returns None for raises (the labeler's error, or its
skip with `online.on_label_error=skip`)."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bco_ray.errors import InputError

IN_PROCESS = "bco_ray.online.rewards:in_process"  # online.labeler of a run whose labeler was given in-process


class RewardFunctionError(InputError, ValueError):
    """A reward function broke its contract: the message names it (reward_funcs[i] name) and what it returned."""


def in_process(prompt: Any, completion: str) -> bool:
    """The `online.labeler` recorded for a run labelled by functions given in-process (OnlineBCOTrainer's
    reward_funcs): they cannot be imported by name, so a job started from its config alone stops here."""
    raise RewardFunctionError(
        "this run's reward functions were given in-process (OnlineBCOTrainer(reward_funcs=...)) and cannot be "
        "imported by name: run it again from Python, or set online.labeler to a 'package.module:function'"
    )


def is_batch(fn: Callable) -> bool:
    """TRL's contract: the function has a parameter named `completions`."""
    try:
        return "completions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no readable signature: the per-sample contract
        return False


def func_name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def as_number(out: Any) -> float | None:
    """A per-sample verdict (bool, number, dict with "score"/"correct") or a batch reward as a number; None
    stays None. Raises TypeError for anything else."""
    if out is None:
        return None
    if isinstance(out, Mapping):
        if "score" not in out and "correct" not in out:
            raise TypeError(f'returned a dict without a "score" or "correct" entry (keys: {sorted(map(str, out))})')
        out = out["score"] if "score" in out else out["correct"]
    if isinstance(out, numbers.Real) or type(out).__name__ == "bool_":  # numpy's numbers too
        x = float(out)
        return None if math.isnan(x) else x
    raise TypeError(f"returned {type(out).__name__} {str(out)[:80]!r}, not a number")


def _verdict_value(x: Any) -> Any:
    """A batch function's answer for one sample: a bool (numpy's too) stays a bool, the label itself when it is
    the one function's; anything else as a number (`as_number`)."""
    return bool(x) if isinstance(x, bool) or type(x).__name__ == "bool_" else as_number(x)


def _check_per_sample(i: int, f: Callable) -> None:
    try:
        inspect.signature(f).bind("prompt", "completion")
    except TypeError as e:
        raise RewardFunctionError(
            f"reward_funcs[{i}] {func_name(f)} cannot be called as f(prompt, completion) (bco-ray's labeler "
            f"contract) and has no `completions` parameter (TRL's f(prompts, completions, **kwargs)): {e}"
        ) from e
    except ValueError:  # no readable signature: the probe call decides
        pass


class RewardLabel:
    """`(prompt, completion) -> verdict` from reward functions (see the module's docstring). `columns` gives the
    dataset row's other columns of a prompt (passed to batch functions as lists, one entry per sample; a round's
    samples go to a batch function in one call: `call_batch`); `weights` one weight
    per function (None: 1 each)."""

    def __init__(
        self,
        funcs: Sequence[Callable],
        weights: Sequence[float] | None = None,
        columns: Mapping[Any, Mapping[str, Any]] | None = None,
    ):
        self.funcs = list(funcs)
        if not self.funcs:
            raise RewardFunctionError("reward_funcs is empty: give at least one reward function")
        for i, f in enumerate(self.funcs):
            if not callable(f) or isinstance(f, str) or hasattr(f, "config"):
                raise RewardFunctionError(
                    f"reward_funcs[{i}] is {type(f).__name__}: bco-ray takes reward functions (a reward model, "
                    "given by name or as a module, is not supported: wrap it in a function)"
                )
        if weights is not None and len(weights) != len(self.funcs):
            raise RewardFunctionError(
                f"reward_weights has {len(weights)} weights for {len(self.funcs)} reward functions: give one each"
            )
        self.weights = None if weights is None else [float(w) for w in weights]
        self.batch = [is_batch(f) for f in self.funcs]
        for i, f in enumerate(self.funcs):
            if not self.batch[i]:
                _check_per_sample(i, f)
        self.columns = columns or {}
        names = [func_name(f) for f in self.funcs]
        self.__name__ = names[0] if len(names) == 1 else " + ".join(names)

    def __call__(self, prompt: Any, completion: str) -> Any:
        return self.combine(self.call_batch([prompt], [completion])[0])

    def call_batch(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[list[Any]]:
        """Each function's output for every sample, as `combine` takes them: a batch function called once for all
        the samples (their prompts' columns as lists), a per-sample one on each. Raises whatever a function
        raises, or RewardFunctionError for a batch answer of the wrong length."""
        outs = []
        for i, f in enumerate(self.funcs):
            if not self.batch[i]:
                outs.append([f(p, c) for p, c in zip(prompts, completions, strict=True)])
                continue
            rows = [self.columns.get(p if isinstance(p, str) else repr(p), {}) for p in prompts]
            extra = {k: [row.get(k) for row in rows] for k in {k for row in rows for k in row}}
            got = f(prompts=list(prompts), completions=list(completions), **extra)
            if isinstance(got, (str, bytes)) or not isinstance(got, Sequence) or len(got) != len(prompts):
                shown = f"{len(got)} values" if isinstance(got, Sequence) else type(got).__name__
                raise RewardFunctionError(
                    f"reward_funcs[{i}] {func_name(f)} returned {shown} for {len(prompts)} completion(s): a TRL reward "
                    "function returns a list with one reward (a number or None) per completion"
                )
            outs.append([_verdict_value(x) for x in got])
        return [list(sample) for sample in zip(*outs, strict=True)]

    def combine(self, outs: list[Any]) -> Any:
        """One sample's verdict from each function's output (see the module's docstring)."""
        if len(outs) == 1 and self.weights is None:
            if outs[0] is None:
                raise RewardFunctionError(f"reward_funcs[0] {self.__name__} returned None (no reward)")
            return outs[0]
        numbers = [as_number(o) for o in outs]
        if all(x is None for x in numbers):
            raise RewardFunctionError(f"every reward function returned None (no reward) ({self.__name__})")
        weights = self.weights or [1.0] * len(numbers)
        return sum(w * x for w, x in zip(weights, numbers, strict=True) if x is not None)
