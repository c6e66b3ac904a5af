"""Hooks a test (or a user's diagnostics) installs into the training workers: callables run before each
micro-batch and after each optimizer step, in the order installed.

Installed at worker setup from `$BCO_RAY_TRAIN_HOOKS`: comma-separated `module:function` (or
`path/to/file.py:function`) entries, each function called once with no argument to register its hooks. The
driver hands every `BCO_RAY_TRAIN_HOOK*` variable of its environment to the workers (bco_ray/job/train_stage.py),
so hooks can read their own settings from variables of that prefix."""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

ENV = "BCO_RAY_TRAIN_HOOKS"
ENV_PREFIX = "BCO_RAY_TRAIN_HOOK"  # every variable with it travels from the driver to the workers


@dataclass(frozen=True)
class StepEnd:
    """What a hook sees after optimizer step `step` of this rank."""

    step: int
    rank: int
    world: int
    storage_dir: str
    micro_batches: list  # the step's typed micro-batches (bco_ray/train/batches.py)

    @property
    def row_ids(self) -> list[int]:
        """The ids of the rows the step trained on (empty when the data has none)."""
        return [int(r) for b in self.micro_batches if b.row_ids is not None for r in b.row_ids]


_before: list[Callable] = []
_after: list[Callable[[StepEnd], None]] = []


def before_micro_batch(fn: Callable) -> Callable:
    """Register `fn(step, batch)`: called before the forward of each micro-batch of optimizer step `step`."""
    _before.append(fn)
    return fn


def at_step_end(fn: Callable[[StepEnd], None]) -> Callable[[StepEnd], None]:
    """Register `fn(StepEnd)`: called after each optimizer step, before any log, evaluation or checkpoint."""
    _after.append(fn)
    return fn


def run_before(step: int, batch) -> None:
    for fn in _before:
        fn(step, batch)


def run_step_end(end: StepEnd) -> None:
    for fn in _after:
        fn(end)


def clear() -> None:
    _before.clear()
    _after.clear()


def install_from_env() -> None:
    """Call each `module:function` of $BCO_RAY_TRAIN_HOOKS (see the module docstring), hooks installed before gone."""
    clear()
    for entry in filter(None, (e.strip() for e in os.environ.get(ENV, "").split(","))):
        where, _, name = entry.rpartition(":")
        if not where or not name:
            raise ValueError(f"${ENV}: {entry!r} is not module:function")
        if where.endswith(".py"):
            spec = importlib.util.spec_from_file_location(f"bco_ray_train_hooks_{len(_before)}_{len(_after)}", where)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        getattr(module, name)()


def env_for_workers(environ=os.environ) -> dict[str, str]:
    """The driver's `BCO_RAY_TRAIN_HOOK*` variables, for the workers' runtime env."""
    return {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}
