"""Each round's prompts (`online.prompts`), deterministic in (seed, round) so a resumed run asks what the killed one
would have asked: a data spec's distinct prompts, read once through the one reader (bco_ray/data/reader.py) and
cycled in passes, each pass a permutation seeded by (seed, pass); or a prompt function `"module:function"`
called as `function(round, n, seed) -> list of n prompts` (generated tasks)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from bco_ray.data.formats import DataFormatError
from bco_ray.data.reader import UnitCheck, iter_unit, plan_units
from bco_ray.errors import InputError
from bco_ray.eval.generation import import_function

Prompt = Any  # a text prompt, or a conversation (a list of {"role", "content"} messages) as the reader gives it
_FUNCTION = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_DATA_PREFIXES = ("builtin:", "hf:")


class PromptsError(InputError, ValueError):
    """online.prompts cannot give prompts: the message says why and what to give."""


def is_function_spec(spec: str) -> bool:
    """ "package.module:function" (not a data spec such as builtin:..., hf:..., a path or a URI)."""
    return bool(_FUNCTION.fullmatch(spec)) and not spec.startswith(_DATA_PREFIXES)


def read_prompts(spec: str, on_bad_rows: str = "error") -> list[Prompt]:
    """The distinct prompts of a data spec, in reading order, read through the one reader (a paired row's
    prompt once; a row with a prompt and no completion columns, as TRL's GRPO datasets have, its prompt).
    Raises PromptsError naming online.prompts."""
    seen: set[str] = set()
    out: list[Prompt] = []
    try:
        for unit in plan_units(spec, "online"):
            check, checked = UnitCheck(unit, on_bad_rows), 0
            for index, row in iter_unit(unit):
                units = _prompt_only(row, unit.source, index)
                if units is None:
                    units, checked = check(index, row), checked + 1
                for u in units:
                    key = json.dumps(u["prompt"], ensure_ascii=False, sort_keys=True)
                    if key not in seen:
                        seen.add(key)
                        out.append(u["prompt"])
            if checked or not out:
                check.finish()
    except (DataFormatError, FileNotFoundError, ValueError) as e:
        raise PromptsError(f"online.prompts {spec!r}: {e}") from e
    if not out:
        raise PromptsError(f"online.prompts {spec!r} has no prompts: give data with a prompt column")
    return out


_ANSWER_COLUMNS = frozenset({"completion", "label", "chosen", "rejected"})


def _prompt_only(row: Any, source: str, index: int) -> list[dict] | None:
    """[{"prompt": p}] for a prompt-only row (a "prompt" column, none of the answer columns; other columns are
    the user's), checked: a non-empty text or a list of messages. None for any other row (the reader checks it)."""
    if not isinstance(row, dict) or "prompt" not in row or _ANSWER_COLUMNS & set(row):
        return None
    p = row["prompt"]
    if not ((isinstance(p, str) and p.strip()) or (isinstance(p, list) and p and all(isinstance(m, dict) for m in p))):
        raise PromptsError(
            f"{source} row {index}: the prompt must be a non-empty text or a list of messages, got {p!r:.80}"
        )
    return [{"prompt": p}]


class PromptSource:
    """`round(r, n)`: round r's n prompts. From a list of prompts (a data spec's), the rounds walk an endless
    sequence of passes over them, pass p a permutation seeded by (seed, p): round r takes positions
    [r·n, (r+1)·n), wrapping into the next pass. From a function, `function(r, n, seed)`."""

    def __init__(self, seed: int, prompts: list[Prompt] | None = None, function: Callable | None = None, spec=""):
        if (prompts is None) == (function is None):
            raise ValueError("give prompts or a function")
        self.seed, self.prompts, self.function, self.spec = seed, prompts, function, spec
        self._perms: dict[int, np.ndarray] = {}

    @classmethod
    def from_spec(cls, spec: str, seed: int, on_bad_rows: str = "error") -> PromptSource:
        """`online.prompts` as the config gives it. Raises PromptsError naming online.prompts."""
        if is_function_spec(spec):
            return cls(seed, function=_load_function(spec), spec=spec)
        return cls(seed, prompts=read_prompts(spec, on_bad_rows), spec=spec)

    def round(self, r: int, n: int) -> list[Prompt]:
        if self.function is not None:
            return self._call(r, n)
        m = len(self.prompts)
        return [self.prompts[self._perm(i // m)[i % m]] for i in range(r * n, (r + 1) * n)]

    def _perm(self, p: int) -> np.ndarray:
        if p not in self._perms:
            self._perms = {p: np.random.default_rng([self.seed, p]).permutation(len(self.prompts))}
        return self._perms[p]

    def _call(self, r: int, n: int) -> list[Prompt]:
        try:
            out = self.function(r, n, self.seed)
        except Exception as e:
            raise PromptsError(
                f"online.prompts {self.spec!r} raised {type(e).__name__}: {e} for round {r} (n={n}, "
                f"seed={self.seed}); it is called as function(round, n, seed) -> list of n prompts"
            ) from e
        ok = isinstance(out, (list, tuple)) and len(out) == n and all(isinstance(p, str) and p for p in out)
        if not ok:
            shown = f"{type(out).__name__} of {len(out)}" if isinstance(out, (list, tuple)) else type(out).__name__
            raise PromptsError(
                f"online.prompts {self.spec!r} returned {shown} for round {r} (n={n}); it must return a list of "
                "n non-empty prompt strings"
            )
        return list(out)


def _load_function(spec: str) -> Callable:
    hint = ", or give a data spec (a file, a directory, hf:..., builtin:...)"
    return import_function(spec, "online.prompts", PromptsError, hint)
