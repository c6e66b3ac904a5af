"""The DeepSpeed config a worker's engine is built from, derived from the typed TrainConfig."""

from __future__ import annotations

from bco_ray.config.schema import TrainConfig
from bco_ray.models import use_bf16


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
    if not on_gpu:
        # No fused CUDA kernel on CPU. With offload_optimizer on a machine without GPUs, the optimizer already runs
        # in CPU memory: DeepSpeed's CPU Adam would only add a just-in-time build (about a minute on 2 cores).
        optimizer_params["torch_adam"] = True
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
