"""Policy update: bco-ray's training step versus a naive baseline, in one process, on the same rows and weights.

  ours      precompute: the `RefLogps` stage over all rows (timed: it is part of end-to-end), then the
            trainer's own step (bco_ray.train.step.micro_batch_loss + backward + optimizer step). Default
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
import os
import shutil
import sys

import common as C  # bench/common.py: a script's directory is first on sys.path; bco_ray is installed
import numpy as np
import pyarrow as pa
import torch

from bco_ray.data.packing import pad_right


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
        "trainer = today's padded step (step.length_bucketed: --micro-batch-size rows, --bucket-window "
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
    a.rows = a.rows or (2048 if a.model == "qwen0.5b" else 32)
    a.micro_batch_tokens = a.micro_batch_tokens or (
        a.micro_batch_size * a.max_length if a.bucketing == "packed" else a.baseline_batch_size * a.max_length
    )
    a.baseline_zero = a.zero[0] if a.baseline_zero is None else a.baseline_zero
    return a


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

        from bco_ray.config import TrainConfig
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
        from bco_ray.train.batching import backward, set_boundary

        packed = batch is not None and "position_ids" in batch
        if self.engine is not None:
            if batch is not None:
                set_boundary(self.engine, batch, last)
                backward(self.engine, batch, loss)
            else:
                self.engine.backward(loss)
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
    import deepspeed
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
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def bucketed(lengths: list[int], window: int, budget: int, seed: int) -> list[list[int]]:
    """ours' micro-batches: token-budget batches within each window of rows, in shuffled order."""
    from bco_ray.precompute.batching import budget_batches

    out = []
    for lo in range(0, len(lengths), window):
        out += [[lo + i for i in b] for b in budget_batches(lengths[lo : lo + window], budget)]
    order = np.random.default_rng(seed).permutation(len(out))
    return [out[i] for i in order]


def timed_steps(name, batches, step_fn, a, cap, device, rows, shape, peak) -> dict:
    """Run `warmup` untimed steps, then up to `cap` timed ones; figures over the timed ones. `batches`: the
    row indices of each optimizer step; `step_fn` runs one and returns the tokens it computed (padding or
    empty-pack tokens included)."""
    from bco_ray.train.throughput import row_work, train_flops

    C.reset_peak(device)
    before = round(torch.cuda.memory_allocated() / 2**30, 3) if device.type == "cuda" else None
    for b in batches[: a.warmup]:
        step_fn(b)
    timed = batches[a.warmup : a.warmup + cap] if cap else batches[a.warmup :]
    if not timed:
        raise SystemExit(f"{name}: no steps left after {a.warmup} warm-up steps; add rows")
    computed = 0
    with C.Timer(device) as t:
        for b in timed:
            computed += step_fn(b)
    idx = [i for b in timed for i in b]
    tokens, sq, comp = row_work([len(rows["input_ids"][i]) for i in idx], [rows["prompt_len"][i] for i in idx])
    f = {
        "seconds": round(t.seconds, 3),
        "steps": len(timed),
        "tokens": tokens,
        "tokens_per_s": round(tokens / t.seconds, 1),
        "computed_over_real": round(computed / tokens, 4),
        "padding_fraction": round(1 - tokens / computed, 4),
        "mean_rows_per_step": round(len(idx) / len(timed), 2),
        "peak_mem_gib": C.peak_gib(device),
        "mem_before_steps_gib": before,
    }
    if peak:
        f["mfu"] = round(train_flops(shape, tokens, sq, comp) / t.seconds / peak, 4)
    print(
        f"[{name}] {len(timed)} steps, {tokens} tokens in {t.seconds:.2f} s: {f['tokens_per_s']:.0f} tok/s, "
        f"computed/real tokens {f['computed_over_real']}, {f['mean_rows_per_step']} rows/step, peak mem "
        f"{f['peak_mem_gib']} GiB ({before} before the first step)" + (f", MFU {f['mfu']:.1%}" if peak else ""),
        flush=True,
    )
    return f


def precompute(a, path, rows, device, dtype) -> tuple[np.ndarray, dict]:
    from bco_ray.precompute.stages import RefLogps

    C.reset_peak(device)
    attn = C.pick_attn(a.attn, device)
    stage = RefLogps(
        path,
        None,
        str(dtype).removeprefix("torch."),
        1.0 if device.type == "cuda" else 0.0,
        a.precompute_token_budget,
        a.chunk_size,
        C.PAD_ID,
        attn_implementation=attn,
    )

    def table(lo, hi):
        return pa.table(
            {
                "input_ids": pa.array(rows["input_ids"][lo:hi], pa.list_(pa.int32())),
                "prompt_len": pa.array(rows["prompt_len"][lo:hi], pa.int32()),
                "label": pa.array(rows["label"][lo:hi], pa.bool_()),
            }
        )

    stage(table(0, 8))  # warm-up
    n, outs = len(rows["label"]), []
    with C.Timer(device) as t:
        for lo in range(0, n, 1024):
            outs.append(stage(table(lo, lo + 1024)).column("ref_logps").to_numpy())
    tokens = sum(len(s) for s in rows["input_ids"])
    f = {
        "seconds": round(t.seconds, 3),
        "tokens_per_s": round(tokens / t.seconds, 1),
        "peak_mem_gib": C.peak_gib(device),
    }
    print(f"[precompute] {n} rows, {tokens} tokens in {t.seconds:.2f} s ({f['tokens_per_s']:.0f} tok/s)", flush=True)
    del stage
    C.free_memory()
    return np.concatenate(outs), f


def step_plans(a, layout: str, lengths: list[int], labels) -> list:
    """Each optimizer step of ours: (row indices of the step, its micro-batches as row-index lists; None =
    packed by the trainer's own code at run time)."""
    if layout == "budget":
        return [(b, [b]) for b in bucketed(lengths, a.window, a.micro_batch_tokens, a.seed)]
    if layout == "packed":  # each step's rows as today's trainer takes them (the same rows per step), packed
        return [(rows, None) for rows, _ in step_plans(a, "trainer", lengths, labels)]
    from bco_ray.train.step import length_bucketed  # today's trainer: fixed rows, re-cut by length

    mbs = a.micro_batch_size
    ids = np.empty(len(lengths), dtype=object)
    ids[:] = [np.zeros(n, dtype=np.int64) for n in lengths]
    stream = (
        {"input_ids": ids[lo : lo + mbs], "label": np.asarray(labels)[lo : lo + mbs], "idx": np.arange(lo, lo + mbs)}
        for lo in range(0, len(lengths) - mbs + 1, mbs)
    )
    micro = [d["idx"].tolist() for d in length_bucketed(stream, a.bucket_window, a.seed)]
    g = a.gradient_accumulation_steps
    return [(sum(micro[i : i + g], []), micro[i : i + g]) for i in range(0, len(micro) - g + 1, g)]


def run_ours(a, zero, path, rows, ref_logps, device, dtype, lengths, shape, peak, layout=None) -> dict:
    """The trainer's step function on `layout` micro-batches (default a.bucketing)."""
    from bco_ray.data.packing import collate_packed, plan_step, to_device
    from bco_ray.train.device_stats import DeviceRunningMean
    from bco_ray.train.step import collate, micro_batch_loss

    layout = layout or a.bucketing
    model = C.load_model(path, dtype, device, C.pick_attn(a.attn, device))
    model.config.use_cache = False
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if a.compile:
        model.get_decoder().compile(dynamic=True)
    model.train()
    gas = 1 if layout == "budget" else a.gradient_accumulation_steps
    up = Updater(model, zero, a, device, dtype, gas=gas)
    delta = DeviceRunningMean(device)
    cols = {
        "input_ids": [np.asarray(s, dtype=np.int64) for s in rows["input_ids"]],
        "prompt_len": np.asarray(rows["prompt_len"]),
        "label": np.asarray(rows["label"]),
        "ref_logps": ref_logps,
        "udm_weight": np.ones(len(lengths), dtype=np.float32),
    }
    plans = step_plans(a, layout, lengths, rows["label"])
    micro_of = {tuple(p[0]): p[1] for p in plans}

    def take(idx):
        out = {k: [v[i] for i in idx] if k == "input_ids" else v[idx] for k, v in cols.items()}
        ragged = np.empty(len(idx), dtype=object)
        ragged[:] = out["input_ids"]
        out["input_ids"] = ragged
        return out

    def step(b):
        micro, computed = micro_of[tuple(b)], 0
        if micro is None:  # packed, as bco_ray.train.batching plans a step
            mine = take(b)
            packs, n_chunks = plan_step(
                [[len(x) for x in mine["input_ids"]]], [mine["prompt_len"]], a.micro_batch_tokens, a.chunk_size, 0
            )
            for j, (pack, nc) in enumerate(zip(packs, n_chunks)):
                batch = to_device(collate_packed(mine, pack, C.PAD_ID, len(b), nc), device)
                up.step(micro_batch_loss(up.model, batch, delta, a.beta, a.chunk_size), batch, j == len(packs) - 1)
                computed += batch["input_ids"].shape[1]
            return computed
        for j, m in enumerate(micro):
            batch = {k: v.to(device, non_blocking=True) for k, v in collate(take(m), C.PAD_ID).items()}
            up.step(
                micro_batch_loss(up.model, batch, delta, a.beta, a.chunk_size),
                batch if up.engine is not None else None,
                j == len(micro) - 1,
            )
            computed += batch["input_ids"].numel()
        return computed

    name = f"ours zero={zero}" + ("" if layout == a.bucketing else f" ({layout})")
    f = timed_steps(name, [p[0] for p in plans], step, a, a.steps, device, rows, shape, peak)
    f["optimizer"] = getattr(up, "optimizer_name", "torch.optim.AdamW")
    f["layout"] = layout
    up.close()
    return f


def run_baseline(a, path, rows, device, dtype, lengths, shape, peak) -> dict:
    from bco_ray.bco.loss import RunningMean, bco_losses

    policy = C.load_model(path, dtype, device, a.baseline_attn)
    policy.config.use_cache = False
    policy.train()
    ref = C.load_model(path, dtype, device, a.baseline_attn).eval().requires_grad_(False)
    up = Updater(policy, a.baseline_zero, a, device, dtype)
    delta = RunningMean()
    labels = torch.as_tensor(rows["label"])

    def step(b):
        ids, mask = pad_right([rows["input_ids"][i] for i in b], C.PAD_ID, a.max_length)
        ids, mask = ids.to(device), mask.to(device)
        plen = torch.as_tensor([rows["prompt_len"][i] for i in b], device=device)
        with torch.no_grad():
            ref_lp = C.full_logits_logps(ref, ids, mask, plen)
        lp = C.full_logits_logps(up.model, ids, mask, plen)  # through the engine, as accelerate does
        delta.update(a.beta * (lp.detach() - ref_lp))
        losses, _ = bco_losses(lp, ref_lp, labels[b].to(device), torch.ones(len(b), device=device), a.beta, delta.mean)
        up.step(losses.mean())
        return len(b) * a.max_length

    bs = a.baseline_batch_size
    batches = [list(range(lo, min(lo + bs, len(lengths)))) for lo in range(0, len(lengths), bs)]
    f = timed_steps("baseline", batches, step, a, a.baseline_steps, device, rows, shape, peak)
    f["zero"] = a.baseline_zero
    up.close()
    ref = None  # freed before the next run
    C.free_memory()
    return f


def flop_shape_of(path: str) -> dict:
    """bco-ray's MFU parameter counts (bco_ray/train/throughput.py) of the model at `path`, built on meta."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bco_ray.train.throughput import flop_shape

    with torch.device("meta"):
        return flop_shape(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)))


def padding_report(a, n: int = 4096) -> dict:
    """Computed ÷ real tokens of the trainer's micro-batches on two length distributions (lengths only, no
    model): rows of 512–1024 and of 50–400 tokens, packed (the default) and today's fixed-row padded
    micro-batches (`length_bucketed`, and in dataset order), at this run's micro-batch settings."""
    out = {}
    for lo, hi in ((512, 1024), (50, 400)):
        rng = np.random.default_rng(a.seed)
        lengths = rng.integers(lo, hi + 1, size=n).tolist()
        labels = (rng.random(n) < 0.5).tolist()
        b = argparse.Namespace(**{**vars(a), "micro_batch_tokens": a.micro_batch_size * hi})
        fig = {}
        for layout, window in (("packed", None), ("trainer", a.bucket_window), ("trainer", 1)):
            b.bucket_window = window or a.bucket_window
            plans = step_plans(b, layout, lengths, labels)
            real = sum(lengths[i] for p in plans for i in p[0])
            if layout == "packed":  # the trainer's packs (one rank: no empty packs)
                from bco_ray.data.packing import plan_step

                computed = sum(
                    sum(lengths[p[0][i]] for i in pack) or 2
                    for p in plans
                    for pack in plan_step(
                        [[lengths[i] for i in p[0]]], [[1] * len(p[0])], b.micro_batch_tokens, a.chunk_size, 0
                    )[0]
                )
            else:
                computed = sum(len(m) * max(lengths[i] for i in m) for p in plans for m in p[1])
            fig["packed" if layout == "packed" else f"fixed_rows_window{window}"] = round(computed / real, 4)
        out[f"{lo}-{hi}"] = fig
        print(
            f"PADDING rows {lo}-{hi} tokens, {a.micro_batch_size} rows per micro-batch: computed/real tokens "
            + ", ".join(f"{k} {v}" for k, v in fig.items()),
            flush=True,
        )
    return out


def guarded(name: str, fn) -> dict:
    """A run that runs out of GPU memory is reported as such; the others still run."""
    try:
        return fn()
    except torch.OutOfMemoryError as e:
        msg = str(e).splitlines()[0]
    C.free_memory()
    print(f"[{name}] out of GPU memory: {msg}", flush=True)
    return {"error": f"OutOfMemoryError: {msg}"}


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
        counts, _ = C.count_params(path)
        n_params = counts["params_n_flops"]
        fshape = flop_shape_of(path)
        attn = C.pick_attn(a.attn, device)
        print(
            f"model {a.model}: {counts['params_total'] / 1e6:.1f}M params, N (no input embedding) "
            f"{n_params / 1e6:.1f}M, {dtype}, init+save {t_init.seconds:.1f} s; ours attn={attn}, baseline "
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
        res = {
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
            **counts,
            "peak_flops": peak,
            "peak_source": peak_src,
            **C.env_info(device),
        }
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
            for key, today in res["today"].items():
                ours = res["ours"][key]
                if "error" not in today and "error" not in ours:
                    r = C.ratio(ours["tokens_per_s"], today["tokens_per_s"])
                    res.setdefault("packed_over_today", {})[key] = r
                    print(
                        f"RATIO packed/today({key}) train tok/s {r}x (computed/real tokens "
                        f"{ours['computed_over_real']} vs {today['computed_over_real']})",
                        flush=True,
                    )
        res["baseline"], epoch = base, sum(lengths)
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
    finally:
        C.remove(path)
    C.result_line(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
