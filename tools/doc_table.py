"""docs/trl_migration.md's BCOConfig tables, generated from the `BCOConfig` dataclass (bco-ray's defaults),
`bco_ray/api/_trl_defaults.py` (trl 1.13.0's defaults, recorded from its source) and `bco_ray/api/_fields.py`
(what bco-ray does with each field).

    python -m tools.doc_table --write docs/trl_migration.md    # rewrite the generated tables
    python -m tools.doc_table --check docs/trl_migration.md    # exit 1 if they are stale

The tables sit between `<!-- BEGIN generated: NAME -->` and `<!-- END generated: NAME -->` lines; only the
notes below are prose (tests/test_trl_defaults.py checks that the doc equals what this renders).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

from bco_ray.api._fields import ROUTES, note, status, targets
from bco_ray.api._trl_defaults import (
    INTENTIONAL_DIFFERENCES,
    NOT_IN_TRL_1_13,
    TRL_1_13_BCO_FIELDS,
    TRL_1_13_DEFAULTS,
)
from bco_ray.api.config import BCOConfig
from bco_ray.console import console


def fmt(value: Any) -> str:
    """A default as the table shows it: `"text"` for strings, 5e-7 rather than 5e-07."""
    value = getattr(value, "value", value)  # transformers' enums (OptimizerNames, ...) as their values
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, float):
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", repr(value)).replace("e+", "e")
    return repr(value)


def bco_defaults() -> dict[str, Any]:
    """bco-ray BCOConfig's declared defaults, in field order (`ignored_fields` left out)."""
    out = {}
    for f in dataclasses.fields(BCOConfig):
        if f.name != "ignored_fields":
            out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def extras() -> list[str]:
    """bco-ray's own fields (Ray, MLflow, inputs): neither trl 1.13's (recorded, or a TrainingArguments field) nor an
    older trl/transformers name."""
    from transformers import TrainingArguments

    hf = {f.name for f in dataclasses.fields(TrainingArguments)}
    known = set(TRL_1_13_DEFAULTS) | set(NOT_IN_TRL_1_13) | set(TRL_1_13_BCO_FIELDS) | hf
    return [n for n in bco_defaults() if n not in known and n in ROUTES]


def _target(name: str) -> str:
    """mapped: the bco-ray fields it sets; honoured: used by the API itself; ignored: no effect."""
    kind = status(name)
    if kind == "mapped":
        return ", ".join(f"`{t}`" for t in targets(name))
    return "honoured (API)" if kind == "honoured" else "ignored"


def _trl_default(name: str, default: Any) -> str:
    if name in TRL_1_13_DEFAULTS:
        return fmt(TRL_1_13_DEFAULTS[name][0])
    if name in NOT_IN_TRL_1_13:
        return f"— ({NOT_IN_TRL_1_13[name]})"
    return fmt(default)  # a TrainingArguments field that trl inherits unchanged: declared from transformers' own


def render_fields_table() -> str:
    """| BCOConfig field | default | trl 1.13 default | bco-ray | notes |, one row per TRL-named field: mapped (the
    bco-ray fields it sets), honoured by the API, or ignored (with why)."""
    rows = ["| BCOConfig field | default | trl 1.13 default | bco-ray | notes |", "|---|---|---|---|---|"]
    extra = set(extras())
    for name, default in bco_defaults().items():
        if name not in extra:
            rows.append(
                f"| `{name}` | {fmt(default)} | {_trl_default(name, default)} | {_target(name)} | {_cell(note(name))} |"
            )
    differ = [f"`{n}` ({why})" for n, why in INTENTIONAL_DIFFERENCES.items()]
    rows += ["", "Defaults that differ from trl 1.13's, on purpose: " + "; ".join(differ) + "."]
    return "\n".join(rows)


def render_extras_table() -> str:
    """| field | default | bco-ray field | notes |, one row per bco-ray extra."""
    rows = ["| field | default | bco-ray field | notes |", "|---|---|---|---|"]
    defaults = bco_defaults()
    for name in extras():
        rows.append(f"| `{name}` | {fmt(defaults[name])} | {_target(name)} | {_cell(note(name))} |")
    return "\n".join(rows)


TABLES = {"bcoconfig-fields": render_fields_table, "bcoconfig-extras": render_extras_table}


def sync(doc: str) -> str:
    """`doc` with every generated block replaced by what the renderers give now."""
    for name, render in TABLES.items():
        begin, end = f"<!-- BEGIN generated: {name} -->", f"<!-- END generated: {name} -->"
        if begin not in doc or end not in doc:
            raise ValueError(f"the doc has no '{begin}' ... '{end}' block")
        head, rest = doc.split(begin, 1)
        _, tail = rest.split(end, 1)
        doc = f"{head}{begin}\n{render()}\n{end}{tail}"
    return doc


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("--write", "--check"):
        console(__doc__, sys.stderr)
        return 2
    path = Path(argv[1])
    doc = path.read_text()
    new = sync(doc)
    if argv[0] == "--write":
        path.write_text(new)
        return 0
    if new != doc:
        console(f"{path}: generated tables are stale; run python -m tools.doc_table --write {path}", sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
