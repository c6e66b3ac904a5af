"""The optimizer step of bench/train.py: backward, clipping and AdamW, as plain torch (ZeRO 0) or a
single-process DeepSpeed engine built from bco-ray's own `deepspeed_config` (ZeRO 2 / 3, world size 1)."""

from __future__ import annotations

import os
import shutil

import common as C  # bench/common.py: a script's directory is first on sys.path; bco_ray is installed
import torch


class Updater:
    """backward + clip + AdamW step: plain torch (zero 0) or a world-size-1 DeepSpeed engine (2, 3), with
    `gas` micro-batches (padded) or a variable number of packs (packed) per optimizer step."""

    def __init__(self, model, zero: int, a, device, dtype, gas: int = 1):
        self.engine, self.gas = None, gas
        if zero == 0:
            self.module = model
            self.opt = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad],
                lr=a.lr,
                betas=(0.9, 0.999),
                eps=1e-8,
                weight_decay=0.0,
                fused=device.type == "cuda",
            )
            return
        import deepspeed

        from bco_ray.config.schema import TrainConfig
        from bco_ray.train.ds_config import deepspeed_config

        init_distributed(device)
        t = TrainConfig(
            zero_stage=zero,
            micro_batch_size=1,
            gradient_accumulation_steps=gas,
            lr=a.lr,
            bf16="true" if dtype == torch.bfloat16 else "false",
        )
        cfg = deepspeed_config(t, 1, device.type == "cuda")
        if device.type == "cuda" and ds_torch_adam(a.ds_adam):
            cfg["optimizer"]["params"]["torch_adam"] = True
        self.engine, *_ = deepspeed.initialize(
            model=model, config=cfg, model_parameters=[p for p in model.parameters() if p.requires_grad]
        )
        self.module = self.engine.module
        self.optimizer_name = type(self.engine.optimizer).__name__

    @property
    def model(self):
        """What the forward runs on: the DeepSpeed engine itself (as the training loop passes it to `bco_forward`:
        the forward must run through the engine for ZeRO-3's micro-step bookkeeping), or the plain model at zero 0."""
        return self.engine if self.engine is not None else self.module

    def step(self, loss: torch.Tensor, batch: dict | None = None, last: bool = True) -> None:
        """Back-propagate one micro-batch's loss (the trainer's `micro_batch_loss`); `last` closes the step."""
        from bco_ray.train.batches import PackedBatch

        packed = isinstance(batch, PackedBatch)
        if self.engine is not None:  # as bco_ray.train.updater.train_step
            if packed:
                self.engine.set_gradient_accumulation_boundary(last)
            self.engine.backward(loss, scale_wrt_gas=not packed)
            self.engine.step()
            return
        (loss if packed else loss / self.gas).backward()
        if last:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        if self.engine is not None and hasattr(self.engine, "destroy"):
            try:
                self.engine.destroy()
            except Exception as e:  # the figures are in; only clean-up failed
                print(f"DeepSpeed engine.destroy() failed: {type(e).__name__}: {e}", flush=True)
        self.engine = self.module = self.opt = None
        C.free_memory()


def ds_torch_adam(choice: str) -> bool:
    if choice != "auto":
        return choice == "torch"
    try:
        from deepspeed.git_version_info import installed_ops

        if installed_ops.get("fused_adam"):
            return False
    except Exception:
        pass
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return not (shutil.which("nvcc") or os.path.exists(f"{cuda_home}/bin/nvcc"))


def init_distributed(device) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sk.getsockname()[1])
    if device.type == "cuda":
        torch.cuda.set_device(0)
    from bco_ray.train import jit_builds

    jit_builds.init_distributed("nccl" if device.type == "cuda" else "gloo")
