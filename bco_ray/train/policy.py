"""The policy a worker trains: built from the config (dtype, dropout off, gradient checkpointing, LoRA), and
saved in Hugging Face format at the end (and for generation-eval snapshots)."""

from __future__ import annotations

import contextlib
import copy
import os

import deepspeed
import torch
from transformers import AutoTokenizer

from bco_ray.bco.head_logps import use_liger_kernel
from bco_ray.config.schema import Config
from bco_ray.models import load_causal_lm
from bco_ray.remote import local_model_dir
from bco_ray.train.ds_config import use_bf16
from bco_ray.train.zero3_save import consolidated_state_dict


def build_policy(cfg: Config, policy_path: str, on_gpu: bool):
    t = cfg.train
    model = load_causal_lm(
        policy_path,
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
        dtype=torch.bfloat16 if use_bf16(t, on_gpu) else torch.float32,
    )
    if t.disable_dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        if hasattr(model.config, "attention_dropout"):
            model.config.attention_dropout = 0.0
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if t.lora.enabled:
        from peft import LoraConfig, get_peft_model  # optional dependency: only with LoRA

        model = get_peft_model(
            model,
            LoraConfig(
                r=t.lora.r,
                lora_alpha=t.lora.alpha,
                lora_dropout=t.lora.dropout,
                # peft's "all-linear" shorthand is a string (every linear layer but the output head)
                target_modules="all-linear" if t.lora.target_modules == ["all-linear"] else t.lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    if cfg.model.liger_kernel:
        use_liger_kernel(model, torch.device("cuda" if on_gpu else "cpu"))
    return model


def save_final_model(
    model, out_dir: str, tokenizer_path: str, rank: int, zero_stage: int, lora_merged: bool = False
) -> None:
    """Hugging Face format (safetensors + tokenizer + generation config). ZeRO-3: gathered to rank 0 one layer
    at a time (bco_ray/train/zero3_save.py), not the whole model on every rank; only a merged LoRA model, built
    from the whole model, gathers it all.
    With LoRA, `out_dir` holds the adapter (loadable with peft) and, if asked, `out_dir/merged` the merged model."""
    full_gather = zero_stage == 3 and lora_merged
    state = consolidated_state_dict(model, rank) if zero_stage == 3 and not full_gather else None
    ctx = (
        deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
        if full_gather
        else contextlib.nullcontext()
    )
    with ctx:
        if rank == 0:
            tok = AutoTokenizer.from_pretrained(local_model_dir(tokenizer_path, weights=False))
            if state is None:
                state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
            tok.save_pretrained(out_dir)
            if lora_merged and hasattr(model, "merge_and_unload"):
                merged = copy.deepcopy(model).merge_and_unload()
                merged.save_pretrained(os.path.join(out_dir, "merged"), safe_serialization=True)
                tok.save_pretrained(os.path.join(out_dir, "merged"))
