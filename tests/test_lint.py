"""`ruff check` and `ruff format --check` (pyproject.toml's [tool.ruff]) pass on the whole repository, as `make lint`
runs them; every Python file stays under 400 lines."""

from __future__ import annotations

import ast
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


def test_ruff_format_leaves_nothing_to_change():
    ruff = Path(sys.executable).parent / "ruff"
    proc = subprocess.run(
        [str(ruff), "format", "--check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, "run `make fmt`:\n" + proc.stdout[-6000:] + proc.stderr[-2000:]


def test_every_python_file_is_under_400_lines():
    long = {
        str(p.relative_to(ROOT)): n for p in ROOT.glob("[!.]*/**/*.py") if (n := len(p.read_text().splitlines())) >= 400
    }
    assert not long, f"split these into modules with one job each: {long}"


def test_every_function_of_the_package_is_under_60_lines():
    long = {}
    for p in [*ROOT.glob("bco_ray/**/*.py"), *ROOT.glob("jobs/*.py")]:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long[f"{p.relative_to(ROOT)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert not long, f"split these into named steps: {long}"
