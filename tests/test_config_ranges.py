"""Config values checked before any Ray work (fast tier, no Ray): every int and float field declares its range and
a value outside it is a ConfigError naming the field, the value and the range; malformed YAML names the file and
the line; an output/cache/checkpoint/MLflow directory that cannot be written fails before Ray, naming the field."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import typing

import pytest

from bco_ray.config.checks import in_range, parse_range
from bco_ray.config.schema import Config, ConfigError, load_config, validate
from bco_ray.errors import EXIT_CODES

from harness import ROOT


def _ranged_fields(cls=Config, prefix: str = "") -> dict[str, dataclasses.Field]:
    """{dotted name: field} of every int or float leaf field (Literal and tuple fields excluded)."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_ranged_fields(tp, f"{prefix}{f.name}."))
        elif tp in (int, float):
            out[prefix + f.name] = f
    return out


def test_every_numeric_field_declares_a_range_its_default_is_in():
    fields = _ranged_fields()
    assert len(fields) >= 40  # the walk found the sections' numbers
    for name, f in fields.items():
        assert "range" in f.metadata, f"{name}: declare its allowed values with ranged(default, '...')"
        parse_range(f.metadata["range"])  # readable
        assert in_range(f.default, f.metadata["range"]), name


# (override, the field the error names): one bad value for every range-checked field (the test below checks that
# the table covers them all), and non-finite floats.
RANGE_CASES = [
    ("--data.max_length=1", "data.max_length"),
    ("--data.max_prompt_length=0", "data.max_prompt_length"),
    ("--data.seed=-1", "data.seed"),
    ("--data.seed=4294967296", "data.seed"),
    ("--data.driver_check_rows=-1", "data.driver_check_rows"),
    ("--udm.prompt_sample_size=1", "udm.prompt_sample_size"),
    ("--udm.min_density_ratio=0", "udm.min_density_ratio"),
    ("--udm.min_density_ratio=nan", "udm.min_density_ratio"),
    ("--udm.max_density_ratio=inf", "udm.max_density_ratio"),
    ("--udm.max_density_ratio=-1", "udm.max_density_ratio"),
    ("--udm.max_embed_length=0", "udm.max_embed_length"),
    ("--precompute.batch_size=0", "precompute.batch_size"),
    ("--precompute.token_budget=0", "precompute.token_budget"),
    ("--precompute.local_shuffle_max_rows=-1", "precompute.local_shuffle_max_rows"),
    ("--precompute.num_gpus_per_actor=-0.5", "precompute.num_gpus_per_actor"),
    ("--precompute.num_gpus_per_actor=inf", "precompute.num_gpus_per_actor"),
    ("--precompute.logp_chunk_size=0", "precompute.logp_chunk_size"),
    ("--train.num_workers=0", "train.num_workers"),
    ("--train.cpus_per_worker=-1", "train.cpus_per_worker"),
    ("--train.micro_batch_size=0", "train.micro_batch_size"),
    ("--train.bucket_window=0", "train.bucket_window"),
    ("--train.micro_batch_tokens=-2", "train.micro_batch_tokens"),
    ("--train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps"),
    ("--train.lr=-1e-6", "train.lr"),
    ("--train.lr=inf", "train.lr"),
    ("--train.lr=nan", "train.lr"),
    ("--train.beta=0", "train.beta"),
    ("--train.beta=nan", "train.beta"),
    ("--train.warmup_ratio=1", "train.warmup_ratio"),
    ("--train.warmup_ratio=-0.1", "train.warmup_ratio"),
    ("--train.weight_decay=-1", "train.weight_decay"),
    ("--train.max_grad_norm=-1", "train.max_grad_norm"),
    ("--train.max_grad_norm=inf", "train.max_grad_norm"),
    ("--train.num_epochs=0", "train.num_epochs"),
    ("--train.max_steps=0", "train.max_steps"),
    ("--train.max_steps=-2", "train.max_steps"),
    ("--train.logging_steps=0", "train.logging_steps"),
    ("--train.eval_steps=-1", "train.eval_steps"),
    ("--train.save_steps=-1", "train.save_steps"),
    ("--train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("--train.max_failures=-2", "train.max_failures"),
    ("--train.seed=-1", "train.seed"),
    ("--train.resources_timeout_s=0", "train.resources_timeout_s"),
    ("--train.resources_timeout_s=inf", "train.resources_timeout_s"),
    ("--train.lora.r=0", "train.lora.r"),
    ("--train.lora.alpha=0", "train.lora.alpha"),
    ("--train.lora.dropout=1", "train.lora.dropout"),
    ("--eval.num_prompts=0", "eval.num_prompts"),
    ("--eval.max_new_tokens=0", "eval.max_new_tokens"),
    ("--eval.batch_size=0", "eval.batch_size"),
    ("--eval.temperature=0", "eval.temperature"),
    ("--eval.top_p=0", "eval.top_p"),
    ("--eval.top_p=1.5", "eval.top_p"),
    ("--online.prompts_per_round=0", "online.prompts_per_round"),
    ("--online.samples_per_prompt=0", "online.samples_per_prompt"),
    ("--online.rounds=0", "online.rounds"),
    ("--online.temperature=0", "online.temperature"),
    ("--online.top_p=0", "online.top_p"),
    ("--online.max_new_tokens=0", "online.max_new_tokens"),
    ("--online.threshold=nan", "online.threshold"),
    ("--online.threshold=inf", "online.threshold"),
    ("--online.replay_rounds=-1", "online.replay_rounds"),
    ("--online.undesirable_weight=-0.5", "online.undesirable_weight"),
    ("--online.eval_every=-1", "online.eval_every"),
    ("--online.rollout_cpus=0", "online.rollout_cpus"),
]


def test_the_table_covers_every_range_checked_field():
    assert {field for _, field in RANGE_CASES} == set(_ranged_fields())


@pytest.mark.parametrize("override, field", RANGE_CASES, ids=[o for o, _ in RANGE_CASES])
def test_out_of_range_value_names_field_value_and_range(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    msg, value = str(e.value), override.split("=", 1)[1]
    allowed = _ranged_fields()[field].metadata["range"]
    assert msg.startswith(f"{field} must be "), msg
    assert allowed.split(" or ")[-1] in msg and "(got " in msg and "(default: " in msg, msg
    if value in ("inf", "nan"):
        finite = "a finite number" if allowed == "finite" else f"a finite number {allowed}"
        assert f"must be {finite}" in msg and f"(got {value})" in msg, msg
    assert e.value.exit_code == EXIT_CODES["config"] == 2


@pytest.mark.parametrize(
    "override",
    [
        "--train.micro_batch_tokens=-1",  # auto: micro_batch_size × data.max_length
        "--train.micro_batch_tokens=0",  # padded micro-batches
        "--train.max_steps=-1",  # no cap
        "--train.max_failures=-1",  # Ray Train: retry without limit
        "--train.eval_steps=0",
        "--train.save_steps=0",
        "--train.warmup_ratio=0",
        "--train.lr=0",
        "--train.max_grad_norm=0",  # DeepSpeed: no clipping
        "--train.cpus_per_worker=0.5",
        "--train.seed=0",
        "--data.seed=4294967295",
        "--data.driver_check_rows=0",
        "--precompute.local_shuffle_max_rows=0",
        "--precompute.num_gpus_per_actor=0.5",
        "--train.lora.dropout=0.1",
        "--eval.top_p=1",
        "--udm.min_density_ratio=10",  # == max_density_ratio
        "--online.threshold=-3.5",  # any finite number
        "--online.eval_every=0",  # never
        "--online.replay_rounds=0",
        "--online.undesirable_weight=0",  # the desirable rows only
        "--online.top_p=1",
    ],
)
def test_boundaries_and_sentinels_stay_valid(override):
    load_config(overrides=[override])


@pytest.mark.parametrize("name", ["tiny.yaml", "qwen2.5-0.5b.yaml", "online.yaml"])
def test_shipped_configs_load(name):
    load_config(ROOT / "configs" / name)


def test_a_config_built_in_code_is_range_checked():
    cfg = Config()
    cfg.train.lr = math.inf
    with pytest.raises(ConfigError, match=r"train\.lr must be a finite number >= 0 \(got inf\)"):
        validate(cfg)
    cfg = Config()
    cfg.train.keep_checkpoints = "2"  # no loader coercion in code: not a number
    with pytest.raises(ConfigError, match=r"train\.keep_checkpoints must be a number >= 1"):
        validate(cfg)


def test_range_text():
    assert [in_range(v, "-1 or >= 0") for v in (-2, -1, -0.5, 0, 7)] == [False, True, False, True, True]
    assert [in_range(v, "[0, 1)") for v in (-0.1, 0, 0.5, 1)] == [False, True, True, False]
    assert [in_range(v, "(0, 1]") for v in (0, 1e-9, 1, 1.01)] == [False, True, True, False]
    assert [in_range(v, "> 0") for v in (0, 1e-12, math.inf, math.nan, True, "1")] == [False, True] + [False] * 4
    assert in_range(4, "< 5") and not in_range(5, "< 5") and in_range(5, "<= 5")
    with pytest.raises(ValueError, match="cannot read 'positive'"):
        parse_range("positive")


def test_udm_ratio_order_is_checked_after_the_ranges():
    with pytest.raises(ConfigError, match=r"udm\.min_density_ratio \(5\.0\) must be <= udm\.max_density_ratio"):
        load_config(overrides=["--udm.min_density_ratio=5", "--udm.max_density_ratio=2"])


@pytest.mark.parametrize(
    "text, line",
    [
        ("train:\n  lr: 1e-6\n   beta: 0.2\n", 3),  # indentation
        ("train:\n  lr: [1, 2\nudm:\n  enabled: true\n", 3),  # unclosed list
        ("data:\n\tmax_length: 64\n", 2),  # a tab
        ("train: {lr: 1\n", 2),  # unclosed mapping, at the end of the file
    ],
)
def test_malformed_yaml_names_file_and_line(tmp_path, text, line):
    p = tmp_path / "broken.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"config file {p}, line {line}, column "), str(e.value)
    assert "not valid YAML" in str(e.value)


def test_config_path_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_malformed_yaml_exits_2_without_a_traceback(tmp_path):
    """The one subprocess: the command line's exit status and message (no Ray, no job: the config fails first)."""
    p = tmp_path / "broken.yaml"
    p.write_text("train:\n  lr: 1e-6\n   beta: 0.2\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "bco.py"), "--config", str(p)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"bco-ray: config error: config file {p}, line 3" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ local directories the job writes
def _checked(tmp_path, *overrides: str):
    from bco_ray.job.checks import check_local_dirs
    from bco_ray.job.locations import resolve_locations

    cfg = load_config(
        overrides=[
            f"--output_dir={tmp_path / 'out'}",
            f"--mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *overrides,
        ]
    )
    check_local_dirs(resolve_locations(cfg))


@pytest.mark.parametrize(
    "override, field",
    [
        ("--output_dir={file}", "output_dir"),
        ("--output_dir={file}/sub", "output_dir"),
        ("--precompute.cache_dir={file}/cache", "precompute.cache_dir"),
        ("--train.storage_path=file://{file}", "train.storage_path"),
        ("--mlflow.tracking_uri=sqlite:///{file}/mlflow.db", "mlflow.tracking_uri"),
        ("--mlflow.tracking_uri=file://{file}/mlruns", "mlflow.tracking_uri"),
    ],
)
def test_a_file_where_a_directory_must_be(tmp_path, override, field):
    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(ConfigError) as e:
        _checked(tmp_path, override.format(file=file))
    msg = str(e.value)
    assert msg.startswith(f"{field}=") and f"{file} exists and is not a directory" in msg, msg
    assert f"set --{field}=" in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing created


def test_usable_and_remote_locations_pass_and_nothing_is_created(tmp_path):
    _checked(tmp_path, "--precompute.cache_dir=s3://bucket/cache", "--train.storage_path=s3://bucket/ray")
    _checked(tmp_path, "--mlflow.tracking_uri=http://127.0.0.1:5000")
    assert list(tmp_path.iterdir()) == []


def test_a_directory_that_is_not_writable(tmp_path, monkeypatch):
    import bco_ray.job.checks as job_checks

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(job_checks.os, "access", lambda p, mode: p != str(locked) and real_access(p, mode))
    with pytest.raises(ConfigError, match=rf"train\.storage_path=.*{locked} is not writable by this user"):
        _checked(tmp_path, f"--train.storage_path={locked / 'ray'}")
