"""One MFU definition, used by the training loop's `mfu` metric and by bench/train.py.

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

The forward-only count (the reference pass) is a third of it. MFU = FLOPs ÷ seconds ÷ (GPUs × peak); the
peak is `bco_ray.tracking.throughput.peak_flops` (dense bf16 989 TFLOP/s for an H100 SXM)."""

from __future__ import annotations


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
