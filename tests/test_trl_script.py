"""TRL users' scripts, unchanged but for the import (tests/trl_example/bco.py, in the shape of TRL's
examples/scripts/bco.py): the command line parses with `HfArgumentParser((ScriptArguments, BCOConfig,
ModelConfig))`, a YAML `--config` the way trl's `TrlParser` reads it, bool `--no_*` flags and JSON dict
strings; a `torchrun --nproc_per_node 2` launch fails at once on every rank with the fix; an `embedding_func`
written as TRL users write it reaches the actors (or fails up front). No Ray here: the script's real runs are in
tests/test_trl_script_runs.py.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
import yaml

from bco_ray import BCOConfig
from bco_ray.api import BCOConfigWarning
from bco_ray.api._conversions import LaunchError, check_launcher
from bco_ray.builtin import ASSETS, materialize_tiny_model

from harness import ROOT, job_env

SCRIPT = ROOT / "tests" / "trl_example" / "bco.py"
TRAIN_ROWS = [json.loads(line) for line in (ASSETS / "arithmetic" / "train.jsonl").read_text().splitlines()[:16]]
# TRL's documented command line for examples/scripts/bco.py (model and data paths aside)
TRL_COMMAND = (
    "--per_device_train_batch_size 16 --per_device_eval_batch_size 32 --num_train_epochs 1 --learning_rate 1e-6 "
    "--gradient_checkpointing --gradient_accumulation_steps 1 --eval_steps 0.2 --save_strategy no "
    "--output_dir bco-aligned-model --logging_first_step --max_length 2048 --max_completion_length 1024 "
    "--no_remove_unused_columns --warmup_steps 0.1 --bf16 --report_to none --use_peft --load_in_4bit "
    "--lora_target_modules all-linear --lora_r 16 --lora_alpha 16"
).split()


def script():
    """The example script as a module (its dataclasses need it registered, as a script's are in __main__)."""
    if "trl_bco_example" not in sys.modules:
        spec = importlib.util.spec_from_file_location("trl_bco_example", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return sys.modules["trl_bco_example"]


def parser():
    from transformers import HfArgumentParser

    s = script()
    return HfArgumentParser((s.ScriptArguments, BCOConfig, s.ModelConfig)), s


def test_trls_documented_command_line_parses():
    p, s = parser()
    # --load_in_4bit is trl's ModelConfig's (quantisation): this stand-in lacks it, as a user's copy may
    with pytest.warns(BCOConfigWarning) as record:
        script_args, args, model_args, rest = p.parse_args_into_dataclasses(
            ["--model_name_or_path", "m", "--dataset_name", "d", *TRL_COMMAND], return_remaining_strings=True
        )
    assert rest == ["--load_in_4bit"]
    assert (args.per_device_train_batch_size, args.bf16, args.warmup_steps, args.eval_steps) == (16, True, 0.1, 0.2)
    assert (args.save_strategy, args.logging_first_step, args.report_to, args.push_to_hub) == (
        "no",
        True,
        "none",
        False,
    )
    assert args.output_dir == "bco-aligned-model" and args.eval_strategy == "no"
    assert args.ignored_fields == {
        "max_completion_length": 1024,
        "remove_unused_columns": False,
        "logging_first_step": True,
    }
    warned = " ".join(str(w.message) for w in record)
    assert "remove_unused_columns=False has no effect in bco-ray (data is read by Ray Data)" in warned
    assert "max_completion_length=1024" in warned and "report_to='none'" in warned
    assert model_args.use_peft and model_args.lora_target_modules == "all-linear"  # one item: trl's ModelConfig
    with pytest.warns(BCOConfigWarning, match="eval_steps is ignored with eval_strategy='no'"):
        cfg = args.to_config()  # as in transformers: TRL's command line evaluates only with --eval_strategy steps
    assert (cfg.train.micro_batch_size, cfg.train.lr, cfg.train.num_epochs, cfg.train.bf16) == (16, 1e-6, 1, True)
    assert (cfg.train.warmup_ratio, cfg.train.save_steps, cfg.data.max_length) == (0.1, 0, 2048)
    lora = _lora(s.get_peft_config(model_args))
    assert lora["target_modules"] == ["all-linear"] and (lora["r"], lora["alpha"]) == (16, 16)
    # attribute writes and reads scripts do
    args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False} and args.hub_model_id is None


def _lora(pc):
    from bco_ray.api._io import _lora

    return _lora(pc)


def test_defaults_parse_silently_and_every_trl_field_is_an_argument():
    from transformers import HfArgumentParser, TrainingArguments

    p = HfArgumentParser(BCOConfig)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (args,) = p.parse_args_into_dataclasses([])
    assert args.ignored_fields == {} and args.learning_rate == 5e-7 and args.logging_steps == 10
    options = {a.dest for a in p._actions}
    for f in TrainingArguments.__dataclass_fields__.values():
        if f.init and not f.name.startswith("_"):
            assert f.name in options, f.name
    flags = {o for a in p._actions for o in a.option_strings}
    assert "ignored_fields" not in options and {"--no_gradient_checkpointing", "--no_disable_dropout"} <= flags
    assert "--per_device_train_batch_size" in p.format_help()  # the help renders (no stray % in it)


def test_bool_flags_json_dicts_and_step_counts():
    from transformers import HfArgumentParser

    p = HfArgumentParser(BCOConfig)
    (a,) = p.parse_args_into_dataclasses(
        [
            "--no_gradient_checkpointing",
            "--bf16",
            "false",
            "--use_gpu",
            "--logging_steps",
            "5",
            "--max_steps",
            "20",
            "--deepspeed",
            '{"zero_optimization": {"stage": 3}}',
            "--model_init_kwargs",
            '{"dtype": "bfloat16"}',
            "--bco_ray_overrides",
            '{"train.zero_stage": 1}',
        ]
    )
    assert (a.gradient_checkpointing, a.bf16, a.use_gpu) == (False, False, True)
    assert a.logging_steps == 5 and type(a.logging_steps) is int  # 5.0 from argparse, as TrainingArguments
    assert a.deepspeed == {"zero_optimization": {"stage": 3}} and a.model_init_kwargs == {"dtype": "bfloat16"}
    cfg = a.to_config()
    assert (cfg.train.gradient_checkpointing, cfg.train.bf16, cfg.train.logging_steps) == (False, False, 5)
    assert cfg.model.dtype == "bfloat16" and cfg.train.zero_stage == 1  # bco_ray_overrides win over deepspeed


def test_yaml_config_file_the_way_trl_parser_reads_it(tmp_path, monkeypatch):
    """trl's TrlParser.parse_args_and_config (trl 1.13, trl/scripts/utils.py) reads `--config file.yaml`: its
    `env` mapping goes to os.environ, the other keys become the parser's defaults (`set_defaults`), then the
    command line is parsed over them. trl is not installed here: this is that mechanism on HfArgumentParser."""
    p, _ = parser()
    (tmp_path / "bco.yaml").write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "m",
                "dataset_name": "d",
                "learning_rate": 1.0e-6,
                "per_device_train_batch_size": 4,
                "bf16": True,
                "gradient_checkpointing": False,
                "lora_target_modules": ["q_proj", "v_proj"],
                "deepspeed": {"zero_optimization": {"stage": 3}},
                "env": {"BCO_RAY_TEST_FROM_YAML": "1"},
            }
        )
    )
    config = yaml.safe_load((tmp_path / "bco.yaml").read_text())
    for key, value in config.pop("env").items():
        monkeypatch.setenv(key, str(value))
    p.set_defaults(**config)
    script_args, args, model_args = p.parse_args_into_dataclasses(["--per_device_train_batch_size", "2"])
    assert (args.learning_rate, args.per_device_train_batch_size, args.bf16) == (1e-6, 2, True)  # CLI over YAML
    assert args.gradient_checkpointing is False and args.deepspeed == {"zero_optimization": {"stage": 3}}
    assert model_args.lora_target_modules == ["q_proj", "v_proj"] and script_args.dataset_name == "d"
    assert args.to_config().train.zero_stage == 3


# ============================================================================== multi-process launchers
def test_check_launcher():
    check_launcher({})
    check_launcher({"WORLD_SIZE": "1", "RANK": "0"})
    with pytest.raises(LaunchError, match=r"run the script once, as `python bco.py .*--num_workers 4"):
        check_launcher({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "3"})


@pytest.mark.e2e  # starts two real torchrun processes (each imports torch and transformers)
def test_torchrun_two_processes_fail_at_once_on_every_rank(tmp_path):
    """`torchrun --nproc_per_node 2 bco.py ...`: both copies stop while parsing their arguments (before any model
    is loaded or Ray is started), with the fix; torchrun exits non-zero, nothing hangs."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "0",
        str(SCRIPT),
        "--model_name_or_path",
        "does-not-exist",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert out.count("LaunchError") >= 2, out  # every rank
    assert "python bco.py" in out and "--num_workers 2" in out
    assert "does-not-exist" not in out.replace(str(tmp_path), "")  # stopped before loading the model
    assert not (tmp_path / "out").exists() and time.time() - t0 < 240


# ========================================================================== embedding_func, as TRL writes it
def embed_prompt(input_ids, attention_mask, model):
    return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.mean(dim=1)


def _reach_actor(tmp_path, func, tok_path):
    """BCOTrainer pickles the function as it does for a run; the actor-side loader unpickles and calls it."""
    from bco_ray import BCOTrainer
    from bco_ray.precompute.embedding_func import load_embedding_func

    trainer = BCOTrainer(
        model=tok_path,
        args=BCOConfig(output_dir=str(tmp_path / "o")),
        train_dataset=TRAIN_ROWS,
        embedding_func=func,
        embedding_tokenizer=tok_path,
    )
    obj = load_embedding_func(trainer.config.udm.embedding_func)
    x = torch.tensor([[5, 6, 7, 8]])
    return obj["func"](input_ids=x, attention_mask=torch.ones_like(x))


def test_embedding_func_partial_over_a_bf16_automodel_reaches_the_actors(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import AutoModel

    path = str(materialize_tiny_model(tmp_path / "m", seed=0))
    plain = AutoModel.from_pretrained(path, dtype=torch.bfloat16, device_map="auto")
    out = _reach_actor(tmp_path, functools.partial(embed_prompt, model=plain), path)
    assert out.shape == (1, plain.config.hidden_size) and out.dtype == torch.bfloat16
    try:  # accelerate's prepare_model with mixed precision wraps forward in a wrapper accelerate will not pickle
        prepared = Accelerator(cpu=True, mixed_precision="bf16").prepare_model(AutoModel.from_pretrained(path))
        out = _reach_actor(tmp_path, functools.partial(embed_prompt, model=prepared), path)
        assert out.shape == (1, prepared.config.hidden_size) and "_original_forward" in prepared.__dict__
    finally:
        AcceleratorState._reset_state(True)


def test_embedding_funcs_that_cannot_reach_the_actors_fail_before_any_ray_work(tmp_path):
    from transformers import AutoModel

    from bco_ray.api._embedding import EmbeddingFuncPicklingError

    path = str(materialize_tiny_model(tmp_path / "m", seed=0))
    model = AutoModel.from_pretrained(path)
    model.hf_device_map = {"embed_tokens": 0, "layers": 1}  # as device_map="auto" spreads it over two GPUs
    with pytest.raises(EmbeddingFuncPicklingError, match=r"spread over \['0', '1'\].*Load it on one device"):
        _reach_actor(tmp_path, functools.partial(embed_prompt, model=model), path)
    lock = threading.Lock()

    def holds_a_lock(input_ids, attention_mask):
        with lock:
            return input_ids.float()

    with pytest.raises(EmbeddingFuncPicklingError, match=r"cannot be sent to the Ray actors.*functools.partial"):
        _reach_actor(tmp_path, holds_a_lock, path)


def test_gpu_tensors_land_on_the_actors_device():
    from bco_ray.precompute.embedding_func import on_actor_device

    p = on_actor_device(torch.ones(2), True, False)
    assert isinstance(p, torch.nn.Parameter) and not p.requires_grad
    assert p.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
