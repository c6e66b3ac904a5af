"""Peak FLOP/s of GPUs, the denominator of model FLOPs utilisation (MFU) in the per-step metrics
(bco_ray/train/recipe.py) and the benchmarks; the FLOP count is bco_ray/train/throughput.py's.
MFU = achieved FLOP/s ÷ (GPUs × peak FLOP/s)."""

from __future__ import annotations

import os

# Dense peak tensor throughput in FLOP/s per GPU (no sparsity), by a substring of the device name, most
# specific first. fp32 matmuls are assumed to run on TF32 tensor cores where the GPU has them.
PEAK_FLOPS = [
    ("GH200", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 418e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),
    ("H800", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),
    ("B200", {"bf16": 2250e12, "fp16": 2250e12, "fp32": 1100e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    ("A800", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12}),
    ("L40", {"bf16": 181e12, "fp16": 181e12, "fp32": 90e12}),
    ("A10G", {}),  # no published peak: no MFU rather than the A10's number
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 62e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
]


def peak_flops(device_name: str, dtype: str = "bf16") -> float | None:
    """Peak FLOP/s of one GPU for a dtype ("bf16", "fp16", "fp32"), or None when unknown.
    `$BCO_RAY_PEAK_TFLOPS` overrides the table (e.g. for a GPU it does not know)."""
    env = os.environ.get("BCO_RAY_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    for key, peaks in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return peaks.get(dtype) or peaks.get("fp16")
    return None
