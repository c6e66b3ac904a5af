"""Packed micro-batches (bco_ray/data/packing.py) score rows exactly as right-padded ones do.

Tiny random Qwen2 (sdpa), Llama (sdpa) and Gemma2 (eager, soft-capped logits, sliding-window layers shorter
than the longest row) in float32 on CPU. Rows of very different lengths (3 to 90 tokens), one of them longer
than the token budget (a pack of its own), a row with a one-token prompt and one with nothing to predict; one
rank gets an empty pack. Per-row log-probs and the gradient of an arbitrary weighted sum of them equal the
padded batch's (`collate` + `policy_completion_logps`) to 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen2Config

from bco_ray.bco.logprobs import packed_completion_logps, policy_completion_logps
from bco_ray.data.packing import collate_packed, completion_tokens, pack_rows, plan_step
from bco_ray.train.batches import collate

from tiny_models import tiny_kwargs

V, PAD = 64, 2
BUDGET, CHUNK = 64, 7
_COMMON = tiny_kwargs(V, max_position_embeddings=256, pad_token_id=PAD)
CONFIGS = {
    "qwen2": (lambda: Qwen2Config(**_COMMON), "sdpa"),
    "llama": (lambda: LlamaConfig(**_COMMON), "sdpa"),
    "gemma2": (lambda: Gemma2Config(**_COMMON, head_dim=8, final_logit_softcapping=2.0, sliding_window=16), "eager"),
}
LENGTHS = [5, 90, 12, 40, 3, 70, 2]
PROMPT = [2, 30, 1, 10, 3, 0, 1]  # row 4: nothing to predict; row 5: prompt_len 0 (from position 1)


def _rows() -> dict:
    rng = np.random.default_rng(0)
    ids = np.empty(len(LENGTHS), dtype=object)
    ids[:] = [rng.integers(3, V, n) for n in LENGTHS]
    return {
        "input_ids": ids,
        "prompt_len": np.array(PROMPT),
        "label": np.arange(len(LENGTHS)) % 2 == 0,
        "ref_logps": np.zeros(len(LENGTHS), np.float32),
        "udm_weight": np.ones(len(LENGTHS), np.float32),
    }


def _model(family: str):
    make, attn = CONFIGS[family]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(make(), attn_implementation=attn)


def test_pack_rows_keeps_every_row_once_within_the_budget():
    packs = pack_rows(LENGTHS, BUDGET)
    assert sorted(i for p in packs for i in p) == list(range(len(LENGTHS)))
    for p in packs:
        assert len(p) == 1 or sum(LENGTHS[i] for i in p) <= BUDGET
    assert [1] in packs  # 90 > 64: a pack of its own
    assert pack_rows([], BUDGET) == []


def test_plan_step_gives_every_rank_as_many_packs_and_chunks():
    lengths = [LENGTHS, [4, 6]]  # rank 1: one small pack, then empty ones
    prompts = [PROMPT, [1, 2]]
    plans = [plan_step(lengths, prompts, BUDGET, CHUNK, r) for r in range(2)]
    assert len(plans[0][0]) == len(plans[1][0]) > 1
    assert plans[0][1] == plans[1][1]  # same head chunks per pack on both ranks
    assert plans[1][0][1:] == [[]] * (len(plans[1][0]) - 1)
    for j, pack in enumerate(plans[0][0]):
        need = -(-sum(completion_tokens(LENGTHS[i], PROMPT[i]) for i in pack) // CHUNK)
        assert plans[0][1][j] >= need


def test_collate_packed_layout():
    rows = _rows()
    b = collate_packed(rows, [0, 2], PAD, rows_in_step=4)
    assert b["input_ids"].shape == (1, 17) and b["position_ids"][0].tolist() == list(range(5)) + list(range(12))
    assert b["segments"] == ((0, 5), (5, 17)) and b["cu_seq_lens"].tolist() == [0, 5, 17] and b["max_len"] == 12
    assert b["comp_row"].tolist() == [0] * 3 + [1] * 11
    assert b["comp_src"].tolist() == [1, 2, 3] + list(range(5, 16))
    assert torch.equal(b["comp_tgt"], b["input_ids"][0, b["comp_src"] + 1])
    assert b["row_weight"].tolist() == [0.25, 0.25] and b["tokens"] == 17 and b["sum_len_sq"] == 25 + 144
    e = collate_packed(rows, [], PAD, rows_in_step=4)
    assert e["rows"] == 0 and e["tokens"] == 0 and e["row_weight"].tolist() == [0.0] and e["valid"].tolist() == [0.0]


@pytest.mark.parametrize("family", list(CONFIGS))
def test_packed_equals_padded_values_and_gradients(family):
    rows = _rows()
    coef = torch.linspace(-1.0, 2.0, len(LENGTHS))
    model = _model(family)
    padded = collate(rows, PAD)
    ref = policy_completion_logps(model, padded.input_ids, padded.attention_mask, padded.prompt_len, CHUNK)
    (ref * coef).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    (packs, n_chunks), _ = plan_step([LENGTHS, [3]], [PROMPT, [1]], BUDGET, CHUNK, 0), None
    assert any(len(p) == 1 and LENGTHS[p[0]] > BUDGET for p in packs) and len(packs) >= 3
    got, total = torch.zeros(len(LENGTHS)), 0.0
    for pack, nc in list(zip(packs, n_chunks)) + [([], 1)]:  # and an empty pack, as a short rank runs it
        lp = packed_completion_logps(model, collate_packed(rows, pack, PAD, len(LENGTHS), nc), CHUNK)
        if pack:
            got[pack] = lp.detach()
            total = total + (lp * coef[pack]).sum()
        else:
            assert lp.shape == (1,) and torch.isfinite(lp).all()
            total = total + 0.0 * lp.sum()
    total.backward()
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-5)
    assert got[4] == 0.0
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-5, msg=n)


def test_gemma2_sliding_window_is_applied_within_rows():
    """The 90- and 70-token rows are longer than the 16-token window: the packed path must apply it."""
    rows = _rows()
    model = _model("gemma2")
    refs = []
    for window in (16, 256):
        model.config.sliding_window = window
        for layer in model.model.layers:
            layer.self_attn.sliding_window = window if layer.self_attn.sliding_window else None
        padded = collate(rows, PAD)
        with torch.no_grad():
            ref = policy_completion_logps(model, padded.input_ids, padded.attention_mask, padded.prompt_len)
            got = packed_completion_logps(model, collate_packed(rows, [1, 5], PAD, 2))
        torch.testing.assert_close(got, ref[[1, 5]], rtol=1e-5, atol=1e-5)
        refs.append(ref)
    assert not torch.allclose(refs[0][[1, 5]], refs[1][[1, 5]])  # the window changes these rows


def test_reference_pass_packed_equals_padded(tmp_path):
    """The reference-log-prob stage (`RefLogps`) scores the same numbers packed and padded."""
    import pyarrow as pa

    from bco_ray.precompute.stages import RefLogps

    _model("qwen2").save_pretrained(tmp_path, safe_serialization=True)
    rows = _rows()
    table = pa.table(
        {
            "input_ids": pa.array([x.tolist() for x in rows["input_ids"]], pa.list_(pa.int32())),
            "prompt_len": pa.array(rows["prompt_len"], pa.int32()),
        }
    )
    out = {
        packed: RefLogps(str(tmp_path), None, "float32", 0, BUDGET, CHUNK, PAD, packed=packed)(table)
        for packed in (False, True)
    }
    np.testing.assert_allclose(
        out[True].column("ref_logps").to_numpy(), out[False].column("ref_logps").to_numpy(), rtol=1e-5, atol=1e-5
    )
    assert out[True].column("pad_tokens").to_numpy().sum() == 0 < out[False].column("pad_tokens").to_numpy().sum()
