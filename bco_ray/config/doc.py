"""The config's fields as the command line documents them: dotted name, type, default and the one-line doc that
is the field's comment in its dataclass (a comment continued on the lines below it is joined into one line; a
definition `ruff format` spread over several lines has its comment on one of them)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any

import yaml

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s?(.*))?$")
_COMMENT_ONLY = re.compile(r"^\s+#\s?(.*)$")


@dataclass(frozen=True)
class FieldDoc:
    name: str  # dotted: train.lr
    type: str  # as annotated (str | None, Literal['linear', 'cosine']); a number with its range: 'float, > 0'
    default: Any
    doc: str


def _continues(line: str) -> bool:
    """A line inside a field's definition spread over several lines (`= field(`, `default_factory=...`, `)`)."""
    text = line.strip()
    return bool(text) and (text[0] in ")]}" or "=" in text)


@functools.cache  # reading a class's source takes milliseconds: once per class (a range error reads it too)
def _comments(cls: type) -> dict[str, str]:
    """{field: its trailing comment, continuation lines joined} from the dataclass's source."""
    out: dict[str, str] = {}
    last = None
    for line in inspect.getsource(cls).splitlines()[1:]:
        only = _COMMENT_ONLY.match(line)
        if only and last is not None:
            out[last] = f"{out[last]} {only.group(1).strip()}".strip()
            continue
        m = _FIELD.match(line)
        if m and m.group(1) in {f.name for f in dataclasses.fields(cls)}:
            last = m.group(1)
            out[last] = (m.group(2) or "").strip()
        elif last is not None and not out[last] and "#" in line:  # a definition formatted over several lines
            out[last] = line.split("#", 1)[1].strip()
        elif not _continues(line):
            last = None
    return out


def _type_name(tp: Any) -> str:
    text = tp if isinstance(tp, str) else getattr(tp, "__name__", repr(tp))
    return str(text).replace("typing.", "")


def field_docs(cls: type, prefix: str = "") -> list[FieldDoc]:
    """Every leaf field of the dataclass `cls` (nested sections flattened), in declaration order."""
    docs = _comments(cls)
    hints = typing.get_type_hints(cls)
    raw = {f.name: f.type for f in dataclasses.fields(cls)}
    out: list[FieldDoc] = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(field_docs(hints[f.name], f"{prefix}{f.name}."))
        else:
            allowed = f", {f.metadata['range']}" if "range" in f.metadata else ""  # int, >= 1
            out.append(FieldDoc(prefix + f.name, _type_name(raw[f.name]) + allowed, default, docs.get(f.name, "")))
    return out


def show(value: Any) -> str:
    """A value as it is written in YAML or on the command line: null, true, 1e-06, [1, 1], text."""
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
