"""The optional liger-kernel output head (`model.liger_kernel`): the policy's completion log-probs in training
from Liger Kernel's fused linear cross-entropy (`pip install 'bco-ray[liger]'`), which never materialises more
than a chunk of logits and, for a per-token loss (`reduction="none"`), recomputes its chunks in backward instead
of saving them. -log p(target) per token is exactly the per-token cross-entropy, so it replaces the chunked
`TokenLogps` path of bco_ray/bco/head_logps.py one for one; tests/test_liger.py checks both against a float64
reference, values and gradients (equal to float32 rounding in float32; in bf16 Liger rounds the logits'
gradient to bf16 before scaling it by each token's upstream gradient, so the gradients agree to bf16 rounding).

Liger's kernels are Triton kernels: they run on a CUDA device, or on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, how the tests run them). Anywhere else the plain path is used. A model instance opts in
with `head_logps.use_liger_kernel(model, device)`; `logit_head(model)` then carries the flag.

Where the plain path stays:
- the reference pass and evaluation (no gradients): Liger saves no memory there, and it reads a token count back
  to the host on each call, which the plain path never does (tests/test_no_host_sync.py);
- soft-capped heads (Gemma-style `final_logit_softcapping`): Liger's soft-capping kernel does not run under
  Triton's interpreter, so it could not be checked here;
- a LoRA-wrapped head, and a head whose weight ZeRO-3 partitions (the config refuses ZeRO-3 with this option).
"""

from __future__ import annotations

import importlib.util
import os

import torch

INSTALL_HINT = "pip install 'bco-ray[liger]' (liger-kernel, which brings triton)"


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def liger_runs_on(device: torch.device) -> bool:
    """Triton runs here: a CUDA device, or CPU tensors under Triton's interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def liger_token_logps(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    h: torch.Tensor,
    targets: torch.Tensor,
    scale: float | None,
) -> torch.Tensor:
    """log p(target) per row of the hidden states `h` [N, H] under the head `h @ weight.T (+ bias)`, its logits
    multiplied by `scale` (Cohere's logit_scale, 1/Granite's logits_scaling), in float32. The scale is folded
    into the hidden states and the bias. Gradients accumulate in the weight's dtype, as the plain path's do."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if scale is not None:  # (h·s)Wᵀ + b·s = s·(hWᵀ + b)
        h = h * scale
        bias = bias * scale if bias is not None else None
    nll = liger_fused_linear_cross_entropy(h, weight, targets, bias=bias, reduction="none")
    return -nll.float()
