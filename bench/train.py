"""Policy update: bco-ray's training step versus a naive baseline, in one process, on the same rows and weights.

  ours      precompute: the `RefLogps` stage over all rows (timed: it is part of end-to-end), then
            `bco_forward` (completion-only, chunked lm_head) + backward + optimizer step on micro-batches cut
            by length bucketing (rows sorted by length within --window rows, cut at --micro-batch-tokens padded
            tokens, batch order shuffled; --bucketing trainer: the trainer loop's own `length_bucketed`, fixed
            --micro-batch-size rows). No reference forward while training.
  baseline  as the reference implementation does: fixed --baseline-batch-size rows in dataset order padded to
            --max-length, a reference-model forward every step, full float32 logits → log_softmax → gather,
            the same BCO loss and optimizer.
  --zero    0: torch AdamW on the model (no DeepSpeed); 2 / 3: a single-process DeepSpeed engine built from
            bco-ray's own `deepspeed_config` (world size 1). Several values run ours once each; the baseline
            runs once, with --baseline-zero (default: the first --zero).

Figures: tokens/s (real, unpadded tokens of the timed steps, after --warmup untimed steps), peak GPU memory,
and MFU = (6·N·tokens + 12·L·d·Σ len²) / s / peak: N = parameters minus the input embedding table (tied
lm_head not counted), 12·L·d·len per token is PaLM's attention term (L layers, width d, non-causal),
peak = dense bf16 (H100/H200 989 TFLOP/s). Recomputation (gradient checkpointing) is not counted.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as C  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(C.SHAPES), default="tiny")
    p.add_argument("--rows", type=int, default=None, help="rows in the epoch (default 2048 qwen0.5b, 32 tiny)")
    p.add_argument("--seq-len", type=int, nargs=2, default=[512, 1024], metavar=("MIN", "MAX"))
    p.add_argument("--steps", type=int, default=None, help="cap on timed optimizer steps of ours (default: the epoch)")
    p.add_argument("--baseline-steps", type=int, default=None, help="cap on timed baseline steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing, each run")
    p.add_argument("--micro-batch-tokens", type=int, default=None, help="ours: padded tokens per micro-batch "
                   "(default: baseline-batch-size × max-length, the baseline's padded size)")
    p.add_argument("--window", type=int, default=1024, help="ours, budget bucketing: rows sorted by length together")
    p.add_argument("--bucketing", choices=["budget", "trainer"], default="budget",
                   help="ours: budget = token-budget micro-batches (budget_batches); trainer = what the trainer "
                   "loop does (step.length_bucketed: --micro-batch-size rows, --bucket-window micro-batches pooled)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="ours, trainer bucketing: rows per micro-batch")
    p.add_argument("--bucket-window", type=int, default=16, help="ours, trainer bucketing: micro-batches pooled")
    p.add_argument("--baseline-batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--zero", type=int, nargs="+", choices=[0, 2, 3], default=[0])
    p.add_argument("--baseline-zero", type=int, choices=[0, 2, 3], default=None)
    p.add_argument("--ds-adam", choices=["auto", "fused", "torch"], default="auto",
                   help="DeepSpeed optimizer: fused (JIT-built op) | torch; auto: fused if prebuilt or nvcc exists")
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
    a.micro_batch_tokens = a.micro_batch_tokens or a.baseline_batch_size * a.max_length
    a.baseline_zero = a.zero[0] if a.baseline_zero is None else a.baseline_zero
    return a


class Updater:
    """backward + clip + AdamW step: plain torch (zero 0) or a world-size-1 DeepSpeed engine (2, 3)."""

    def __init__(self, model, zero: int, a, device, dtype):
        self.engine = None
        if zero == 0:
            self.module = model
            self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr,
                                         betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                         fused=device.type == "cuda")
            return
        import deepspeed

        from bco_ray.config import TrainConfig
        from bco_ray.train.ds_config import deepspeed_config
        init_distributed(device)
        t = TrainConfig(zero_stage=zero, micro_batch_size=1, gradient_accumulation_steps=1, lr=a.lr,
                        bf16="true" if dtype == torch.bfloat16 else "false")
        cfg = deepspeed_config(t, 1, device.type == "cuda")
        if device.type == "cuda" and ds_torch_adam(a.ds_adam):
            cfg["optimizer"]["params"]["torch_adam"] = True
        self.engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                               model_parameters=[p for p in model.parameters() if p.requires_grad])
        self.module = self.engine.module
        self.optimizer_name = type(self.engine.optimizer).__name__

    @property
    def model(self):
        """What the forward runs on: the DeepSpeed engine itself (as the training loop passes it to `bco_forward`:
        the forward must run through the engine for ZeRO-3's micro-step bookkeeping), or the plain model at zero 0."""
        return self.engine if self.engine is not None else self.module

    def step(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
            return
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        if self.engine is not None and hasattr(self.engine, "destroy"):
            try:
                self.engine.destroy()
            except Exception as e:                      # the figures are in; only clean-up failed
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
        out += [[lo + i for i in b] for b in budget_batches(lengths[lo:lo + window], budget)]
    order = np.random.default_rng(seed).permutation(len(out))
    return [out[i] for i in order]


def train_flops(n_params: int, layers: int, hidden: int, lengths) -> float:
    return float(sum(6.0 * n_params * x + 12.0 * layers * hidden * x * x for x in lengths))


def timed_steps(name, batches, step_fn, a, cap, device, lengths, n_params, shape, peak) -> dict:
    """Run `warmup` untimed steps, then up to `cap` timed ones; figures over the timed ones."""
    C.reset_peak(device)
    before = round(torch.cuda.memory_allocated() / 2**30, 3) if device.type == "cuda" else None
    for b in batches[:a.warmup]:
        step_fn(b)
    timed = batches[a.warmup:a.warmup + cap] if cap else batches[a.warmup:]
    if not timed:
        raise SystemExit(f"{name}: no steps left after {a.warmup} warm-up steps; add rows")
    with C.Timer(device) as t:
        for b in timed:
            step_fn(b)
    real = [lengths[i] for b in timed for i in b]
    slots = sum(len(b) * (a.max_length if name == "baseline" else max(lengths[i] for i in b)) for b in timed)
    f = {"seconds": round(t.seconds, 3), "steps": len(timed), "tokens": sum(real),
         "tokens_per_s": round(sum(real) / t.seconds, 1), "padding_fraction": round(1 - sum(real) / slots, 4),
         "mean_rows_per_step": round(len(real) / len(timed), 2), "peak_mem_gib": C.peak_gib(device),
         "mem_before_steps_gib": before}
    flops = train_flops(n_params, shape["num_hidden_layers"], shape["hidden_size"], real)
    if peak:
        f["mfu"] = round(flops / t.seconds / peak, 4)
        f["mfu_6n"] = round(6.0 * n_params * sum(real) / t.seconds / peak, 4)
    print(f"[{name}] {len(timed)} steps, {sum(real)} tokens in {t.seconds:.2f} s: {f['tokens_per_s']:.0f} tok/s, "
          f"padding {f['padding_fraction']:.1%}, {f['mean_rows_per_step']} rows/step, peak mem {f['peak_mem_gib']} GiB "
          f"({before} before the first step)"
          + (f", MFU {f['mfu']:.1%} (6N only {f['mfu_6n']:.1%})" if peak else ""), flush=True)
    return f


def precompute(a, path, rows, device, dtype) -> tuple[np.ndarray, dict]:
    from bco_ray.precompute.stages import RefLogps
    C.reset_peak(device)
    attn = C.pick_attn(a.attn, device)
    stage = RefLogps(path, None, str(dtype).removeprefix("torch."), 1.0 if device.type == "cuda" else 0.0,
                     a.precompute_token_budget, a.chunk_size, C.PAD_ID, attn_implementation=attn)

    def table(lo, hi):
        return pa.table({"input_ids": pa.array(rows["input_ids"][lo:hi], pa.list_(pa.int32())),
                         "prompt_len": pa.array(rows["prompt_len"][lo:hi], pa.int32()),
                         "label": pa.array(rows["label"][lo:hi], pa.bool_())})
    stage(table(0, 8))                                  # warm-up
    n, outs = len(rows["label"]), []
    with C.Timer(device) as t:
        for lo in range(0, n, 1024):
            outs.append(stage(table(lo, lo + 1024)).column("ref_logps").to_numpy())
    tokens = sum(len(s) for s in rows["input_ids"])
    f = {"seconds": round(t.seconds, 3), "tokens_per_s": round(tokens / t.seconds, 1),
         "peak_mem_gib": C.peak_gib(device)}
    print(f"[precompute] {n} rows, {tokens} tokens in {t.seconds:.2f} s ({f['tokens_per_s']:.0f} tok/s)", flush=True)
    del stage
    C.free_memory()
    return np.concatenate(outs), f


def run_ours(a, zero, path, rows, ref_logps, device, dtype, lengths, n_params, shape, peak) -> dict:
    from bco_ray.bco.loss import RunningMean
    from bco_ray.train.step import bco_forward, collate
    model = C.load_model(path, dtype, device, C.pick_attn(a.attn, device))
    model.config.use_cache = False
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if a.compile:
        model.get_decoder().compile(dynamic=True)
    model.train()
    up = Updater(model, zero, a, device, dtype)
    delta = RunningMean()
    cols = {"input_ids": [np.asarray(s, dtype=np.int64) for s in rows["input_ids"]],
            "prompt_len": np.asarray(rows["prompt_len"]), "label": np.asarray(rows["label"]),
            "ref_logps": ref_logps, "udm_weight": np.ones(len(lengths), dtype=np.float32)}

    def step(b):
        raw = {k: [v[i] for i in b] if k == "input_ids" else v[b] for k, v in cols.items()}
        batch = {k: v.to(device, non_blocking=True) for k, v in collate(raw, C.PAD_ID).items()}
        losses, _, _ = bco_forward(up.model, batch, delta, a.beta, a.chunk_size)
        up.step(losses.mean())

    if a.bucketing == "budget":
        batches = bucketed(lengths, a.window, a.micro_batch_tokens, a.seed)
    else:                                                # the trainer's own re-cutting of fixed-size batches
        from bco_ray.train.step import length_bucketed
        mbs = a.micro_batch_size
        ids = np.empty(len(lengths), dtype=object)
        ids[:] = cols["input_ids"]
        stream = ({"input_ids": ids[lo:lo + mbs], "label": cols["label"][lo:lo + mbs],     # drop_last, as the loop
                   "idx": np.arange(lo, lo + mbs)}
                  for lo in range(0, len(lengths) - mbs + 1, mbs))
        batches = [d["idx"].tolist() for d in length_bucketed(stream, a.bucket_window, a.seed)]
    f = timed_steps(f"ours zero={zero}", batches, step, a, a.steps, device, lengths, n_params, shape, peak)
    f["optimizer"] = getattr(up, "optimizer_name", "torch.optim.AdamW")
    up.close()
    return f


def run_baseline(a, path, rows, device, dtype, lengths, n_params, shape, peak) -> dict:
    from bco_ray.bco.loss import RunningMean, bco_losses
    policy = C.load_model(path, dtype, device, a.baseline_attn)
    policy.config.use_cache = False
    policy.train()
    ref = C.load_model(path, dtype, device, a.baseline_attn).eval().requires_grad_(False)
    up = Updater(policy, a.baseline_zero, a, device, dtype)
    delta = RunningMean()
    labels = torch.as_tensor(rows["label"])

    def step(b):
        ids, mask = C.pad_batch([rows["input_ids"][i] for i in b], a.max_length)
        ids, mask = ids.to(device), mask.to(device)
        plen = torch.as_tensor([rows["prompt_len"][i] for i in b], device=device)
        with torch.no_grad():
            ref_lp = C.full_logits_logps(ref, ids, mask, plen)
        lp = C.full_logits_logps(up.model, ids, mask, plen)      # through the engine, as accelerate does
        delta.update(a.beta * (lp.detach() - ref_lp))
        losses, _ = bco_losses(lp, ref_lp, labels[b].to(device), torch.ones(len(b), device=device), a.beta, delta.mean)
        up.step(losses.mean())

    bs = a.baseline_batch_size
    batches = [list(range(lo, min(lo + bs, len(lengths)))) for lo in range(0, len(lengths), bs)]
    f = timed_steps("baseline", batches, step, a, a.baseline_steps, device, lengths, n_params, shape, peak)
    f["zero"] = a.baseline_zero
    up.close()
    del ref
    C.free_memory()
    return f


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
        attn = C.pick_attn(a.attn, device)
        print(f"model {a.model}: {counts['params_total'] / 1e6:.1f}M params, N (no input embedding) "
              f"{n_params / 1e6:.1f}M, {dtype}, init+save {t_init.seconds:.1f} s; ours attn={attn}, baseline "
              f"attn={a.baseline_attn}; peak {peak and peak / 1e12} TFLOP/s ({peak_src})", flush=True)
        ours_mb = (f"{a.micro_batch_tokens} tokens/micro-batch" if a.bucketing == "budget" else
                   f"{a.micro_batch_size} rows/micro-batch, {a.bucket_window} pooled (trainer bucketing)")
        print(f"data: {a.rows} rows, {sum(lengths)} tokens, length {min(lengths)}..{max(lengths)}; ours "
              f"{ours_mb}, baseline {a.baseline_batch_size}×{a.max_length}", flush=True)
        res = {"bench": "train", "model": a.model, "rows": a.rows, "epoch_tokens": sum(lengths),
               "dtype": str(dtype).removeprefix("torch."), "attn": attn, "baseline_attn": a.baseline_attn,
               "micro_batch_tokens": a.micro_batch_tokens, "bucketing": a.bucketing,
               "baseline_batch_size": a.baseline_batch_size,
               "max_length": a.max_length, "gradient_checkpointing": a.gradient_checkpointing, "compile": a.compile,
               **counts, "peak_flops": peak, "peak_source": peak_src, **C.env_info(device)}
        ref_logps, res["precompute"] = precompute(a, path, rows, device, dtype)
        # The baseline first: should an engine leave memory behind, only our figures would pay for it.
        base = None if a.skip_baseline else guarded("baseline", lambda: run_baseline(
            a, path, rows, device, dtype, lengths, n_params, shape, peak))
        res["ours"] = {f"zero{z}": guarded(f"ours zero={z}", lambda z=z: run_ours(
            a, z, path, rows, ref_logps, device, dtype, lengths, n_params, shape, peak)) for z in a.zero}
        res["baseline"], epoch = base, sum(lengths)
        if base and "error" not in base:
            base["e2e_tokens_per_s"] = base["tokens_per_s"]      # its steps already pay for the reference
        for key, ours in res["ours"].items():
            if "error" in ours:
                continue
            ours["e2e_tokens_per_s"] = round(epoch / (res["precompute"]["seconds"] + epoch / ours["tokens_per_s"]), 1)
            if base and "error" not in base:
                r = res.setdefault("ratios", {})[key] = {
                    "train_tokens_per_s": C.ratio(ours["tokens_per_s"], base["tokens_per_s"]),
                    "e2e_tokens_per_s": C.ratio(ours["e2e_tokens_per_s"], base["e2e_tokens_per_s"]),
                    "peak_mem": C.ratio(ours["peak_mem_gib"], base["peak_mem_gib"])}
                print(f"RATIO ours({key})/baseline(zero{a.baseline_zero}): train tok/s {r['train_tokens_per_s']}x, "
                      f"end-to-end (precompute + 1 epoch) tok/s {r['e2e_tokens_per_s']}x, peak memory "
                      f"{r['peak_mem']}", flush=True)
    finally:
        C.remove(path)
    C.result_line(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
