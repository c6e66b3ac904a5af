"""ZeRO-3: ranks with different completion-token counts still call the output head in lockstep.

Under DeepSpeed ZeRO-3 every call of a partitioned module gathers its weight: a collective all ranks must
join. `completion_logps` runs the output head in chunks of `chunk_size` completion tokens (and again in
backward: each chunk is checkpointed), so a rank with more completion tokens would make more calls than the
others and training would hang (it did: 2 ranks, chunk size 8, timeout). `_chunks_in_lockstep` all-reduces
the chunk count (MAX) so that every rank runs as many chunks, empty ones past its end.

Two spawned gloo ranks on CPU, a tiny random Qwen2 in fp32 with untied embeddings whose lm_head (2048 × 64
= 131,072 elements) is above DeepSpeed's `stage3_param_persistence_threshold` (1e5), so it is partitioned.
The engine is built from `deepspeed_config(TrainConfig(zero_stage=3))` as the training loop builds it, and
each rank runs the loop's step code (`bco_forward(engine, ...)` → `engine.backward` → `engine.step`) on 2
micro-batches: rank 0's rows have ~10× the completion tokens of rank 1's. First with chunk size 1024 (one
chunk on each rank: the reference), then with chunk size 4 (rank 0 needs 17 chunks, rank 1 only 2).

Checked: both ranks finish (a hang fails on the timeout, the children are killed), losses are finite, both
ranks call the head equally often, and the chunked run equals the reference: the full gradient of every
micro-batch to 1e-6, per-row log-probs and gradient norms to 1e-5 relative, parameters to 1e-5 after the two
optimizer steps. The learning rate is small (1e-4) because Adam turns float32 rounding of gradients near
zero (|g| ~ its eps, 1e-8) into parameter differences of ~2% of the learning rate (1.7e-5 at lr 1e-3 with
gradients equal to 5e-8): the gradient check is the tight one."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import socket
import time
import traceback
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from bco_ray.train.jit_builds import init_distributed

from tiny_models import tiny_kwargs

# Several processes (DeepSpeed ranks on gloo) or a bench run: the full suite, not `make test-fast`.
pytestmark = pytest.mark.slow

WORLD = 2
ROWS = 2  # rows per rank per micro-batch
MICRO = 2  # micro-batches (= optimizer steps: gradient_accumulation_steps 1)
VOCAB, HIDDEN = 2048, 64  # lm_head 131,072 elements > stage3_param_persistence_threshold (1e5): partitioned
SMALL_CHUNK, BIG_CHUNK = 4, 1024
LR = 1e-4  # Adam amplifies float32 rounding where |grad| ~ eps (1e-8): ~0.02·lr (module docstring)
BETA = 0.1
PAD_ID = 0
TOL = 1e-5
GRAD_TOL = 1e-6  # the chunked sums differ from one chunk's by float32 rounding (5e-8 seen)
PG_TIMEOUT_S = 45  # a rank left waiting in a collective fails after this (gloo timeout): how a hang shows
CHILD_TIMEOUT_S = 240  # backstop: children still alive then are killed (room for DeepSpeed's first-use JIT
# build of its CPU comm op, about a minute on a fresh machine; ~40 s in all otherwise)

# per rank: (completion tokens of each row) — rank 0 ~10× rank 1, so their chunk counts differ at SMALL_CHUNK
COMPLETION = {0: (36, 32), 1: (4, 3)}
PROMPT = {0: (4, 6), 1: (6, 5)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    """A tiny random Qwen2, fp32, untied embeddings (lm_head is its own partitioned parameter), seeded."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        **tiny_kwargs(VOCAB, 128, 0.02, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=1),
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Qwen2ForCausalLM(cfg)


def _micro_batches(rank: int) -> list[dict]:
    """This rank's MICRO micro-batches of ROWS rows (the raw columns the loop collates)."""
    rng = np.random.default_rng(100 + rank)
    out = []
    for _ in range(MICRO):
        plen, comp = np.array(PROMPT[rank]), np.array(COMPLETION[rank])
        ids = np.empty(ROWS, dtype=object)
        ids[:] = [rng.integers(1, VOCAB, size=p + c) for p, c in zip(plen, comp)]
        out.append(
            {
                "input_ids": ids,
                "prompt_len": plen,
                "label": np.array([True, False]),
                "ref_logps": (-comp * np.log(VOCAB) + rng.normal(0, 2, ROWS)).astype(np.float32),
                "udm_weight": rng.uniform(0.5, 2.0, size=ROWS).astype(np.float32),
            }
        )
    return out


def _train(chunk_size: int, rank: int) -> dict:
    """The loop's engine set-up and step code at this chunk size; per-micro-batch records and final params."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from bco_ray.bco.loss import RunningMean
    from bco_ray.config.schema import TrainConfig
    from bco_ray.train.batches import collate
    from bco_ray.train.ds_config import deepspeed_config
    from bco_ray.train.forward import bco_forward

    t = TrainConfig(
        zero_stage=3,
        micro_batch_size=ROWS,
        gradient_accumulation_steps=1,
        lr=LR,
        beta=BETA,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        bf16=False,
    )
    cfg = deepspeed_config(t, world_size=WORLD, on_gpu=False)
    assert "stage3_param_persistence_threshold" not in cfg["zero_optimization"]  # DeepSpeed's default, 1e5
    model = _model()
    engine, *_ = deepspeed.initialize(
        model=model, config=cfg, model_parameters=[p for p in model.parameters() if p.requires_grad]
    )
    head = engine.module.get_output_embeddings()
    assert hasattr(head.weight, "ds_id") and not head.weight.ds_persist  # partitioned: gathered per call
    calls = [0]
    head.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    delta = RunningMean()
    rec = {"losses": [], "logps": [], "grads": [], "grad_norm": [], "head_calls": [], "completion_tokens": []}
    for raw in _micro_batches(rank):
        batch = collate(raw, PAD_ID)
        before = calls[0]
        losses, _, logps = bco_forward(engine, batch, delta, BETA, chunk_size)
        loss = losses.mean()
        engine.backward(loss)
        rec["grads"].append(
            {
                n: safe_get_full_grad(p).detach().clone()  # all-gathered: every rank's rows
                for n, p in engine.module.named_parameters()
            }
        )
        engine.step()
        rec["losses"].append(loss.item())
        rec["logps"].append(logps.detach().clone())
        rec["grad_norm"].append(float(engine.get_global_grad_norm()))
        rec["head_calls"].append(calls[0] - before)  # forward chunks + their recomputation in backward
        rec["completion_tokens"].append(int((batch.attention_mask.sum(1) - batch.prompt_len).sum()))
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        rec["params"] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    engine.destroy()
    return rec


def init_gloo_rank(rank: int, world: int, port: int) -> None:
    """One spawned rank of a gloo process group on loopback, one thread, as DeepSpeed's launcher would set it up."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    init_distributed("gloo", auto_mpi_discovery=False, verbose=False, timeout=timedelta(seconds=PG_TIMEOUT_S))


def record_error(out_dir: str, rank: int) -> None:
    """Inside a rank's `except`: its traceback, for the test to show (a spawned child's stderr is lost)."""
    with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
        f.write(traceback.format_exc())


def _worker(rank: int, port: int, out_dir: str) -> None:
    try:
        init_gloo_rank(rank, WORLD, port)
        for chunk in (BIG_CHUNK, SMALL_CHUNK):  # the reference first: a hang shows in the second
            t0 = time.perf_counter()
            rec = _train(chunk, rank)
            rec["seconds"] = time.perf_counter() - t0
            torch.save(rec, os.path.join(out_dir, f"chunk{chunk}-rank{rank}.pt"))
        torch.distributed.destroy_process_group()
    except BaseException:
        record_error(out_dir, rank)
        raise


def run_ranks(
    out_dir, target=_worker, timeout: float = CHILD_TIMEOUT_S, world: int = WORLD, args: tuple = ()
) -> tuple[list, float]:
    """Spawn `world` ranks of target(rank, port, out_dir, *args); kill whichever is still running at the
    deadline. (exit codes, seconds)"""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, port, str(out_dir), *args), daemon=True) for r in range(world)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=max(0.0, t0 + timeout - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [p.exitcode for p in procs], time.monotonic() - t0


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("zero3_lockstep")
    codes, seconds = run_ranks(out)
    done = sorted(f.name for f in out.glob("chunk*.pt"))
    errors = {f.name: f.read_text()[-3000:] for f in out.glob("*.err")}
    assert not errors and codes == [0] * WORLD, (
        f"exit codes {codes} after {seconds:.0f} s (None: killed at the deadline); finished: {done} "
        f"(a timed-out collective at chunk size {SMALL_CHUNK} only: the ranks fell out of lockstep); {errors}"
    )
    print(f"\n[zero3 lockstep] 2 ranks, both chunk sizes: {seconds:.1f} s")
    return {c: [torch.load(out / f"chunk{c}-rank{r}.pt") for r in range(WORLD)] for c in (BIG_CHUNK, SMALL_CHUNK)}


@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
def test_ranks_need_different_chunk_counts_and_call_the_head_in_lockstep(runs):
    small = runs[SMALL_CHUNK]
    for r in range(WORLD):
        assert small[r]["completion_tokens"] == [sum(COMPLETION[r])] * MICRO
    # on its own, rank 0 would run 17 chunks per micro-batch (68 tokens) and rank 1 only 2 (7 tokens)
    need = [-(-sum(COMPLETION[r]) // SMALL_CHUNK) for r in range(WORLD)]
    assert need[0] > need[1]
    # both ranks call the head equally often (probe, forward chunks, recomputed chunks in backward)
    assert small[0]["head_calls"] == small[1]["head_calls"]
    assert small[0]["head_calls"][1] == 2 * max(need)  # micro-batch 2 (no probe): forward + recompute
    assert runs[BIG_CHUNK][0]["head_calls"] == runs[BIG_CHUNK][1]["head_calls"]
    for c in (BIG_CHUNK, SMALL_CHUNK):
        for r in range(WORLD):
            assert all(np.isfinite(runs[c][r]["losses"])), (c, r, runs[c][r]["losses"])


@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
def test_small_chunks_train_like_one_chunk(runs):
    big, small = runs[BIG_CHUNK], runs[SMALL_CHUNK]
    worst_grad = 0.0
    for r in range(WORLD):
        for k in range(MICRO):
            torch.testing.assert_close(small[r]["logps"][k], big[r]["logps"][k], rtol=TOL, atol=TOL)
            for n, g in big[r]["grads"][k].items():  # the full (all-reduced) gradient, before the step
                torch.testing.assert_close(small[r]["grads"][k][n], g, rtol=TOL, atol=GRAD_TOL, msg=n)
                worst_grad = max(worst_grad, float((small[r]["grads"][k][n] - g).abs().max()))
        assert small[r]["grad_norm"] == pytest.approx(big[r]["grad_norm"], rel=TOL)
        assert small[r]["losses"] == pytest.approx(big[r]["losses"], rel=TOL, abs=TOL)
    ref = big[0]["params"]
    moved = max(float((ref[n] - _model().state_dict()[n]).abs().max()) for n in ref)
    assert moved > 10 * TOL  # the two steps visibly changed the parameters
    for r in range(WORLD):
        assert small[r]["params"].keys() == ref.keys()
        diff = {n: float((small[r]["params"][n] - ref[n]).abs().max()) for n in ref}
        worst = max(diff, key=diff.get)
        print(
            f"\n[rank {r}] chunk {SMALL_CHUNK} vs {BIG_CHUNK}: max |Δgrad| {worst_grad:.2g}, max |Δparam| "
            f"{diff[worst]:.2g} ({worst}); parameters moved up to {moved:.2g}"
        )
        assert diff[worst] <= TOL, f"rank {r}: {worst} differs by {diff[worst]:.3g}"
        for n in ref:  # every rank holds the same model
            torch.testing.assert_close(big[r]["params"][n], ref[n], rtol=0, atol=0)
