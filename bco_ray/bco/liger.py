"""The optional liger-kernel output head (`model.liger_kernel`): the completion tokens' log-probs from Liger
Kernel's fused linear cross-entropy (`pip install 'bco-ray[liger]'`), which never materialises more than a chunk
of logits and, for a per-token loss (`reduction="none"`), recomputes its chunks in backward instead of saving
them. -log p(target) per token is exactly the per-token cross-entropy, so it replaces the chunked
`TokenLogps` path of bco_ray/bco/head_logps.py one for one; tests/test_liger.py checks both against a float64
reference, values and gradients.

Liger's kernels are Triton kernels: they run on a CUDA device, or on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, how the tests run them). Anywhere else the plain path is used. A model instance opts in
with `use_liger_kernel(model)`; `logit_head(model)` then carries the flag.

Soft-capped heads (Gemma-style `final_logit_softcapping`) keep the plain path: Liger's soft-capping kernel does
not run under Triton's interpreter, so it could not be checked here; a LoRA-wrapped head keeps it too.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch
from torch import nn

log = logging.getLogger(__name__)

LIGER_ATTR = "_bco_ray_liger_kernel"  # set in a model instance's own __dict__ by use_liger_kernel
INSTALL_HINT = "pip install 'bco-ray[liger]' (liger-kernel, which brings triton)"


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def liger_runs_on(device: torch.device) -> bool:
    """Triton runs here: a CUDA device, or CPU tensors under Triton's interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def use_liger_kernel(model: nn.Module, device: torch.device) -> bool:
    """Score this model instance's output head with Liger Kernel where it can run (see `liger_runs_on`); the
    plain path otherwise, with a warning. Returns whether it will."""
    if not liger_installed():
        raise RuntimeError(f"model.liger_kernel=true but liger-kernel is not installed: {INSTALL_HINT}")
    ok = liger_runs_on(device)
    if ok:
        log.info("model.liger_kernel: the output head's log-probs by Liger Kernel on %s", device)
    else:
        log.warning("model.liger_kernel: Triton does not run on %s; the output head uses the plain path", device)
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper's model
    hf.__dict__[LIGER_ATTR] = ok
    return ok


def liger_token_logps(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    h: torch.Tensor,
    targets: torch.Tensor,
    scale: float | None,
) -> torch.Tensor:
    """log p(target) per row of the hidden states `h` [N, H] under the head `h @ weight.T (+ bias)`, its logits
    multiplied by `scale` (Cohere's logit_scale, 1/Granite's logits_scaling), in float32. The scale is folded
    into the hidden states, which equals scaling the logits when there is no bias."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if scale is not None:
        if bias is not None:
            raise ValueError("model.liger_kernel: a scaled output head with a bias is not supported")
        h = h * scale
    nll = liger_fused_linear_cross_entropy(h, weight, targets, bias=bias, reduction="none", accum_dtype=torch.float32)
    return -nll.float()
