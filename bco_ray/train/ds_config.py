"""The DeepSpeed config a worker's engine is built from, derived from the typed TrainConfig; where DeepSpeed builds
its just-in-time ops."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from bco_ray.config import TrainConfig
from bco_ray.models import use_bf16


def pin_jit_builds() -> None:
    """DeepSpeed JIT-builds its CPU ops (the gloo comm op, CPU Adam) under TORCH_EXTENSIONS_DIR with the first `ninja`
    on PATH. Two Python environments, or one venv's ninja and the system's, read each other's build as stale and
    rebuild it (~20 s on 2 cores) each time they alternate. So, unless the user set it, each environment builds in
    its own directory, with the ninja installed next to this interpreter when there is one."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        tag = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path.home() / ".cache" / "torch_extensions" / f"bco-ray-{tag}")
    bin_dir, path = os.path.dirname(sys.executable), os.environ.get("PATH", "")
    if os.path.exists(os.path.join(bin_dir, "ninja")) and not path.startswith(bin_dir + os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path


def deepspeed_config(t: TrainConfig, world_size: int, on_gpu: bool) -> dict:
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage >= 1:
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True, reduce_bucket_size=5e7)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if t.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    optimizer_params = {"lr": t.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": t.weight_decay}
    if not on_gpu and not t.offload_optimizer:
        optimizer_params["torch_adam"] = True  # no fused CUDA kernel on CPU
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * world_size,
        "gradient_clipping": t.max_grad_norm,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "bf16": {"enabled": use_bf16(t, on_gpu)},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
        "steps_per_print": 10**9,
    }
