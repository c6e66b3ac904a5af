"""The typed config: reference defaults, YAML + `--a.b=c` overrides, type coercion, and errors that name
the offending field."""

import os
from pathlib import Path

import pytest

from bco_ray.config.schema import Config, ConfigError, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_reference_defaults():
    cfg = load_config()
    assert cfg.train.lr == 5e-7
    assert cfg.train.beta == 0.1
    assert cfg.train.warmup_ratio == 0.1
    assert cfg.data.max_length == 1024
    assert cfg.data.max_prompt_length == 512
    assert cfg.udm.prompt_sample_size == 1024
    assert cfg.udm.min_density_ratio == 0.5
    assert cfg.udm.max_density_ratio == 10.0
    assert cfg.udm.enabled is True
    assert cfg.model.reference is None
    assert cfg.precompute.ref_actors == (1, 1)
    assert cfg == Config()


def test_to_dict_round_trip():
    """The driver ships cfg.to_dict() to the workers, which rebuild it with load_config(overrides=...)."""
    cfg = load_config(overrides=["--train.lr=1e-6", "--precompute.ref_actors=[1,3]", "--model.reference=x"])
    assert load_config(overrides=cfg.to_dict()) == cfg
    flat = cfg.flat()
    assert flat["train.lr"] == 1e-6 and flat["train.lora.r"] == 16 and flat["precompute.ref_actors"] == (1, 3)


def test_tiny_yaml_loads():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    assert cfg.data.max_length == 64 and cfg.data.max_prompt_length == 48
    assert cfg.udm.prompt_sample_size == 512
    assert cfg.train.lr == 5e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.policy == "builtin:tiny-qwen2-sft" and cfg.eval.generate and cfg.eval.verifier
    assert cfg.train.max_steps == 60 and cfg.train.micro_batch_size == 16
    assert cfg.mlflow.experiment == "bco-ray-tiny"
    assert cfg.train.beta == 0.1  # not set there: reference default


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "train:\n  lr: 1.0e-4\n  beta: 0.2\n  lora:\n    r: 4\ndata:\n  max_length: 128\n  max_prompt_length: 64\n"
    )
    cfg = load_config(p, ["--train.lr=2e-5", "--train.lora.alpha", "8", "--data.max_prompt_length=100"])
    assert cfg.train.lr == 2e-5  # override wins over the file
    assert cfg.train.beta == 0.2  # file wins over the default
    assert cfg.train.lora.r == 4 and cfg.train.lora.alpha == 8  # nested merge keeps siblings
    assert cfg.data.max_length == 128 and cfg.data.max_prompt_length == 100
    # overrides as a dict merge the same way
    cfg = load_config(p, {"train": {"lora": {"alpha": 9}}})
    assert cfg.train.lora.r == 4 and cfg.train.lora.alpha == 9 and cfg.train.lr == 1e-4
    assert cfg.data.max_prompt_length == 64


def test_empty_yaml_file(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_config(p) == Config()


def test_parse_overrides_forms():
    """`--a.b=c`, `--a.b c` and bare flags nest the same way; values are typed by load_config (below)."""
    argv = [
        "--train.lr=1e-6",
        "--udm.enabled",
        "false",
        "--precompute.force",
        "--train.num_workers",
        "4",
        "--train.lora.enabled",
    ]
    parsed = parse_overrides(argv)
    assert parsed.keys() == {"train", "udm", "precompute"}
    assert parsed["train"].keys() == {"lr", "num_workers", "lora"} and parsed["train"]["lora"].keys() == {"enabled"}
    assert parsed["precompute"]["force"] in (True, "true")  # a bare flag means true
    assert parsed["train"]["lora"]["enabled"] in (True, "true")  # ... also as the last argument
    cfg = load_config(overrides=argv)
    assert (cfg.train.lr, cfg.udm.enabled, cfg.precompute.force, cfg.train.num_workers, cfg.train.lora.enabled) == (
        1e-6,
        False,
        True,
        4,
        True,
    )
    # a negative number after a space is a value, not a flag
    assert parse_overrides(["--train.max_failures", "-1"]) == {"train": {"max_failures": "-1"}}
    assert load_config(overrides=["--train.max_failures", "-1"]).train.max_failures == -1
    assert parse_overrides([]) == {}
    with pytest.raises(ConfigError, match="unexpected argument 'train.lr=1'"):
        parse_overrides(["train.lr=1"])


def test_overrides_and_coercion():
    cfg = load_config(
        overrides=[
            "--train.lr=1e-6",  # YAML 1.1 reads "1e-6" as a string: coerced to float
            "--train.beta",
            "1",  # int → float
            "--train.num_workers=4",
            "--train.micro_batch_size=2.0",  # integral float → int
            "--udm.enabled",
            "no",
            "--precompute.force",  # bare flag → True
            "--train.use_gpu=True",
            "--precompute.ref_actors",
            "2,4",  # comma list → tuple[int, int]
            "--precompute.local_shuffle_max_rows=1000",
            "--train.lora.target_modules=q_proj,v_proj",
            "--model.reference=none",  # optional field → None
            "--model.tokenizer=null",
            "--mlflow.run_name=my-run",
            "--output_dir=/tmp/x",
        ]
    )
    assert cfg.train.lr == 1e-6 and isinstance(cfg.train.lr, float)
    assert cfg.train.beta == 1.0 and isinstance(cfg.train.beta, float)
    assert cfg.train.num_workers == 4 and isinstance(cfg.train.num_workers, int)
    assert cfg.train.micro_batch_size == 2 and isinstance(cfg.train.micro_batch_size, int)
    assert cfg.udm.enabled is False
    assert cfg.precompute.force is True and cfg.train.use_gpu is True
    assert cfg.precompute.ref_actors == (2, 4) and cfg.precompute.local_shuffle_max_rows == 1000
    assert cfg.train.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.reference is None and cfg.model.tokenizer is None
    assert cfg.mlflow.run_name == "my-run" and cfg.output_dir == "/tmp/x"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--train.lrr=1"], "unknown config field 'train.lrr'. Did you mean 'train.lr'?"),
        (["--trian.lr=1"], "unknown config field 'trian'. Did you mean 'train'?"),
        (["--train.lora.alhpa=1"], "unknown config field 'train.lora.alhpa'. Did you mean 'train.lora.alpha'?"),
        (["--train.num_workers=abc"], "config field 'train.num_workers': expected an integer, got 'abc'"),
        (["--train.micro_batch_size=1.5"], "config field 'train.micro_batch_size': expected an integer, got 1.5"),
        (["--train.num_workers=true"], "config field 'train.num_workers': expected an integer, got True"),
        (["--train.lr=fast"], "config field 'train.lr': expected a number, got 'fast'"),
        (["--udm.enabled=maybe"], "config field 'udm.enabled': expected true/false, got 'maybe'"),
        (["--precompute.ref_actors=[1,2,3]"], "config field 'precompute.ref_actors': expected 2 values"),
        (["--train.lora=5"], "config field 'train.lora': expected a mapping of LoraConfig fields"),
        (["--train.beta=0"], "train.beta must be > 0 (got 0.0)"),
        (["--train.beta=-0.1"], "train.beta must be > 0 (got -0.1)"),
        (["--train.zero_stage=5"], "train.zero_stage must be 0, 1, 2 or 3 (got 5)"),
        (["--udm.min_density_ratio=11"], "udm.min_density_ratio (11.0) must be <= udm.max_density_ratio (10.0)"),
        (["--data.max_prompt_length=1024"], "data.max_prompt_length (1024) must be > 0 and < data.max_length (1024)"),
        (
            ["--data.max_length=256", "--data.max_prompt_length=300"],
            "data.max_prompt_length (300) must be > 0 and < data.max_length (256)",
        ),
        (["--train.num_workers=0"], "train.num_workers must be >= 1 (got 0)"),
        (["--train.offload_params"], "train.offload_params needs train.zero_stage=3"),
    ],
)
def test_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert message in str(e.value)


def test_unknown_key_without_close_match_lists_fields():
    with pytest.raises(ConfigError, match=r"unknown config field 'train.zzzzzz'. Known fields: num_workers, "):
        load_config(overrides=["--train.zzzzzz=1"])


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(p)
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  beta: 0.0\n")
    with pytest.raises(ConfigError, match=r"train\.beta must be > 0"):
        load_config(p)
    p.write_text("udm:\n  min_density_ratio: 3\n  max_density_ratio: 2\n")
    with pytest.raises(ConfigError, match=r"udm\.min_density_ratio \(3\.0\) must be <= udm\.max_density_ratio"):
        load_config(p)


def test_string_overrides_are_kept_verbatim():
    cfg = load_config(
        overrides=[
            "--model.revision=0123456",  # a numeric-looking commit: YAML octal → '42798'
            "--mlflow.run_name=on",  # YAML 1.1 bool → 'True'
            "--mlflow.experiment=1.10",  # float → '1.1'
            "--model.policy=org/m: v2",
        ]
    )  # a mapping → "expected a string" error
    assert cfg.model.revision == "0123456"
    assert cfg.mlflow.run_name == "on"
    assert cfg.mlflow.experiment == "1.10"
    assert cfg.model.policy == "org/m: v2"


@pytest.mark.parametrize(
    "text, value", [("true", True), ("false", False), ("auto", "auto"), ("True", True), ('"true"', True), ("no", False)]
)
def test_yaml_bf16_takes_yaml_values(tmp_path, text, value):
    """`train.bf16: true` is YAML's boolean: accepted (and kept as a bool), as are auto and the quoted text."""
    p = tmp_path / "c.yaml"
    p.write_text(f"train:\n  bf16: {text}\n")
    override = "--train.bf16=" + text.strip('"')
    for got in (load_config(p).train.bf16, load_config(overrides=[override]).train.bf16):
        assert got == value and type(got) is type(value)


def test_choice_fields_take_yaml_native_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "model:\n  dtype: bfloat16\ndata:\n  on_bad_rows: skip\n"
        "train:\n  lr_scheduler: Cosine\n  zero_stage: 3\n  offload_params: true\n"
    )
    cfg = load_config(p, ["--train.zero_stage=3"])
    assert (cfg.model.dtype, cfg.data.on_bad_rows, cfg.train.lr_scheduler) == ("bfloat16", "skip", "cosine")
    assert cfg.train.zero_stage == 3 and type(cfg.train.zero_stage) is int
    assert load_config(overrides=cfg.to_dict()) == cfg  # the workers' round trip
    p.write_text('train:\n  zero_stage: "1"\n')
    assert load_config(p).train.zero_stage == 1


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("train:\n  bf16: ture\n", "train.bf16 must be auto, true or false (got 'ture'). Did you mean 'true'?"),
        ("train:\n  bf16: 1\n", "train.bf16 must be auto, true or false (got 1)"),
        (
            "train:\n  lr_scheduler: cosin\n",
            "train.lr_scheduler must be linear, cosine or constant (got 'cosin'). Did you mean 'cosine'?",
        ),
        ("train:\n  zero_stage: true\n", "train.zero_stage must be 0, 1, 2 or 3 (got True)"),
        ("data:\n  on_bad_rows: skp\n", "data.on_bad_rows must be error or skip (got 'skp'). Did you mean 'skip'?"),
        (
            "model:\n  dtype: bf16\n",
            "model.dtype must be auto, float32, bfloat16 or float16 (got 'bf16'). Did you mean 'bfloat16'?",
        ),
    ],
)
def test_bad_choice_names_the_field_and_the_close_match(tmp_path, yaml_text, message):
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert message in str(e.value)


def test_validate_checks_choices_of_a_config_built_in_code():
    from bco_ray.config.schema import validate

    cfg = Config()
    cfg.train.lr_scheduler = "polynomial"
    with pytest.raises(ConfigError, match="train.lr_scheduler must be linear, cosine or constant"):
        validate(cfg)
    cfg = Config()
    cfg.train.bf16 = True
    validate(cfg)


def test_use_bf16_reads_the_typed_field():
    from bco_ray.config.schema import TrainConfig
    from bco_ray.models import use_bf16
    from bco_ray.train.ds_config import deepspeed_config

    assert [use_bf16(TrainConfig(bf16="auto"), gpu) for gpu in (True, False)] == [True, False]
    assert [use_bf16(TrainConfig(bf16=True), gpu) for gpu in (True, False)] == [True, True]
    assert [use_bf16(TrainConfig(bf16=False), gpu) for gpu in (True, False)] == [False, False]
    assert use_bf16(TrainConfig(bf16="false"), True) is False  # the old text spelling, built in code
    assert deepspeed_config(load_config(overrides=["--train.bf16=true"]).train, 1, False)["bf16"] == {"enabled": True}


def test_cpu_jobs_use_torch_adamw_and_gpu_offload_keeps_deepspeeds_cpu_adam():
    """No JIT-built CPU Adam where there is no GPU (offloaded or not); GPU jobs that offload keep DeepSpeed's."""
    from bco_ray.config.schema import TrainConfig
    from bco_ray.train.ds_config import deepspeed_config

    def torch_adam(offload: bool, on_gpu: bool) -> bool:
        t = TrainConfig(zero_stage=2, offload_optimizer=offload)
        return deepspeed_config(t, 1, on_gpu)["optimizer"]["params"].get("torch_adam", False)

    assert [torch_adam(offload, False) for offload in (False, True)] == [True, True]
    assert [torch_adam(offload, True) for offload in (False, True)] == [False, False]


def test_deepspeed_jit_builds_are_pinned_to_this_environment(monkeypatch, tmp_path):
    """One build directory per Python environment and that environment's ninja: two environments (or a venv's
    ninja and the system's) no longer rebuild each other's DeepSpeed ops; a directory the user set is kept."""
    import sys

    from bco_ray.train.jit_builds import pin_jit_builds

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin")
    pin_jit_builds()
    first = os.environ["TORCH_EXTENSIONS_DIR"]
    assert "bco-ray-" in first and first == (pin_jit_builds() or os.environ["TORCH_EXTENSIONS_DIR"])
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    pin_jit_builds()
    assert os.environ["TORCH_EXTENSIONS_DIR"] != first
    has_ninja = os.path.exists(os.path.join(os.path.dirname(sys.executable), "ninja"))
    assert os.environ["PATH"].startswith(os.path.dirname(sys.executable)) == has_ninja
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    pin_jit_builds()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")
