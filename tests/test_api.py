"""The drop-in Python API (`from bco_ray import BCOConfig, BCOTrainer`), without Ray: BCOConfig maps TRL's field
names onto the bco-ray config, keeps trl 1.13's defaults and truncation, rejects unknown fields and bad values
naming the field; BCOTrainer checks its arguments and stores in-memory inputs once. The real runs are in
tests/test_api_runs.py.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest

from bco_ray import BCOConfig, BCOTrainer
from bco_ray.api import BCOConfigWarning
from bco_ray.builtin import ASSETS, materialize_tiny_model
from bco_ray.config.schema import ConfigError

TRAIN_ROWS = [json.loads(line) for line in (ASSETS / "arithmetic" / "train.jsonl").read_text().splitlines()[:48]]
# The settings of TRL's snippet as tests/test_api_runs.py runs it (those of trl's recorded step-1 log)
SNIPPET = dict(
    per_device_train_batch_size=16, gradient_accumulation_steps=1, learning_rate=1e-3, logging_steps=1, beta=0.1
) | dict(bf16=False, use_cpu=True, run_name="snippet")


# =============================================================================== BCOConfig, no Ray
def test_trl_field_names_map_onto_the_bco_ray_config(tmp_path):
    args = BCOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=2,
        gradient_accumulation_steps=3,
        learning_rate=1e-6,
        num_train_epochs=2,
        max_steps=40,
        warmup_ratio=0.05,
        lr_scheduler_type="cosine",
        logging_steps=5,
        eval_strategy="steps",
        eval_steps=10,
        save_steps=20,
        seed=7,
        bf16=False,
        gradient_checkpointing=False,
        beta=0.2,
        max_length=256,
        max_prompt_length=128,
        prompt_sample_size=64,
        min_density_ratio=0.2,
        max_density_ratio=5.0,
        precompute_ref_log_probs=True,
        report_to="mlflow",
        run_name="r",
        deepspeed={"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}},
        num_workers=2,
        use_gpu=False,
        storage_path=str(tmp_path / "ray"),
        mlflow_tracking_uri="sqlite:///x.db",
        mlflow_experiment="e",
    )
    cfg = args.to_config()
    t, d, u = cfg.train, cfg.data, cfg.udm
    assert cfg.output_dir == str(tmp_path)
    assert (t.micro_batch_size, t.gradient_accumulation_steps, t.lr, t.num_epochs, t.max_steps) == (4, 3, 1e-6, 2, 40)
    assert (t.warmup_ratio, t.lr_scheduler, t.logging_steps, t.eval_steps, t.save_steps) == (0.05, "cosine", 5, 10, 20)
    assert (t.seed, d.seed, t.bf16, t.gradient_checkpointing, t.beta) == (7, 7, False, False, 0.2)
    assert (d.max_length, d.max_prompt_length) == (256, 128)
    assert (u.prompt_sample_size, u.min_density_ratio, u.max_density_ratio) == (64, 0.2, 5.0)
    assert (t.zero_stage, t.offload_optimizer, t.num_workers, t.use_gpu) == (3, True, 2, False)
    assert t.storage_path == str(tmp_path / "ray")
    assert (cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.mlflow.run_name) == ("sqlite:///x.db", "e", "r")


def test_trl_defaults():
    """trl 1.13's BCOConfig defaults (all of them, from its source: tests/test_trl_defaults.py) as bco-ray runs them."""
    args = BCOConfig()
    assert args.learning_rate == 5e-7 and args.output_dir == "trainer_output"
    cfg = args.to_config()
    assert cfg.train.lr == 5e-7 and cfg.train.num_epochs == 3 and cfg.train.micro_batch_size == 8
    assert cfg.train.logging_steps == 10 and cfg.train.save_steps == 500 and cfg.train.eval_steps == 0
    assert cfg.train.beta == 0.1 and cfg.train.warmup_ratio == 0.0 and cfg.train.gradient_checkpointing is True
    # trl 1.13 has no prompt limit: unset, max_prompt_length is max_length - 1 (the prompt is not cut)
    assert cfg.data.max_length == 1024 and cfg.data.max_prompt_length == 1023
    assert cfg.train.num_workers == 1 and cfg.train.bf16 == "auto"
    assert cfg.udm.prompt_sample_size == 1024 and (cfg.udm.min_density_ratio, cfg.udm.max_density_ratio) == (0.5, 10)
    assert cfg.model.trust_remote_code is False
    assert BCOConfig(trust_remote_code=True).to_config().model.trust_remote_code is True  # a trl 1.13 field


def test_max_length_alone_runs_with_trl_1_13_truncation():
    """A TRL script that sets only max_length gets a valid prompt limit, max_length - 1, with which bco-ray's
    truncation keeps the prompt whole and cuts the completion to the budget left, as trl 1.13 does."""
    from bco_ray.data.tokenize import _build

    cfg = BCOConfig(max_length=128).to_config()
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (128, 127)
    assert BCOConfig(max_length=128, max_prompt_length=32).to_config().data.max_prompt_length == 32  # set: kept
    with pytest.warns(BCOConfigWarning, match="max_length=None: using 512"):
        cfg = BCOConfig(max_length=None).to_config()  # trl 1.13's BCOTrainer: 512
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (512, 511)
    # trl 1.13 (_process_tokens): budget = max_length - 1 (BOS) - 1 (EOS); completion[: budget - len(prompt)]
    bos, eos, max_length = 1, 2, 16
    prompt, completion = list(range(10, 20)), list(range(30, 40))  # 10 + 10 tokens > 16 - 2
    _, ids, prompt_len = _build(
        prompt, prompt + completion, bos=bos, eos=eos, max_length=max_length, max_prompt_length=max_length - 1
    )
    trl = [bos] + prompt + completion[: max_length - 2 - len(prompt)] + [eos]
    assert ids == trl and prompt_len == 1 + len(prompt) and len(ids) == max_length


def test_unknown_fields_error_and_meaningless_ones_warn():
    with pytest.raises(TypeError, match=r"unknown field.*'learning_rat'.*did you mean 'learning_rate'"):
        BCOConfig(output_dir="o", learning_rat=1e-6)
    with pytest.raises(TypeError, match="'not_a_field'"):
        BCOConfig(not_a_field=1)
    with pytest.warns(BCOConfigWarning, match="remove_unused_columns"):
        args = BCOConfig(output_dir="o", remove_unused_columns=False)
    assert args.ignored_fields == {"remove_unused_columns": False}
    with pytest.warns(BCOConfigWarning, match="always precomputes"):
        BCOConfig(precompute_ref_log_probs=False)
    with pytest.warns(BCOConfigWarning, match="MLflow only"):
        BCOConfig(report_to=["wandb"])
    with pytest.warns(BCOConfigWarning, match="max_completion_length"):
        BCOConfig(max_completion_length=128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BCOConfig(output_dir="o", beta=0.3, report_to="mlflow")  # no warning for mapped fields
    # copies keep working (dataclasses.replace goes through __init__)
    assert dataclasses.replace(BCOConfig(beta=0.3), seed=3).beta == 0.3


def test_bad_values_name_the_bco_config_field():
    with pytest.raises(ConfigError, match=r"train\.beta must be > 0.*BCOConfig field: beta"):
        BCOConfig(beta=0).to_config()
    with pytest.raises(ConfigError, match="BCOConfig field: max_length, max_prompt_length"):
        BCOConfig(max_length=64, max_prompt_length=64).to_config()
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        BCOConfig(lr_scheduler_type="polynomial").to_config()
    with pytest.raises(ValueError, match="truncation_mode"):
        BCOConfig(truncation_mode="keep_start")


def test_steps_ratios_warmup_steps_and_overrides():
    cfg = BCOConfig(
        max_steps=100,
        logging_steps=0.05,
        warmup_steps=10,
        eval_strategy="steps",
        save_strategy="no",
        bco_ray_overrides={"train.zero_stage": 1, "udm": {"max_embed_length": 64}},
    ).to_config()
    assert cfg.train.logging_steps == 5 and cfg.train.eval_steps == 5 and cfg.train.save_steps == 0
    assert cfg.train.zero_stage == 1 and cfg.udm.max_embed_length == 64
    assert __import__("math").ceil(cfg.train.warmup_ratio * 100) == 10  # exactly 10 warmup steps
    with pytest.raises(ValueError, match="warmup_steps"):
        BCOConfig(warmup_steps=10).to_config()  # no max_steps: no exact ratio


def test_peft_config_maps_to_lora(tmp_path):
    peft = pytest.importorskip("peft")
    path = materialize_tiny_model(tmp_path / "m", seed=0)
    trainer = BCOTrainer(
        model=str(path),
        args=BCOConfig(output_dir=str(tmp_path / "o")),
        train_dataset=TRAIN_ROWS,
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]),
    )
    lora = trainer.config.train.lora
    assert (lora.enabled, lora.r, lora.alpha, lora.dropout, lora.target_modules) == (
        True,
        4,
        8,
        0.1,
        ["q_proj", "v_proj"],
    )
    assert trainer.config.model.policy == str(path)  # an id/path is passed through, not copied
    assert trainer.config.udm.enabled is False  # UDM only with an embedding function
    assert Path(trainer.config.data.train).suffix == ".parquet"


def test_trainer_argument_checks_and_inputs_saved_once(tmp_path):
    from datasets import Dataset, DatasetDict
    from transformers import AutoModelForCausalLM

    path = str(materialize_tiny_model(tmp_path / "m", seed=0))
    args = BCOConfig(output_dir=str(tmp_path / "o"))
    model = AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="processing_class"):
        BCOTrainer(model=model, args=args, train_dataset=TRAIN_ROWS)
    with pytest.raises(TypeError, match=r"DatasetDict: pass one split"):
        BCOTrainer(model=path, args=args, train_dataset=DatasetDict({"train": Dataset.from_list(TRAIN_ROWS)}))
    with pytest.raises(ValueError, match="both embedding_func and embedding_tokenizer"):
        BCOTrainer(model=path, args=args, train_dataset=TRAIN_ROWS, embedding_func=lambda **kw: None)
    with pytest.warns(BCOConfigWarning, match="callbacks"):
        first = BCOTrainer(
            model=model,
            ref_model=model,
            args=args,
            processing_class=path,
            train_dataset=Dataset.from_list(TRAIN_ROWS),
            callbacks=[object()],
        )
    second = BCOTrainer(
        model=model,
        ref_model=AutoModelForCausalLM.from_pretrained(path),
        args=args,
        processing_class=path,
        train_dataset=TRAIN_ROWS,
    )
    # the same weights and rows are stored once; ref_model=model (or an identical copy) means no separate reference
    assert first.config.model.policy == second.config.model.policy and first.config.model.reference is None
    assert second.config.model.reference is None and first.config.data.train == second.config.data.train
    assert len(list((tmp_path / "o" / "inputs" / "models").iterdir())) == 1
    assert len(list((tmp_path / "o" / "inputs" / "data").iterdir())) == 1  # and no temporary file left behind


def test_a_config_file_stating_the_trainers_settings_runs_the_trainers_job(tmp_path):
    """BCOTrainer.train() and `jobs/bco.py --config <yaml>` hand their Config to the same bco_ray.job.run.run_job:
    a config file stating the trainer's settings by hand loads to the trainer's model, data, UDM and training
    settings, and the config.yaml a run logs loads back to the whole Config, so the config-file path runs the very
    job the trainer ran (whose step 1 tests/test_api_runs.py checks against trl 1.13's log)."""
    from bco_ray.config.schema import load_config
    from bco_ray.tracking.mlflow_run import config_yaml

    policy = str(materialize_tiny_model(tmp_path / "policy", seed=0))
    reference = str(materialize_tiny_model(tmp_path / "reference", seed=1))
    args = BCOConfig(output_dir=str(tmp_path / "out"), **SNIPPET, max_steps=1)
    trainer = BCOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        processing_class=policy,
        train_dataset=TRAIN_ROWS[:16],
        eval_dataset=TRAIN_ROWS[16:32],
    )
    cfg = trainer.config
    (tmp_path / "job.yaml").write_text(f"""
output_dir: {tmp_path / "outputs"}
model:
  policy: {policy}
  reference: {reference}
data:
  train: {cfg.data.train}
  eval: {cfg.data.eval}
  max_prompt_length: 1023   # trl 1.13 never cuts the prompt: max_length (1024) less one token
udm:
  enabled: false
train:
  num_workers: 1
  micro_batch_size: 16
  gradient_accumulation_steps: 1
  beta: 0.1
  lr: 1.0e-3
  warmup_ratio: 0.0
  max_steps: 1
  logging_steps: 1
""")
    by_hand = load_config(tmp_path / "job.yaml")
    assert (by_hand.model.policy, by_hand.model.reference) == (cfg.model.policy, cfg.model.reference)
    assert by_hand.data == cfg.data and by_hand.udm == cfg.udm
    for f in ("num_workers", "micro_batch_size", "gradient_accumulation_steps", "beta", "lr", "warmup_ratio"):
        assert getattr(by_hand.train, f) == getattr(cfg.train, f), f
    for f in ("max_steps", "seed", "zero_stage", "lr_scheduler", "weight_decay", "max_grad_norm"):
        assert getattr(by_hand.train, f) == getattr(cfg.train, f), f
    (tmp_path / "logged.yaml").write_text(config_yaml(cfg))
    assert load_config(tmp_path / "logged.yaml") == cfg
