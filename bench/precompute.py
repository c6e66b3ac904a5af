"""Reference log-prob pass: bco-ray's `RefLogps` stage versus a naive single-process transformers loop.

Both run in this process on the same synthetic rows and the same randomly initialised weights:

  naive  fixed batches of --batch-size rows in dataset order, padded to the batch's longest row (or to
         --max-length with --naive-pad max), full float32 logits → log_softmax → gather (the usual HF loop).
  ours   the `RefLogps` stage class, called directly on pyarrow tables of --block-rows rows (what Ray Data
         hands an actor): token-budget sub-batches (--token-budget), only completion positions through
         lm_head, chunked. No Ray needed for this number.
  --ray  also the Ray Data pass end to end (from_arrow → map_batches(RefLogps, ActorPoolStrategy(size=1))
         → materialize), actor start and model load included.

Figures: rows/s, tokens/s (real, unpadded tokens), padding fraction, peak GPU memory, and on a GPU the
forward MFU by bco-ray's one definition (bco_ray/train/throughput.py: `forward_flops`, a third of the training
FLOPs: 2·N_body·L + 2·d·V·C + 4·layers·d·L² per row, N_body without the input embedding and the output
projection, the projection counted on the C completion tokens only) ÷ seconds ÷ peak (dense bf16; H100/H200:
989 TFLOP/s). Padding is not credited. The last line is `RESULT {json}`.

    python bench/precompute.py --model tiny --rows 64                      # CPU smoke
    python bench/precompute.py --model qwen0.5b --rows 4096 --token-budget 65536 --block-rows 1024
"""

from __future__ import annotations

import argparse
import os
import sys

import common as C  # bench/common.py: a script's directory is first on sys.path; bco_ray is installed
import numpy as np
import pyarrow as pa
import torch

from bco_ray.data.packing import pad_right
from bco_ray.train.throughput import forward_flops, mfu, row_work


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(C.SHAPES), default="tiny")
    p.add_argument("--rows", type=int, default=None, help="default: 4096 (qwen0.5b), 64 (tiny)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[32, 512], metavar=("MIN", "MAX"))
    p.add_argument("--completion-len", type=int, nargs=2, default=[16, 512], metavar=("MIN", "MAX"))
    p.add_argument("--batch-size", type=int, default=8, help="naive loop: rows per forward")
    p.add_argument(
        "--naive-pad",
        choices=["batch", "max"],
        default="batch",
        help="naive loop pads to the batch's longest row or to --max-length",
    )
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument(
        "--token-budget",
        type=int,
        default=None,
        help="ours: padded tokens per forward (default 65536 on GPU, 16384 on CPU)",
    )
    p.add_argument("--block-rows", type=int, default=256, help="ours: rows per RefLogps call (Ray Data batch_size)")
    p.add_argument("--padded", action="store_true", help="ours: right-padded sub-batches (precompute.packed=false)")
    p.add_argument("--chunk-size", type=int, default=1024, help="ours: completion positions per lm_head chunk")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32", "float16"], default="auto")
    p.add_argument("--attn", default="auto", help="ours: auto (flash_attention_2 if importable, else sdpa) | sdpa")
    p.add_argument("--naive-attn", default="sdpa")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--ray", action="store_true", help="also time the Ray Data pass end to end")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.rows = a.rows or (4096 if a.model == "qwen0.5b" else 64)
    return a


def to_table(rows: dict, lo: int, hi: int) -> pa.Table:
    return pa.table(
        {
            "input_ids": pa.array(rows["input_ids"][lo:hi], pa.list_(pa.int32())),
            "prompt_len": pa.array(rows["prompt_len"][lo:hi], pa.int32()),
            "label": pa.array(rows["label"][lo:hi], pa.bool_()),
        }
    )


def figures(
    name: str,
    seconds: float,
    rows: int,
    tokens: int,
    padded: int,
    flops: float,
    peak: float | None,
    mem,
) -> dict:
    f = {
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "padding_fraction": round(1 - tokens / max(padded, 1), 4),
        "peak_mem_gib": mem,
    }
    if peak:
        f["fwd_mfu"] = round(mfu(flops, seconds, 1, peak), 4)
    print(
        f"[{name}] {rows} rows in {seconds:.2f} s: {f['rows_per_s']:.1f} rows/s, {f['tokens_per_s']:.0f} tok/s, "
        f"padding {f['padding_fraction']:.1%}, peak mem {mem} GiB" + (f", fwd MFU {f['fwd_mfu']:.1%}" if peak else ""),
        flush=True,
    )
    return f


def run_naive(a, path, rows, dtype, device, lengths, n_flops, peak) -> tuple[dict, np.ndarray]:
    C.reset_peak(device)
    model = C.load_model(path, dtype, device, a.naive_attn).eval()
    n, bs = len(lengths), a.batch_size
    out = np.zeros(n, dtype=np.float32)

    def batch(lo):
        pad_to = a.max_length if a.naive_pad == "max" else None
        ids, mask = pad_right(rows["input_ids"][lo : lo + bs], C.PAD_ID, pad_to)
        plen = torch.as_tensor(rows["prompt_len"][lo : lo + bs])
        return C.full_logits_logps(model, ids.to(device), mask.to(device), plen.to(device)), ids.numel()

    with torch.inference_mode():
        batch(0)  # warm-up (kernels, allocator), not timed
        padded = 0
        with C.Timer(device) as t:
            for lo in range(0, n, bs):
                lp, slots = batch(lo)
                out[lo : lo + bs] = lp.float().cpu().numpy()
                padded += slots
    f = figures("naive", t.seconds, n, sum(lengths), padded, n_flops, peak, C.peak_gib(device))
    model = None  # freed before the next model loads
    C.free_memory()
    return f, out


def run_ours(a, path, rows, dtype_name, device, lengths, n_flops, peak, attn) -> tuple[dict, np.ndarray]:
    from bco_ray.precompute.stages import RefLogps

    C.reset_peak(device)
    with C.Timer(device) as t_load:
        stage = RefLogps(
            path,
            None,
            dtype_name,
            1.0 if device.type == "cuda" else 0.0,
            a.token_budget,
            a.chunk_size,
            C.PAD_ID,
            attn_implementation=attn,
            packed=not a.padded,
        )
    n = len(lengths)
    stage(to_table(rows, 0, min(n, 16)))  # warm-up, not timed
    outs, pads = [], 0
    with C.Timer(device) as t:
        for lo in range(0, n, a.block_rows):
            res = stage(to_table(rows, lo, lo + a.block_rows))
            outs.append(res.column("ref_logps").to_numpy())
            pads += int(np.asarray(res.column("pad_tokens")).sum())
    f = figures("ours", t.seconds, n, sum(lengths), sum(lengths) + pads, n_flops, peak, C.peak_gib(device))
    f["model_load_s"] = round(t_load.seconds, 2)
    del stage
    C.free_memory()
    return f, np.concatenate(outs)


def run_ray(a, path, rows, dtype_name, device, lengths, attn) -> dict:
    import ray
    from ray.data import ActorPoolStrategy

    from bco_ray.precompute.stages import RefLogps

    gpus = 1 if device.type == "cuda" else 0
    ray.init(
        num_gpus=gpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {"PYTHONPATH": os.pathsep.join(x for x in (str(C.ROOT), os.environ.get("PYTHONPATH")) if x)}
        },
    )
    try:
        table = to_table(rows, 0, len(lengths))
        with C.Timer(device) as t:
            ds = (
                ray.data.from_arrow(table)
                .map_batches(
                    RefLogps,
                    batch_format="pyarrow",
                    batch_size=a.block_rows,
                    compute=ActorPoolStrategy(size=1),
                    fn_constructor_kwargs=dict(
                        model_path=path,
                        revision=None,
                        dtype=dtype_name,
                        num_gpus=gpus,
                        token_budget=a.token_budget,
                        chunk_size=a.chunk_size,
                        pad_id=C.PAD_ID,
                        attn_implementation=attn,
                        packed=not a.padded,
                    ),
                    **({"num_gpus": gpus} if gpus else {}),
                )
                .materialize()
            )
        assert ds.count() == len(lengths)
    finally:
        ray.shutdown()
    f = {
        "seconds": round(t.seconds, 3),
        "rows_per_s": round(len(lengths) / t.seconds, 2),
        "tokens_per_s": round(sum(lengths) / t.seconds, 1),
    }
    print(
        f"[ray] end to end (actor start + model load included): {len(lengths)} rows in {t.seconds:.2f} s, "
        f"{f['rows_per_s']:.1f} rows/s, {f['tokens_per_s']:.0f} tok/s",
        flush=True,
    )
    return f


def main(argv=None) -> int:
    a = parse_args(argv)
    C.ensure_ray_importable()
    device, dtype = C.device_and_dtype(a.dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    a.token_budget = a.token_budget or (65536 if device.type == "cuda" else 16384)
    attn = C.pick_attn(a.attn, device)
    shape = C.SHAPES[a.model]
    rows = C.synthetic_rows(a.rows, shape["vocab_size"], tuple(a.prompt_len), tuple(a.completion_len), a.seed)
    lengths = [len(s) for s in rows["input_ids"]]
    if a.naive_pad == "max" and max(lengths) > a.max_length:
        raise SystemExit(f"rows up to {max(lengths)} tokens exceed --max-length {a.max_length}")
    peak, peak_src = C.peak_flops(a.peak_tflops)
    with C.Timer(device) as t_init:
        path = C.make_model_dir(a.model, dtype, device, a.seed)
    try:
        shape = C.flop_shape_of(path)
        n_flops = forward_flops(shape, *row_work(lengths, rows["prompt_len"]))
        print(
            f"model {a.model}: {shape['total'] / 1e6:.1f}M params, N_body {shape['body'] / 1e6:.1f}M, head "
            f"{shape['head'] / 1e6:.1f}M, "
            f"{dtype_name}, init+save {t_init.seconds:.1f} s; ours attn={attn}, naive attn={a.naive_attn}; "
            f"peak {peak and peak / 1e12} TFLOP/s ({peak_src})",
            flush=True,
        )
        print(
            f"data: {a.rows} rows, {sum(lengths)} tokens, length {min(lengths)}..{max(lengths)} "
            f"(mean {np.mean(lengths):.0f})",
            flush=True,
        )
        ours, lp_ours = run_ours(a, path, rows, dtype_name, device, lengths, n_flops, peak, attn)
        res = {
            "bench": "precompute",
            "model": a.model,
            "rows": a.rows,
            "tokens": sum(lengths),
            "dtype": dtype_name,
            "attn": attn,
            "token_budget": a.token_budget,
            "block_rows": a.block_rows,
            "batch_size": a.batch_size,
            "flop_shape": shape,
            "peak_flops": peak,
            "peak_source": peak_src,
            "ours": ours,
            **C.env_info(device),
        }
        if not a.skip_naive:
            naive, lp_naive = run_naive(a, path, rows, dtype, device, lengths, n_flops, peak)
            res["naive"] = naive
            res["speedup_rows_per_s"] = C.ratio(ours["rows_per_s"], naive["rows_per_s"])
            res["peak_mem_ratio"] = C.ratio(ours["peak_mem_gib"], naive["peak_mem_gib"])
            diff = np.abs(lp_ours - lp_naive)
            res["logps_max_abs_diff"] = float(diff.max())
            res["logps_max_rel_diff"] = float((diff / np.maximum(np.abs(lp_naive), 1.0)).max())
            print(
                f"RATIO ours/naive rows/s = {res['speedup_rows_per_s']}x (same rows, so tokens/s too); "
                f"peak memory ours/naive = {res['peak_mem_ratio']}; log-prob max |diff| "
                f"{res['logps_max_abs_diff']:.4g} (relative {res['logps_max_rel_diff']:.2g})",
                flush=True,
            )
        if a.ray:
            try:
                res["ray"] = run_ray(a, path, rows, dtype_name, device, lengths, attn)
            except Exception as e:  # the core figures above stand without Ray
                print(f"[ray] failed: {type(e).__name__}: {e}", flush=True)
                res["ray"] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        C.remove(path)
    C.result_line(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
