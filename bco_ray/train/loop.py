"""The training recipe a Ray Train worker runs, top to bottom:
build the policy → DeepSpeed engine → resume from the latest checkpoint → for each micro-batch of this
worker's shard: BCO forward, backward, step → log / evaluate / checkpoint → save the final model."""
from __future__ import annotations

import json
import math
import os
import tempfile
import time

import deepspeed
import ray.train
import torch
import torch.distributed as dist
from transformers import get_scheduler

from bco_ray.config import Config, load_config
from bco_ray.eval.snapshots import save_snapshot
from bco_ray.models import load_causal_lm
from bco_ray.train.ds_config import deepspeed_config, use_bf16
from bco_ray.train.batching import backward, packed_micro_batches, padded_micro_batches, rank_batches, set_boundary  # noqa: F401
from bco_ray.train.device_stats import DeviceRunningMean, DeviceWindowSums
from bco_ray.train.evaluate import evaluate
from bco_ray.train.step import micro_batch_loss
from bco_ray.train.throughput import flop_shape, train_flops
from bco_ray.tracking.step_logger import StepLogger, console
from bco_ray.tracking.throughput import peak_flops as gpu_peak_flops


def build_policy(cfg: Config, policy_path: str, on_gpu: bool):
    t = cfg.train
    model = load_causal_lm(policy_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code,
                           attn_implementation=cfg.model.attn_implementation,
                           dtype=torch.bfloat16 if use_bf16(t, on_gpu) else torch.float32)
    if t.disable_dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        if hasattr(model.config, "attention_dropout"):
            model.config.attention_dropout = 0.0
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if t.lora.enabled:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                                                 target_modules=t.lora.target_modules, task_type="CAUSAL_LM"))
    return model


def save_final_model(model, out_dir: str, tokenizer_path: str, rank: int, zero_stage: int,
                     lora_merged: bool = False) -> None:
    """Hugging Face format (safetensors + tokenizer + generation config). ZeRO-3: gathered to rank 0 one layer
    at a time (bco_ray/train/zero3_save.py), not the whole model on every rank; only a merged LoRA model, built
    from the whole model, gathers it all.
    With LoRA, `out_dir` holds the adapter (loadable with peft) and, if asked, `out_dir/merged` the merged model."""
    from transformers import AutoTokenizer

    from bco_ray.train.zero3_save import consolidated_state_dict
    full_gather = zero_stage == 3 and lora_merged
    state = consolidated_state_dict(model, rank) if zero_stage == 3 and not full_gather else None
    ctx = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None) if full_gather else _null()
    with ctx:
        if rank == 0:
            tok = AutoTokenizer.from_pretrained(tokenizer_path)
            if state is None:
                state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
            tok.save_pretrained(out_dir)
            if lora_merged and hasattr(model, "merge_and_unload"):
                import copy
                merged = copy.deepcopy(model).merge_and_unload()
                merged.save_pretrained(os.path.join(out_dir, "merged"), safe_serialization=True)
                tok.save_pretrained(os.path.join(out_dir, "merged"))


def _maybe_inject_failure(at_step: int, step: int, micro: int, gas: int, rank: int, world: int,
                          storage_dir: str) -> None:
    """Testing switch (train.inject_failure_at_step): the last rank dies, once per run, right after the
    optimizer step `at_step`, so that Ray Train must replace it and resume from the latest checkpoint."""
    if at_step <= 0 or step != at_step or micro % gas or rank != world - 1:
        return
    marker = os.path.join(storage_dir, f"injected_failure_step{at_step}")
    if os.path.exists(marker):
        return
    os.makedirs(storage_dir, exist_ok=True)
    open(marker, "w").close()
    console(f"[bco-ray] injected failure: rank {rank} exits at step {step}")
    os._exit(1)


def _record_rows(storage_dir: str, rank: int, step: int, rows: list) -> None:
    """Testing switch (train.record_rows): the row ids each optimizer step trained on, one line per step."""
    os.makedirs(os.path.join(storage_dir, "rows"), exist_ok=True)
    with open(os.path.join(storage_dir, "rows", f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "rows": [int(r) for r in rows]}) + "\n")


def _report_finished(d: str, rank: int) -> None:
    """Re-running a finished run name: report its final model again instead of training from scratch."""
    import shutil
    with open(os.path.join(d, "final.json")) as f:
        final = json.load(f)
    with tempfile.TemporaryDirectory() as out:
        if rank == 0:
            shutil.copytree(os.path.join(d, "model"), os.path.join(out, "model"))
            shutil.copy(os.path.join(d, "final.json"), out)
            console(f"[bco-ray] run already finished at step {final.get('step')}; nothing to train")
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(out) if rank == 0 else None,
                         checkpoint_dir_name=f"final_step{final.get('step', 0):07d}_again")


def _grad_norm(model) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def train_loop_per_worker(config: dict) -> None:
    t_entry = time.time()
    cfg = load_config(overrides=config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = t.use_gpu and torch.cuda.is_available()
    device = ray.train.torch.get_device() if on_gpu else torch.device("cpu")
    torch.manual_seed(t.seed)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    t_dist = time.time()

    # Steps are fixed up front from the pass's row count, so every rank runs the same number of them.
    rows_per_rank = config["train_rows"] // world
    micro_per_epoch = rows_per_rank // t.micro_batch_size
    steps_per_epoch = micro_per_epoch // t.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError(f"{config['train_rows']} training rows give no full optimizer step with "
                         f"{world} workers × micro_batch_size {t.micro_batch_size} × gradient_accumulation_steps "
                         f"{t.gradient_accumulation_steps}; lower them or add data")
    micro_per_epoch = steps_per_epoch * t.gradient_accumulation_steps
    total_steps = steps_per_epoch * t.num_epochs if t.max_steps < 0 else t.max_steps
    warmup = math.ceil(t.warmup_ratio * total_steps)

    model = build_policy(cfg, config["policy_path"], on_gpu)
    t_model = time.time()
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(t, world, on_gpu),
        lr_scheduler=lambda opt: get_scheduler(t.lr_scheduler, opt, num_warmup_steps=warmup,
                                               num_training_steps=total_steps))
    shape = flop_shape(engine.module)                  # the one MFU definition: bco_ray/train/throughput.py
    # Dense peak of this GPU in the training dtype (H100 PCIe/NVL, fp32 → TF32, $BCO_RAY_PEAK_TFLOPS); None: no mfu.
    peak_flops = gpu_peak_flops(torch.cuda.get_device_name(), "bf16" if use_bf16(t, on_gpu) else "fp32") \
        if on_gpu else None
    timings = {"engine_ready_at": time.time(), "train": 0.0, "eval": 0.0, "save": 0.0}
    if rank == 0:
        console(f"[bco-ray] worker group ready: {timings['engine_ready_at'] - config['fit_started_at']:.1f} s after "
                f"fit (in the worker: {t_dist - t_entry:.1f} s to join the process group, {t_model - t_dist:.1f} s "
                f"to load the policy, {timings['engine_ready_at'] - t_model:.1f} s to build the engine)")
    delta = DeviceRunningMean(device)                  # on the device: no host sync per micro-batch
    step, epoch, skip = 0, 0, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            if os.path.exists(os.path.join(d, "final.json")):     # this run name already finished
                _report_finished(d, rank)
                return
            _, client = engine.load_checkpoint(d, tag="ds")
        delta.load_state_dict(client["delta"])
        step, epoch, skip = client["step"], client["epoch"], client["micro_in_epoch"]
        torch.set_rng_state(client["rng"])
        if rank == 0:
            console(f"[bco-ray] resumed from checkpoint at step {step} (epoch {epoch}, δ={float(delta.mean):.6f})")

    logger = StepLogger(config.get("mlflow"), rank, buffered=t.save_steps > 0)
    pad_id = config["pad_id"]
    window, t_window = DeviceWindowSums(device), time.time()
    budget = t.micro_batch_tokens if t.micro_batch_tokens >= 0 else t.micro_batch_size * cfg.data.max_length
    chunk = cfg.precompute.logp_chunk_size
    shard = ray.train.get_dataset_shard("train")       # the whole ordered split: see rank_batches
    eval_ds = ray.train.get_dataset_shard("eval") if config.get("has_eval") else None

    def checkpoint(metrics: dict, micro_in_epoch: int, ep: int) -> None:
        """Every rank's DeepSpeed state, δ, data position and RNG; Ray merges the ranks' files into one
        checkpoint directory on the run's storage and keeps the last `keep_checkpoints`."""
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag="ds", client_state={
                "delta": delta.state_dict(), "step": step, "epoch": ep, "micro_in_epoch": micro_in_epoch,
                "rng": torch.get_rng_state()})
            with open(os.path.join(d, f"rank{rank}.json"), "w") as f:
                json.dump({"rank": rank, "node_id": ctx.get_node_id() if hasattr(ctx, "get_node_id") else
                           ray.get_runtime_context().get_node_id(), "step": step}, f)
            logger.flush()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"checkpoint_step{step:07d}")
        # Reports are registered by the controller asynchronously: wait, so that a worker dying right
        # after this point still restarts from this checkpoint (not from the previous one).
        ray.train.get_all_reported_checkpoints()

    t_train, grad_norm, step_rows = time.time(), 0.0, []
    if eval_ds is not None and step == 0 and cfg.eval.at_start:    # step 0: every eval curve starts at the reference
        logger.log(evaluate(engine.module, eval_ds, delta, cfg, pad_id, device, rank, world), 0)
        timings["eval"] += time.time() - t_train
        t_window = time.time()
    while step < total_steps:                      # epochs; max_steps may run past num_epochs
        micro, step_at_start = skip, step              # resuming mid-epoch: the first `skip` were trained already
        batches = packed_micro_batches(shard, t, rank, world, skip, pad_id, device, chunk) if budget > 0 else \
            padded_micro_batches(shard, t, rank, world, epoch, skip, pad_id, device)
        for batch, row_ids, units, last in batches:
            if micro >= micro_per_epoch or step >= total_steps:
                break
            if t.record_rows and row_ids is not None:
                step_rows.extend(row_ids.tolist())
            lr = scheduler.get_last_lr()[0]
            set_boundary(engine, batch, last)
            # Through the engine (not engine.module): ZeRO-3 counts micro-steps in the engine's forward.
            loss = micro_batch_loss(engine, batch, delta, t.beta, chunk, sums=window,
                                    flops=train_flops(shape, *batch["work"]))
            backward(engine, batch, loss)
            if t.zero_stage == 0 and engine.is_gradient_accumulation_boundary():
                grad_norm = _grad_norm(engine.module)    # DeepSpeed reports no global norm at ZeRO-0
            engine.step()
            micro += units
            if not last:
                continue
            _maybe_inject_failure(t.inject_failure_at_step, step + 1, micro, t.gradient_accumulation_steps,
                                  rank, world, config["storage_dir"])
            step += 1
            if t.record_rows:
                _record_rows(config["storage_dir"], rank, step, step_rows)
                step_rows = []
            if step % t.logging_steps == 0 or step == total_steps:
                m = window.reduce()
                elapsed = time.time() - t_window
                flops = m.pop("flops")
                if peak_flops:          # model FLOPs (bco_ray/train/throughput.py) per second, per GPU, over peak
                    m["mfu"] = flops / max(elapsed, 1e-9) / world / peak_flops
                m.update({"delta": float(delta.mean), "learning_rate": lr, "epoch": epoch + micro / micro_per_epoch,
                          "grad_norm": float(grad_norm if t.zero_stage == 0 else engine.get_global_grad_norm() or 0.0),
                          "tokens_per_second": m.pop("tokens") / max(elapsed, 1e-9),
                          "samples_per_second": (m["count/chosen"] + m["count/rejected"]) / max(elapsed, 1e-9)})
                logger.log(m, step)
                window.reset()
                t_window = time.time()
            if eval_ds is not None and t.eval_steps > 0 and step % t.eval_steps == 0 and step < total_steps:
                t_eval = time.time()
                logger.log(evaluate(engine.module, eval_ds, delta, cfg, pad_id, device, rank, world), step)
                if cfg.eval.generate:                # the policy of this step, for the driver's generation pass
                    save_snapshot(engine.module, config["storage_dir"], step, config["tokenizer_path"], rank,
                                  t.zero_stage, t.lora.enabled)
                t_window += time.time() - t_eval      # evaluation time is not training throughput
                timings["eval"] += time.time() - t_eval
            if t.save_steps > 0 and step % t.save_steps == 0 and step < total_steps:
                at_end = micro >= micro_per_epoch
                checkpoint({"step": step}, 0 if at_end else micro, epoch + 1 if at_end else epoch)
        if step == step_at_start and skip == 0:
            raise RuntimeError(f"rank {rank}: the training shard yielded no full micro-batch in epoch {epoch}")
        skip = 0
        epoch += 1

    timings["train"] = time.time() - t_train - timings["eval"]
    final = {"step": step, "delta": float(delta.mean)}
    if eval_ds is not None:
        t_eval = time.time()
        ev = evaluate(engine.module, eval_ds, delta, cfg, pad_id, device, rank, world)
        logger.log(ev, step)
        final.update(ev)
        timings["eval"] += time.time() - t_eval
    logger.flush()
    with tempfile.TemporaryDirectory() as d:
        t_save = time.time()
        save_final_model(engine.module, os.path.join(d, "model"), config["tokenizer_path"], rank, t.zero_stage,
                         lora_merged=t.lora.enabled and t.lora.save_merged)
        timings["save"] = time.time() - t_save
        final["timings"] = timings
        if rank == 0:
            with open(os.path.join(d, "final.json"), "w") as f:
                json.dump(final, f)
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None,
                         checkpoint_dir_name=f"final_step{step:07d}")
    if dist.is_initialized():
        dist.barrier()
