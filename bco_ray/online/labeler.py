"""The labeler of online BCO (`online.labeler`): the `eval.verifier` contract, `(prompt, completion) -> bool |
number | dict`, turned into a thumbs-up / thumbs-down. A bool is the label; a number (or a dict's "score", else its
"correct") is desirable iff it is >= `online.threshold`. `Labeler.load` imports it and tries it on one prompt with
an empty completion, so a labeler that cannot work fails before any Ray work; at run time a labeler that raises
stops the job naming the prompt and completion, or (`online.on_label_error: skip`) the sample is skipped and
counted. A TRL-style batch reward function (`f(prompts, completions, **kwargs) -> list`) is adapted to the contract
(bco_ray/online/rewards.py); `Labeler.checked` takes a function given in-process (the Python API's reward_funcs)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

from bco_ray.errors import InputError
from bco_ray.eval.generation import load_verifier
from bco_ray.online.rewards import RewardLabel, is_batch

FIELD = "online.labeler"
_CONTRACT = 'a bool, a number, or a dict with a "score" (or "correct") entry'


class LabelerError(InputError, ValueError):
    """online.labeler cannot label: the message names it, and the prompt and completion where one failed."""


def _short(text: Any, n: int = 200) -> str:
    s = repr(text)
    return s if len(s) <= n else s[: n - 3] + "..."


def verdict(out: Any, threshold: float) -> bool:
    """A labeler's return value as a label. Raises TypeError/ValueError for a value outside the contract."""
    if isinstance(out, dict):
        if "score" not in out and "correct" not in out:
            raise TypeError(f'returned a dict without a "score" or "correct" entry (keys: {sorted(map(str, out))})')
        out = out["score"] if "score" in out else out["correct"]
    if isinstance(out, bool):
        return out
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        if not math.isfinite(out):
            raise ValueError(f"returned {out!r}, not a finite number")
        return out >= threshold
    raise TypeError(f"returned {type(out).__name__} {_short(out, 80)}")


class Labeler:
    """`label(prompt, completion)`: True (desirable), False, or None (skipped: the labeler raised and
    `on_error="skip"`); `errors` counts the skipped samples."""

    def __init__(self, fn: Callable, spec: str, threshold: float = 0.5, on_error: str = "error", field: str = FIELD):
        if on_error not in ("error", "skip"):
            raise ValueError(f"on_error must be 'error' or 'skip', got {on_error!r}")
        self.fn, self.spec, self.threshold, self.on_error = fn, spec, threshold, on_error
        self.field = field
        self.errors = 0

    @classmethod
    def load(cls, spec: str, probe_prompt: Any, threshold: float = 0.5, on_error: str = "error") -> Labeler:
        """Import `spec` (a TRL-style batch reward function is adapted: bco_ray/online/rewards.py) and `checked`
        it. Raises LabelerError naming online.labeler."""
        try:
            fn = load_verifier(spec, FIELD)
        except InputError as e:
            raise LabelerError(str(e)) from e
        if is_batch(fn):
            fn = RewardLabel([fn])
        return cls.checked(fn, spec, probe_prompt, threshold, on_error)

    @classmethod
    def checked(
        cls, fn: Callable, spec: str, probe_prompt: Any, threshold: float = 0.5, on_error: str = "error",
        field: str = FIELD,
    ) -> Labeler:  # fmt: skip
        """Check that `fn` takes (prompt, completion), and call it on `probe_prompt` with an empty completion: its
        answer must be within the contract. Raises LabelerError naming `field` and `spec`."""
        name = f"{field} {spec!r}"
        try:
            inspect.signature(fn).bind(probe_prompt, "")
        except TypeError as e:
            raise LabelerError(
                f"{name} cannot be called as {spec.partition(':')[2] or spec}(prompt, completion): {e}"
            ) from e
        except ValueError:  # a builtin or C function without a readable signature: the call below decides
            pass
        labeler = cls(fn, spec, threshold, on_error, field)
        try:
            out = fn(probe_prompt, "")
        except Exception as e:
            raise LabelerError(
                f"{name} raised {type(e).__name__}: {e} on the prompt {_short(probe_prompt)} with an empty "
                "completion; it must return a verdict for any completion of the online.prompts (return a failing "
                "verdict for one it cannot read)"
            ) from e
        try:
            verdict(out, threshold)
        except (TypeError, ValueError) as e:
            raise LabelerError(
                f"{name} {e} on the prompt {_short(probe_prompt)} with an empty completion; it must return {_CONTRACT}"
            ) from None
        return labeler

    def label(self, prompt: Any, completion: str) -> bool | None:
        try:
            return verdict(self.fn(prompt, completion), self.threshold)
        except Exception as e:
            return self._failed(prompt, completion, e)

    def label_batch(self, samples: list[tuple[Any, str]]) -> list[bool | None]:
        """`label` of each sample. Reward functions in TRL's batch contract (bco_ray/online/rewards.py) are called
        once for all the samples; if such a call raises, every sample is labelled on its own, so the error names
        the sample it fails on (or only that sample is skipped)."""
        call_batch = getattr(self.fn, "call_batch", None)
        if call_batch is None or not samples:
            return [self.label(p, c) for p, c in samples]
        try:
            outs = call_batch([p for p, _ in samples], [c for _, c in samples])
        except Exception:  # noqa: BLE001 - found again, sample by sample, below
            return [self.label(p, c) for p, c in samples]
        labels: list[bool | None] = []
        for (prompt, completion), out in zip(samples, outs, strict=True):
            try:
                labels.append(verdict(self.fn.combine(out), self.threshold))
            except Exception as e:
                labels.append(self._failed(prompt, completion, e))
        return labels

    def _failed(self, prompt: Any, completion: str, e: Exception) -> None:
        """A sample the labeler failed on: counted and skipped (None) with on_error="skip", else LabelerError."""
        if self.on_error == "skip":
            self.errors += 1
            return None
        raise LabelerError(
            f"{self.field} {self.spec!r} failed on the prompt {_short(prompt)} and the completion "
            f"{_short(completion)}: {type(e).__name__}: {e}. Make it return {_CONTRACT} for every completion, "
            "or set online.on_label_error=skip to skip and count such samples"
        ) from e
