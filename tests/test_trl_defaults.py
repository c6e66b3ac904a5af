"""bco-ray's `BCOConfig` defaults equal trl 1.13.0's (recorded from trl's source, file:line per field, in
bco_ray/api/_trl_defaults.py; trl itself is not needed here), and docs/trl_migration.md's field tables are the
generated ones."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import pytest

from bco_ray import BCOConfig
from bco_ray.api._trl_defaults import INTENTIONAL_DIFFERENCES, NOT_IN_TRL_1_13, TRL_1_13_BCO_FIELDS, TRL_1_13_DEFAULTS

from tools.doc_table import bco_defaults, extras, fmt, main, sync

DOC = Path(__file__).resolve().parents[1] / "docs" / "trl_migration.md"


@pytest.mark.parametrize("name", sorted(TRL_1_13_DEFAULTS))
def test_bco_config_default_equals_trl_1_13(name):
    ours, (theirs, source) = bco_defaults()[name], TRL_1_13_DEFAULTS[name]
    assert re.match(r"^(trl|transformers)/[\w/]+\.py( \([\d.]+\))?:\d+", source), source
    if name in INTENTIONAL_DIFFERENCES:
        assert ours != theirs, f"{name} now equals trl's default: drop it from INTENTIONAL_DIFFERENCES"
    else:
        assert ours == theirs and type(ours) is type(theirs), (name, ours, theirs, source)


def test_learning_rate_is_trls_5e_7():
    """trl 1.13's BCOConfig overrides TrainingArguments' 5e-5 (bco_config.py:82)."""
    assert BCOConfig().learning_rate == 5e-7 and BCOConfig().to_config().train.lr == 5e-7


def test_every_field_is_classified_and_every_trl_field_is_accepted():
    """A BCOConfig field is trl 1.13's (recorded default), an older trl/transformers name, or a bco-ray extra;
    every field of trl 1.13's BCOConfig is accepted (declared, or ignored with a warning), never a TypeError."""
    names = set(bco_defaults())
    assert set(TRL_1_13_DEFAULTS) <= names and set(NOT_IN_TRL_1_13) <= names
    assert not set(TRL_1_13_DEFAULTS) & set(NOT_IN_TRL_1_13)
    assert set(INTENTIONAL_DIFFERENCES) <= set(TRL_1_13_DEFAULTS)
    from transformers import TrainingArguments

    hf = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert {f.name for f in dataclasses.fields(TrainingArguments) if f.init and not f.name.startswith("_")} <= names
    assert set(TRL_1_13_BCO_FIELDS) <= names  # every trl 1.13 BCOConfig field is a real dataclass field
    assert set(extras()) == names - set(TRL_1_13_DEFAULTS) - set(NOT_IN_TRL_1_13) - hf - set(TRL_1_13_BCO_FIELDS)
    assert "num_workers" in extras() and "learning_rate" not in extras()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in TRL_1_13_BCO_FIELDS:
            value = bco_defaults().get(name, TRL_1_13_DEFAULTS.get(name, (None,))[0])
            BCOConfig(**{name: value})


def test_post_init_effects_match_trl():
    """Values a script reads after construction: output_dir None -> "trainer_output" (TrainingArguments)."""
    assert BCOConfig().output_dir == "trainer_output" and BCOConfig(output_dir="o").output_dir == "o"
    assert dataclasses.replace(BCOConfig(), seed=1).output_dir == "trainer_output"


def test_doc_tables_are_the_generated_ones():
    doc = DOC.read_text()
    assert sync(doc) == doc, "run: python -m tools.doc_table --write docs/trl_migration.md"
    assert main(["--check", str(DOC)]) == 0
    assert "| `learning_rate` | 5e-7 | 5e-7 | `train.lr` |" in doc


def test_sync_replaces_a_stale_table(tmp_path):
    stale = DOC.read_text().replace("| `learning_rate` | 5e-7 |", "| `learning_rate` | 5e-5 |")
    path = tmp_path / "doc.md"
    path.write_text(stale)
    assert main(["--check", str(path)]) == 1
    assert main(["--write", str(path)]) == 0 and path.read_text() == DOC.read_text()
    with pytest.raises(ValueError, match="BEGIN generated"):
        sync("no markers here")


def test_fmt():
    assert [fmt(5e-7), fmt(3.0), fmt(10), fmt("linear"), fmt(None), fmt(True)] == [
        "5e-7",
        "3.0",
        "10",
        '`"linear"`',
        "None",
        "True",
    ]
