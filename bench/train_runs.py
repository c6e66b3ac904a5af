"""The timed runs of bench/train.py: the reference pass (`RefLogps`), ours (the trainer's step function) and the
naive baseline (a reference forward every step, full float32 logits), each reporting tokens/s, padding,
peak memory and MFU over its timed steps."""

from __future__ import annotations

import common as C  # bench/common.py: a script's directory is first on sys.path; bco_ray is installed
import numpy as np
import pyarrow as pa
import torch
from train_layout import step_plans
from train_update import Updater

from bco_ray.data.packing import pad_right


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


def run_ours(a, zero, path, rows, ref_logps, device, dtype, lengths, shape, peak, layout=None) -> dict:
    """The trainer's step function on `layout` micro-batches (default a.bucketing)."""
    from bco_ray.bco.loss import RunningMean
    from bco_ray.data.packing import collate_packed, plan_step
    from bco_ray.train.batches import collate, packed
    from bco_ray.train.forward import micro_batch_loss

    layout = layout or a.bucketing
    model = C.load_model(path, dtype, device, C.pick_attn(a.attn, device))
    model.config.use_cache = False
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if a.compile:
        model.get_decoder().compile(dynamic=True)
    if a.liger:
        from bco_ray.bco.head_logps import use_liger_kernel

        use_liger_kernel(model, device)
    model.train()
    gas = 1 if layout == "budget" else a.gradient_accumulation_steps
    up = Updater(model, zero, a, device, dtype, gas=gas)
    delta = RunningMean(device=device)
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
                [[len(x) for x in mine["input_ids"]]],
                [mine["prompt_len"]],
                a.micro_batch_tokens,
                a.chunk_size,
                0,
                a.micro_batch_size,  # packs of whole micro-batches, as the trainer's
            )
            for j, (pack, nc) in enumerate(zip(packs, n_chunks)):
                last = j == len(packs) - 1
                batch = packed(
                    collate_packed(mine, pack, C.PAD_ID, len(b), nc), device, [0] * max(len(pack), 1), 1, last
                )
                up.step(micro_batch_loss(up.model, batch, delta, a.beta, a.chunk_size), batch, last)
                computed += batch.computed_tokens
            return computed
        for j, m in enumerate(micro):
            batch = collate(take(m), C.PAD_ID).to(device)
            up.step(
                micro_batch_loss(up.model, batch, delta, a.beta, a.chunk_size),
                batch if up.engine is not None else None,
                j == len(micro) - 1,
            )
            computed += batch.computed_tokens
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
    delta = RunningMean(device=device)
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
