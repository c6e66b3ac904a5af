"""ZeRO-3 final save: the model is gathered to rank 0 one layer at a time, never whole on every rank.

Two spawned gloo ranks on CPU build a ZeRO-3 engine from `deepspeed_config(TrainConfig(zero_stage=3))` (as
the training loop does) over the tiny untied Qwen2 of test_zero3_lockstep (its lm_head is partitioned), and
call the loop's `save_final_model`. Every `GatheredParameters` call is recorded: the largest gather must be
one module's own parameters (the lm_head), well below the model's size. Rank 0's safetensors must equal the
model's weights exactly; rank 1 writes nothing."""

from __future__ import annotations

import os

import pytest
import torch
from test_zero3_lockstep import CHILD_TIMEOUT_S, WORLD, _model, init_gloo_rank, record_error, run_ranks

# Several processes (DeepSpeed ranks on gloo) or a bench run: the full suite, not `make test-fast`.
pytestmark = pytest.mark.slow


def _worker(rank: int, port: int, out_dir: str) -> None:
    try:
        import deepspeed

        from bco_ray.builtin import tokenizer_path
        from bco_ray.config.schema import TrainConfig
        from bco_ray.train import policy
        from bco_ray.train.ds_config import deepspeed_config

        init_gloo_rank(rank, WORLD, port)
        cfg = deepspeed_config(TrainConfig(zero_stage=3, micro_batch_size=2, bf16=False), WORLD, on_gpu=False)
        model = _model()
        engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=list(model.parameters()))
        gathered = []  # elements each GatheredParameters call brings together
        real = deepspeed.zero.GatheredParameters

        def recording(params, *a, **kw):
            params = list(params) if not isinstance(params, torch.nn.Parameter) else [params]
            gathered.append(sum(getattr(p, "ds_numel", p.numel()) for p in params))
            return real(params, *a, **kw)

        deepspeed.zero.GatheredParameters = recording
        out = os.path.join(out_dir, f"model-rank{rank}")
        policy.save_final_model(engine.module, out, str(tokenizer_path()), rank, zero_stage=3)
        deepspeed.zero.GatheredParameters = real
        torch.save({"gathered": gathered, "saved": os.path.isdir(out)}, os.path.join(out_dir, f"rank{rank}.pt"))
        engine.destroy()
        torch.distributed.destroy_process_group()
    except BaseException:
        record_error(out_dir, rank)
        raise


@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
def test_zero3_final_save_gathers_one_layer_at_a_time_to_rank_0(tmp_path):
    from safetensors.torch import load_file

    codes, seconds = run_ranks(tmp_path, target=_worker)
    errors = {f.name: f.read_text()[-3000:] for f in tmp_path.glob("*.err")}
    assert not errors and codes == [0] * WORLD, (codes, errors)
    print(f"\n[zero3 save] 2 ranks: {seconds:.1f} s")
    recs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    expected = _model().state_dict()
    total = sum(v.numel() for v in expected.values())
    for r in range(WORLD):
        largest = max(recs[r]["gathered"])
        assert largest == expected["lm_head.weight"].numel() and largest < total / 2, (largest, total)
    assert recs[0]["saved"] and not recs[1]["saved"]
    saved = load_file(str(tmp_path / "model-rank0" / "model.safetensors"))
    assert saved.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0, msg=k)
    assert (tmp_path / "model-rank0" / "tokenizer.json").exists()
