"""Policy update: bco-ray's training step versus a naive baseline, in one process, on the same rows and weights.

  ours      precompute: the `RefLogps` stage over all rows (timed: it is part of end-to-end), then the
            trainer's own step (bco_ray.train.forward.micro_batch_loss + backward + optimizer step, as bco_ray.train.updater.train_step). Default
            (--bucketing packed, the trainer's default): each optimizer step's --micro-batch-size ×
            --gradient-accumulation-steps rows packed to --micro-batch-tokens tokens (bco_ray.data.packing).
            --bucketing trainer: today's padded step (fixed --micro-batch-size rows, `length_bucketed` over
            --bucket-window micro-batches); budget: a bench-only token-budget padded bucketing. With packed,
            today's padded step also runs on the same rows ("today"), for the ratio. No reference forward.
  baseline  as the reference implementation does: fixed --baseline-batch-size rows in dataset order padded to
            --max-length, a reference-model forward every step, full float32 logits → log_softmax → gather,
            the same BCO loss and optimizer.
  --zero    0: torch AdamW on the model (no DeepSpeed); 2 / 3: a single-process DeepSpeed engine built from
            bco-ray's own `deepspeed_config` (world size 1). Several values run ours once each; the baseline
            runs once, with --baseline-zero (default: the first --zero).

Figures: tokens/s (real, unpadded tokens of the timed steps, after --warmup untimed steps), computed ÷ real
tokens, peak GPU memory, and MFU by bco-ray's one definition (bco_ray/train/throughput.py: 6·N_body·L +
6·d·V·C + 12·layers·d·L² per row, N_body = parameters minus the input embedding and the output projection,
the head counted on the C completion tokens it runs on), peak = dense bf16 (H100/H200 989 TFLOP/s).
End to end (precompute + one epoch): ours = precompute seconds + epoch tokens / ours tokens/s; baseline =
epoch tokens / baseline tokens/s (its tokens/s already pays for the reference forward). The last line is
`RESULT {json}`.

    python bench/train.py --model tiny --rows 32 --zero 0                 # CPU smoke
    python bench/train.py --model qwen0.5b --rows 2048 --zero 2 3 --baseline-steps 64 --ds-adam torch
"""

from __future__ import annotations

import argparse
import sys

# bench/common.py and the train_* modules: a script's directory is first on sys.path; bco_ray is installed
import common as C
import torch
from train_layout import padding_report
from train_runs import precompute, run_baseline, run_ours


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(C.SHAPES), default="tiny")
    p.add_argument("--rows", type=int, default=None, help="rows in the epoch (default 2048 qwen0.5b, 32 tiny)")
    p.add_argument("--seq-len", type=int, nargs=2, default=[512, 1024], metavar=("MIN", "MAX"))
    p.add_argument("--steps", type=int, default=None, help="cap on timed optimizer steps of ours (default: the epoch)")
    p.add_argument("--baseline-steps", type=int, default=None, help="cap on timed baseline steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing, each run")
    p.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=None,
        help="ours: padded tokens per micro-batch "
        "(default: baseline-batch-size × max-length, the baseline's padded size)",
    )
    p.add_argument("--window", type=int, default=1024, help="ours, budget bucketing: rows sorted by length together")
    p.add_argument(
        "--bucketing",
        choices=["packed", "trainer", "budget"],
        default="packed",
        help="ours: packed = the trainer's default step (rows of a step packed to --micro-batch-tokens); "
        "trainer = today's padded step (batching.length_bucketed: --micro-batch-size rows, --bucket-window "
        "micro-batches pooled); budget = bench-only token-budget padded micro-batches",
    )
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=4,
        help="ours: rows per worker per micro-batch (packed: "
        "a step covers micro-batch-size × gradient-accumulation-steps rows)",
    )
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--no-today", action="store_true", help="packed: skip today's padded step on the same rows")
    p.add_argument("--bucket-window", type=int, default=16, help="ours, trainer bucketing: micro-batches pooled")
    p.add_argument("--baseline-batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--zero", type=int, nargs="+", choices=[0, 2, 3], default=[0])
    p.add_argument("--baseline-zero", type=int, choices=[0, 2, 3], default=None)
    p.add_argument(
        "--ds-adam",
        choices=["auto", "fused", "torch"],
        default="auto",
        help="DeepSpeed optimizer: fused (JIT-built op) | torch; auto: fused if prebuilt or nvcc exists",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="ours only")
    p.add_argument("--compile", action="store_true", help="ours only: compile the decoder (dynamic shapes)")
    p.add_argument("--liger", action="store_true", help="ours only: the output head by Liger Kernel (GPU)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    p.add_argument("--attn", default="auto", help="ours: auto (flash_attention_2 if importable, else sdpa) | sdpa")
    p.add_argument("--baseline-attn", default="sdpa")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--precompute-token-budget", type=int, default=None, help="default 65536 GPU, 16384 CPU")
    p.add_argument("--lr", type=float, default=5e-7)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.liger and 3 in a.zero:
        p.error("--liger needs the whole output-head weight on the rank: not with --zero 3")
    a.rows = a.rows or (2048 if a.model == "qwen0.5b" else 32)
    a.micro_batch_tokens = a.micro_batch_tokens or (
        a.micro_batch_size * a.max_length if a.bucketing == "packed" else a.baseline_batch_size * a.max_length
    )
    a.baseline_zero = a.zero[0] if a.baseline_zero is None else a.baseline_zero
    return a


def guarded(name: str, fn) -> dict:
    """A run that runs out of GPU memory is reported as such; the others still run."""
    try:
        return fn()
    except torch.OutOfMemoryError as e:
        msg = str(e).splitlines()[0]
    C.free_memory()
    print(f"[{name}] out of GPU memory: {msg}", flush=True)
    return {"error": f"OutOfMemoryError: {msg}"}


def settings(a, path, device, dtype, lengths, peak, peak_src, init_seconds) -> dict:
    """Print the model and data lines; the RESULT's settings, parameter counts, padding report and environment."""
    fshape = C.flop_shape_of(path)
    attn = C.pick_attn(a.attn, device)
    print(
        f"model {a.model}: {fshape['total'] / 1e6:.1f}M params, N_body {fshape['body'] / 1e6:.1f}M, head "
        f"{fshape['head'] / 1e6:.1f}M, {dtype}, init+save {init_seconds:.1f} s; ours attn={attn}, baseline "
        f"attn={a.baseline_attn}; peak {peak and peak / 1e12} TFLOP/s ({peak_src})",
        flush=True,
    )
    ours_mb = (
        f"{a.micro_batch_tokens} tokens/micro-batch"
        if a.bucketing == "budget"
        else f"{a.micro_batch_size} rows/micro-batch, {a.bucket_window} pooled (trainer bucketing)"
    )
    print(
        f"data: {a.rows} rows, {sum(lengths)} tokens, length {min(lengths)}..{max(lengths)}; ours "
        f"{ours_mb}, baseline {a.baseline_batch_size}×{a.max_length}",
        flush=True,
    )
    return {
        "bench": "train",
        "model": a.model,
        "rows": a.rows,
        "epoch_tokens": sum(lengths),
        "dtype": str(dtype).removeprefix("torch."),
        "attn": attn,
        "baseline_attn": a.baseline_attn,
        "micro_batch_tokens": a.micro_batch_tokens,
        "bucketing": a.bucketing,
        "baseline_batch_size": a.baseline_batch_size,
        "max_length": a.max_length,
        "gradient_checkpointing": a.gradient_checkpointing,
        "compile": a.compile,
        "micro_batch_size": a.micro_batch_size,
        "gradient_accumulation_steps": a.gradient_accumulation_steps,
        "flop_shape": fshape,
        "padding": padding_report(a),
        "peak_flops": peak,
        "peak_source": peak_src,
        **C.env_info(device),
    }


def run_all(a, res: dict, path, rows, device, dtype, lengths, peak) -> None:
    """The precompute, then the baseline, ours at each --zero and (packed) today's padded step, into `res`."""
    fshape = res["flop_shape"]
    ref_logps, res["precompute"] = precompute(a, path, rows, device, dtype)
    # The baseline first: should an engine leave memory behind, only our figures would pay for it.
    base = (
        None
        if a.skip_baseline
        else guarded("baseline", lambda: run_baseline(a, path, rows, device, dtype, lengths, fshape, peak))
    )
    res["ours"] = {
        f"zero{z}": guarded(
            f"ours zero={z}",
            lambda z=z: run_ours(a, z, path, rows, ref_logps, device, dtype, lengths, fshape, peak),
        )
        for z in a.zero
    }
    if a.bucketing == "packed" and not a.no_today:  # today's padded step, same rows, same process
        res["today"] = {
            f"zero{z}": guarded(
                f"today zero={z}",
                lambda z=z: run_ours(
                    a, z, path, rows, ref_logps, device, dtype, lengths, fshape, peak, layout="trainer"
                ),
            )
            for z in a.zero
        }
    res["baseline"] = base


def compare_today(res: dict) -> None:
    """packed ÷ today's padded step, train tokens/s, per --zero."""
    for key, today in res.get("today", {}).items():
        ours = res["ours"][key]
        if "error" not in today and "error" not in ours:
            r = C.ratio(ours["tokens_per_s"], today["tokens_per_s"])
            res.setdefault("packed_over_today", {})[key] = r
            print(
                f"RATIO packed/today({key}) train tok/s {r}x (computed/real tokens "
                f"{ours['computed_over_real']} vs {today['computed_over_real']})",
                flush=True,
            )


def compare_baseline(a, res: dict) -> None:
    """End-to-end tokens/s (precompute + one epoch) of each side, and ours ÷ baseline per --zero."""
    base, epoch = res["baseline"], res["epoch_tokens"]
    if base and "error" not in base:
        base["e2e_tokens_per_s"] = base["tokens_per_s"]  # its steps already pay for the reference
    for key, ours in res["ours"].items():
        if "error" in ours:
            continue
        ours["e2e_tokens_per_s"] = round(epoch / (res["precompute"]["seconds"] + epoch / ours["tokens_per_s"]), 1)
        if base and "error" not in base:
            r = res.setdefault("ratios", {})[key] = {
                "train_tokens_per_s": C.ratio(ours["tokens_per_s"], base["tokens_per_s"]),
                "e2e_tokens_per_s": C.ratio(ours["e2e_tokens_per_s"], base["e2e_tokens_per_s"]),
                "peak_mem": C.ratio(ours["peak_mem_gib"], base["peak_mem_gib"]),
            }
            print(
                f"RATIO ours({key})/baseline(zero{a.baseline_zero}): train tok/s {r['train_tokens_per_s']}x, "
                f"end-to-end (precompute + 1 epoch) tok/s {r['e2e_tokens_per_s']}x, peak memory "
                f"{r['peak_mem']}",
                flush=True,
            )


def main(argv=None) -> int:
    a = parse_args(argv)
    C.ensure_ray_importable()
    device, dtype = C.device_and_dtype(a.dtype)
    a.precompute_token_budget = a.precompute_token_budget or (65536 if device.type == "cuda" else 16384)
    if a.seq_len[1] > a.max_length:
        raise SystemExit(f"--seq-len max {a.seq_len[1]} exceeds --max-length {a.max_length}")
    shape = C.SHAPES[a.model]
    rows = C.synthetic_rows(a.rows, shape["vocab_size"], (0, 0), (0, 0), a.seed, total=tuple(a.seq_len))
    lengths = [len(s) for s in rows["input_ids"]]
    peak, peak_src = C.peak_flops(a.peak_tflops)
    with C.Timer(device) as t_init:
        path = C.make_model_dir(a.model, dtype, device, a.seed)
    try:
        res = settings(a, path, device, dtype, lengths, peak, peak_src, t_init.seconds)
        run_all(a, res, path, rows, device, dtype, lengths, peak)
        compare_today(res)
        compare_baseline(a, res)
    finally:
        C.remove(path)
    C.result_line(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
