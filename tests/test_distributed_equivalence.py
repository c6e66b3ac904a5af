"""Data parallelism does not change the maths: 2 gloo ranks × micro-batch b give the same per-row losses
and rewards, the same δ after every micro-batch and the same all-reduced window metrics as 1 process × 2b.

No optimizer step (lr 0 equivalent): the model stays fixed, so only the δ pooling and the metric reduction
are under test, plus padding invariance (each rank pads its half to its own longest row)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import socket
import traceback

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tiny_models import tiny_qwen2

# Several processes (DeepSpeed ranks on gloo) or a bench run: the full suite, not `make test-fast`.
pytestmark = pytest.mark.slow

B = 3  # rows per rank per micro-batch
WORLD = 2
MICRO = 3  # consecutive micro-batches
BETA = 0.1
PAD_ID = 0
VOCAB = 50


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    return tiny_qwen2(VOCAB)


def _global_batches() -> list[dict[str, np.ndarray]]:
    """MICRO micro-batches of WORLD*B rows with varied lengths, prompt lengths, labels and weights."""
    rng = np.random.default_rng(123)
    out = []
    for _ in range(MICRO):
        n = WORLD * B
        lengths = rng.integers(4, 16, size=n)
        prompt_len = np.array([rng.integers(1, L) for L in lengths])
        out.append(
            {
                "input_ids": np.array([rng.integers(1, VOCAB, size=L) for L in lengths], dtype=object),
                "prompt_len": prompt_len,
                "label": rng.random(n) < 0.5,
                # ref log-probs roughly where a random 50-token model puts them (≈ -log 50 per token)
                "ref_logps": (-(lengths - prompt_len) * np.log(VOCAB) + rng.normal(0, 2, n)).astype(np.float32),
                "udm_weight": rng.uniform(0.5, 3.0, size=n).astype(np.float32),
            }
        )
    return out


def _run(rows: slice | None):
    """bco_forward over the MICRO micro-batches (this process's rows); per-micro-batch records."""
    from bco_ray.bco.loss import RunningMean
    from bco_ray.train.batches import collate
    from bco_ray.train.forward import bco_forward
    from bco_ray.train.metrics import WindowSums

    torch.set_num_threads(1)
    model = _model()
    delta, window, total = RunningMean(), WindowSums(), WindowSums()
    rec = {"delta": [], "losses": [], "rewards": [], "logps": [], "window": [], "total": None}
    for g in _global_batches():
        part = {k: v[rows] for k, v in g.items()} if rows is not None else g
        batch = collate(part, PAD_ID)
        losses, rewards, logps = bco_forward(model, batch, delta, BETA, chunk_size=4)
        losses.mean().backward()  # as in training; no optimizer step
        tokens = int(batch.attention_mask.sum())
        for w in (window, total):
            w.add(losses, rewards, logps, batch.label, tokens)
        rec["delta"].append(float(delta.mean))
        rec["losses"].append(losses.detach())
        rec["rewards"].append(rewards.detach())
        rec["logps"].append(logps.detach())
        rec["window"].append(window.reduce())
        window.reset()
    rec["total"] = total.reduce()
    return rec


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
        rec = _run(slice(rank * B, (rank + 1) * B))
        dist.barrier()
        dist.destroy_process_group()
        torch.save(rec, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _assert_metrics_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), k


@pytest.mark.timeout(120)
def test_two_ranks_equal_one_process_with_double_batch(tmp_path):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=100)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = {f.name: f.read_text() for f in tmp_path.glob("*.err")}
    assert not errors, errors
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = _run(None)  # no process group in this process: 1 worker × 2b rows

    for k in range(MICRO):
        # the same δ on every rank, equal to the single process's δ (rewards of all ranks pooled)
        assert ranks[0]["delta"][k] == pytest.approx(single["delta"][k], abs=1e-5)
        assert ranks[1]["delta"][k] == ranks[0]["delta"][k]
        # per-row numbers: rank r's rows are rows [r*b, (r+1)*b) of the single run
        for key in ("losses", "rewards", "logps"):
            torch.testing.assert_close(torch.cat([rk[key][k] for rk in ranks]), single[key][k], atol=1e-5, rtol=1e-5)
        # all-reduced window metrics: identical on both ranks and equal to the single process's
        _assert_metrics_close(ranks[0]["window"][k], ranks[1]["window"][k])
        _assert_metrics_close(ranks[0]["window"][k], single["window"][k])
        assert single["window"][k]["count/chosen"] + single["window"][k]["count/rejected"] == WORLD * B
    # δ really moves between micro-batches (the test would be vacuous otherwise)
    assert len({round(d, 6) for d in single["delta"]}) == MICRO
    _assert_metrics_close(ranks[0]["total"], single["total"])
    _assert_metrics_close(ranks[1]["total"], single["total"])
    assert single["total"]["count/chosen"] + single["total"]["count/rejected"] == MICRO * WORLD * B
