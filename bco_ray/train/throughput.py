"""One MFU definition (model FLOPs and the GPUs' peak FLOP/s), used by the training loop's `mfu` metric and the
benchmarks. MFU = achieved model FLOP/s ÷ (GPUs × peak FLOP/s).

Model FLOPs of a training step, counted per row of length L with C completion tokens (forward + backward,
Kaplan et al. / PaLM appendix B):

    6 · N_body · L  +  6 · d · V · C  +  12 · layers · d · L²

* N_body = every parameter except the input embedding table and the output projection: the decoder
  blocks and final norm (357.9 M of Qwen2.5-0.5B's 494.0 M). The input embedding is a lookup (no FLOPs).
* The output projection (d × V, counted whether or not it is tied to the input embedding) runs only on the
  C completion positions: BCO needs the log-prob of completion tokens only, and bco-ray runs the head on
  those alone; counting it for every token would credit work that is not needed nor done.
* 12 · layers · d · L² is PaLM's attention term (QKᵀ and AV, forward and backward, non-causal) per row:
  packed rows attend within themselves, so the term is Σ L², not (Σ L)².
* Recomputation (activation checkpointing, the head's chunks in backward) is not counted.

The forward-only count (the reference pass) is a third of it. The peak is `peak_flops` (dense bf16 989 TFLOP/s
for an H100 SXM)."""

from __future__ import annotations

import os


def flop_shape(model) -> dict:
    """N_body, head (d·V), layers and width of a model, and its parameter count (`total`, for reports; partitioned
    ZeRO-3 parameters counted whole)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    total = count_params(model)

    def numel(m):
        w = getattr(m, "weight", None)
        return int(getattr(w, "ds_numel", w.numel())) if w is not None else 0

    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and getattr(out, "weight", None) is getattr(emb, "weight", object())
    head = numel(out) if out is not None else 0
    body = total - numel(emb) - (0 if tied else head)
    return {
        "body": body,
        "head": head,
        "layers": int(cfg.num_hidden_layers),
        "hidden": int(cfg.hidden_size),
        "total": total,
    }


def train_flops(shape: dict, tokens: int, sum_len_sq: int, completion_tokens: int) -> float:
    """Model FLOPs of training on rows with Σ L = tokens, Σ L² = sum_len_sq, Σ C = completion_tokens."""
    return (
        6.0 * shape["body"] * tokens
        + 6.0 * shape["head"] * completion_tokens
        + 12.0 * shape["layers"] * shape["hidden"] * sum_len_sq
    )


def forward_flops(shape: dict, tokens: int, sum_len_sq: int, completion_tokens: int) -> float:
    return train_flops(shape, tokens, sum_len_sq, completion_tokens) / 3.0


def row_work(lengths, prompt_lens) -> tuple[int, int, int]:
    """(Σ L, Σ L², Σ C) of rows."""
    lengths = [int(x) for x in lengths]
    comp = sum(max(0, n - max(int(p), 1)) for n, p in zip(lengths, prompt_lens))
    return sum(lengths), sum(x * x for x in lengths), comp


def mfu(flops: float, seconds: float, gpus: int, peak: float) -> float:
    return flops / max(seconds, 1e-12) / (max(gpus, 1) * peak)


def count_params(model) -> int:
    """Every parameter once (a tied head is the input embedding's)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in {id(p): p for p in model.parameters()}.values())


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
