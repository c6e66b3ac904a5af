"""`ruff check` (the rules in pyproject.toml's [tool.ruff]) passes on the whole repository, as `make lint` runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    ruff = Path(sys.executable).parent / "ruff"
    assert ruff.exists(), "ruff is a dev dependency: pip install -e '.[dev]'"
    proc = subprocess.run(
        [str(ruff), "check", "--no-cache", "--output-format", "concise", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
