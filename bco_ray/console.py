"""The one way bco-ray writes to the terminal: `console(line)`. Progress lines users and tests look for
(`[bco-ray] ...`) and a command's own output go through it; diagnostics go through `logging`. No imports
beyond the standard library: any module may use it."""

from __future__ import annotations

import sys


def console(line: str, stream=None) -> None:
    """Write one line to this process's stdout (or `stream`, e.g. sys.stderr) without calling `print`.

    Ray Train (2.60) replaces `builtins.print` in its workers (RAY_TRAIN_ENABLE_PRINT_PATCH, on by default) with
    a function that logs the text on the root logger, whose console handler writes it to stderr, and, because a
    Ray worker's `sys.stdout` is not `sys.__stdout__`, also prints it as before: both streams reach the driver,
    so every `print` of a worker appears there twice. A direct write appears once."""
    stream = stream if stream is not None else sys.stdout
    stream.write(line + "\n")
    stream.flush()
