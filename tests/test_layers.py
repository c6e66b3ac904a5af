"""The package's layers point down only, read from the source with `ast` (every import, at module level or inside
a function): a module imports its own package's modules and those of lower tiers, never a sibling or a higher
tier; no module uses another package's private (`_name`) functions or modules; nothing imports Ray's private
`ray.*._internal` modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Tiers, lowest first. A module may import from its own package and from any lower tier.
TIERS = [
    {"errors"},
    {
        "console",
        "builtin",
        "storage",
        "bco",
        "assets",
    },  # foundations: no bco-ray imports but errors
    {"remote"},  # models on object storage, copied to the node
    {"config"},  # the typed config and its checks and docs
    {"models", "data"},  # loading models; reading and checking data
    {"tracking"},  # MLflow, Hub, plots: used by driver and workers
    {"precompute", "train", "eval"},
    {"online"},  # online BCO: its rounds use eval (verifier, generation) and train (the PolicyUpdater)
    {"job"},  # one job, driver side: run, checks, the train stage, preflight, resources, signals
    {"api", "cli"},  # the Python API and the command line
    {"jobs", "init"},  # the job scripts; bco_ray/__init__ (the API)
]
# bco_ray/__init__.py is the API's front door (its own tier).
PACKAGE_OF = {"__init__": "init"}
# Known leaks, each to be removed; the test fails if one of them is fixed and still listed (stale entry).
ALLOWED: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    files = sorted((ROOT / "bco_ray").rglob("*.py")) + sorted((ROOT / "jobs").glob("*.py"))
    return {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f for f in files}


def _package(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "jobs":
        return "jobs"
    name = parts[1] if len(parts) > 1 else "init"
    return PACKAGE_OF.get(name, name)


def _tier(package: str) -> int:
    return next(i for i, tier in enumerate(TIERS) if package in tier)


def _imports(tree: ast.AST) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) of every absolute import, at any depth (functions, TYPE_CHECKING);
    in `from bco_ray.x import y`, y may be a module (bco_ray.x.y) or a name of bco_ray.x."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.module, a.name, node.lineno) for a in node.names]
    return out


def _imported_modules(tree: ast.AST, modules: dict[str, Path]) -> dict[str, str]:
    """{local name: bco_ray module} for the modules a file imports as names (`from bco_ray.data import formats`)."""
    out = {}
    for module, name, _ in _imports(tree):
        if name and f"{module}.{name}" in modules:
            out[name] = f"{module}.{name}"
    return out


def _violations() -> list[str]:
    modules = _modules()
    found = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        me = _package(mod)
        for target, name, line in _imports(tree):
            where = f"{path.relative_to(ROOT)}:{line}"
            full = f"{target}.{name}" if name and f"{target}.{name}" in modules else target
            if (mod, full) in ALLOWED:
                continue
            if "._internal" in f".{target}" and target.split(".")[0] == "ray":
                found.append(f"{where}: imports Ray's private {target}")
            if target.split(".")[0] != "bco_ray" or target == "bco_ray":
                continue
            other = _package(full)
            if other == me:
                continue
            if any(p.startswith("_") and p != "__init__" for p in full.split(".")) or (
                name and name.startswith("_") and full == target
            ):
                found.append(f"{where}: imports the private {full}{'' if full != target else '.' + name}")
            if _tier(other) >= _tier(me):
                found.append(
                    f"{where}: {mod} ({me}, tier {_tier(me)}) imports {full} ({other}, tier "
                    f"{_tier(other)}): layers point down only"
                )
        for local, target in _imported_modules(tree, modules).items():
            if _package(target) == me:
                continue
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id == local
                    and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                ):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: uses the private {target}.{node.attr}")
    return sorted(set(found))


def test_layers_point_down_and_no_private_names_cross_packages():
    assert _violations() == []


def test_every_package_has_a_tier_and_the_allow_list_is_current():
    modules = _modules()
    packages = {_package(m) for m in modules}
    assert packages <= set().union(*TIERS), packages - set().union(*TIERS)
    imported = set()
    for mod, path in modules.items():
        for target, name, _ in _imports(ast.parse(path.read_text())):
            imported.add((mod, f"{target}.{name}" if name and f"{target}.{name}" in modules else target))
    stale = {pair for pair in ALLOWED if pair not in imported}
    assert not stale, f"fixed leaks still in ALLOWED: {stale}"
