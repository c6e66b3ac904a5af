"""Completion log-probs equal the model's own forward for every family: tiny random models (fp32, CPU), each
compared with log_softmax(model(input_ids, attention_mask).logits) gathered at the completion tokens, values
and gradients; the families whose logits are post-processed (Gemma2 softcap, Cohere logit_scale, Granite
logits_scaling) stay on the memory-light path; an unknown post-processing falls back to the full forward;
MoE auxiliary loss matches the model's `aux_loss`."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    GraniteConfig,
    LlamaConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from bco_ray.bco.logprobs import (
    completion_logps,
    light_path_ok,
    policy_completion_logps,
    router_aux_loss_coef,
    router_aux_loss_enabled,
)

from tiny_models import tiny_kwargs

V, T = 64, 12
_COMMON = tiny_kwargs(V, bos_token_id=0, eos_token_id=1, pad_token_id=2)

CONFIGS = {
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "llama": lambda: LlamaConfig(**_COMMON),
    "gemma2": lambda: Gemma2Config(**{**_COMMON, "initializer_range": 0.5}, head_dim=8, final_logit_softcapping=2.0),
    "cohere": lambda: CohereConfig(**_COMMON, logit_scale=0.25),
    "granite": lambda: GraniteConfig(**_COMMON, logits_scaling=4.0),
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **_COMMON,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
    ),
}


def _model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="eager").eval()


def _batch():
    """Right-padded rows of different lengths: a full row, a prompt of one token, an empty completion."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([9, 12, 5, 7])
    prompt_len = torch.tensor([4, 1, 2, 7])  # last row: nothing to predict
    ids = torch.randint(0, V, (4, T), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids[mask == 0] = 2  # right padding
    return ids, mask, prompt_len


N_COMPLETION = 5 + 11 + 3  # completion tokens in _batch()
COEF = torch.tensor([1.0, -0.5, 2.0, 3.0])  # arbitrary per-row weights for the backward


def _reference(model, ids, mask, prompt_len):
    """(per-row summed log-probs, aux loss or None) from the model's own full logits."""
    out = model(input_ids=ids, attention_mask=mask)
    lp = out.logits.float()[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    t = torch.arange(1, ids.shape[1]).unsqueeze(0)
    keep = (t >= prompt_len.unsqueeze(1)) & (t < mask.sum(1, keepdim=True))
    return (lp * keep).sum(-1), getattr(out, "aux_loss", None)


def _grads_of(model, fn):
    model.zero_grad(set_to_none=True)
    logps, aux = fn()
    loss = (logps * COEF).sum() + (aux if aux is not None else 0.0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logps.detach(), (aux.detach() if aux is not None else None), grads


def _assert_grads_close(got: dict, want: dict):
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


@pytest.fixture(scope="module")
def models():
    return {f: _model(f) for f in CONFIGS}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_family_matches_full_logits(models, family):
    model = models[family]
    ids, mask, prompt_len = _batch()
    ref, ref_aux, ref_grads = _grads_of(model, lambda: _reference(model, ids, mask, prompt_len))
    assert light_path_ok(model), f"{family}: the known families stay on the memory-light path"
    for chunk_size in (1, 4, 1024):
        got, aux, grads = _grads_of(
            model,
            lambda chunk_size=chunk_size: policy_completion_logps(
                model, ids, mask, prompt_len, chunk_size, return_aux_loss=True
            ),
        )
        assert got.dtype == torch.float32 and got[3].item() == 0.0 and (got[:3] < 0).all()
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        _assert_grads_close(grads, ref_grads)
        if family == "qwen2_moe":
            torch.testing.assert_close(aux, ref_aux, atol=1e-6, rtol=1e-5)
        else:
            assert aux is None
    with torch.no_grad():  # the no-grad path (no checkpointing), and the plain return type
        got = policy_completion_logps(model, ids, mask, prompt_len, 3)
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [N_COMPLETION - 1, N_COMPLETION, N_COMPLETION + 1])
def test_chunk_edges_gemma2(models, chunk_size):
    model = models["gemma2"]
    ids, mask, prompt_len = _batch()
    ref, _, ref_grads = _grads_of(model, lambda: _reference(model, ids, mask, prompt_len))
    got, _, grads = _grads_of(model, lambda: (policy_completion_logps(model, ids, mask, prompt_len, chunk_size), None))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    _assert_grads_close(grads, ref_grads)


def test_old_backbone_plus_lm_head_was_wrong_for_gemma2(models):
    """The previous implementation (decoder hidden states → lm_head, no softcap) is far off for Gemma2."""
    model = models["gemma2"]
    ids, mask, prompt_len = _batch()
    with torch.no_grad():
        ref, _ = _reference(model, ids, mask, prompt_len)
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        old = completion_logps(hidden, model.get_output_embeddings(), ids, prompt_len, mask.sum(1))
        new = policy_completion_logps(model, ids, mask, prompt_len)
    assert ((old[:3] - ref[:3]).abs() > 10).all()  # 2-3x the true value
    assert (old[:3] / ref[:3] > 2).all()
    torch.testing.assert_close(new, ref, atol=1e-5, rtol=1e-5)


def test_moe_aux_loss_and_coef(models):
    moe, dense = models["qwen2_moe"], models["qwen2"]
    assert router_aux_loss_enabled(moe) and router_aux_loss_coef(moe) == pytest.approx(0.02)
    assert not router_aux_loss_enabled(dense) and router_aux_loss_coef(dense) == 0.0
    ids, mask, prompt_len = _batch()
    with torch.no_grad():
        _, ref_aux = _reference(moe, ids, mask, prompt_len)
        _, aux = policy_completion_logps(moe, ids, mask, prompt_len, return_aux_loss=True)
    assert ref_aux is not None and ref_aux.item() > 0
    torch.testing.assert_close(aux, ref_aux, atol=1e-6, rtol=1e-5)


class _UnknownPostprocessing(Qwen2ForCausalLM):
    """A family whose forward post-processes logits in a way the light head does not know about."""

    seen_logits_to_keep: list = []

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
        self.seen_logits_to_keep.append(logits_to_keep)
        out = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, **kwargs
        )
        out.logits = 3.0 * out.logits + 0.1 * out.logits**2
        return out


def test_unknown_postprocessing_falls_back_to_full_forward():
    torch.manual_seed(0)
    model = _UnknownPostprocessing(Qwen2Config(**_COMMON)).eval()
    model.train()  # the probe runs in eval mode and restores the modes
    model.model.layers[0].eval()
    ids, mask, prompt_len = _batch()
    ref, _, ref_grads = _grads_of(model, lambda: _reference(model, ids, mask, prompt_len))
    model.seen_logits_to_keep.clear()
    for chunk_size in (1, 5, 1024):
        got, _, grads = _grads_of(
            model,
            lambda chunk_size=chunk_size: (policy_completion_logps(model, ids, mask, prompt_len, chunk_size), None),
        )
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        _assert_grads_close(grads, ref_grads)
    assert not light_path_ok(model)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    # probe (full logits, 0) once, then each call keeps only the completion span: positions 0..T-1 here
    # (row 1 has a one-token prompt, so its first predictor is position 0)
    assert model.seen_logits_to_keep == [0, T, T, T]
    shorter = prompt_len.clone()
    shorter[1] = 6  # now the first predictor is position 1 (row 2)
    with torch.no_grad():
        policy_completion_logps(model, ids, mask, shorter)
    assert model.seen_logits_to_keep[-1] == T - 1


class _UnknownMoe(Qwen2MoeForCausalLM):
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits.tanh() * 4.0
        return out


def test_unknown_postprocessing_moe_fallback_keeps_aux_loss():
    torch.manual_seed(0)
    model = _UnknownMoe(CONFIGS["qwen2_moe"]()).eval()
    ids, mask, prompt_len = _batch()
    ref, ref_aux, ref_grads = _grads_of(model, lambda: _reference(model, ids, mask, prompt_len))
    got, aux, grads = _grads_of(
        model, lambda: policy_completion_logps(model, ids, mask, prompt_len, 4, return_aux_loss=True)
    )
    assert not light_path_ok(model)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux, ref_aux, atol=1e-6, rtol=1e-5)
    _assert_grads_close(grads, ref_grads)


def test_probe_runs_once_per_model_instance(monkeypatch):
    import bco_ray.bco.logprobs as lp

    calls = []
    real = lp._probe
    monkeypatch.setattr(lp, "_probe", lambda m, d: calls.append(m) or real(m, d))
    model = _model("gemma2")
    ids, mask, prompt_len = _batch()
    for _ in range(3):
        policy_completion_logps(model, ids, mask, prompt_len)
    policy_completion_logps(_model("gemma2"), ids, mask, prompt_len)
    assert len(calls) == 2


def test_peft_lora_wrapped_gemma2(models):
    """Under LoRA the training loop passes a PeftModel: the light path sees through it."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _model("gemma2", seed=3), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    ids, mask, prompt_len = _batch()
    ref, _, ref_grads = _grads_of(model, lambda: _reference(model, ids, mask, prompt_len))
    got, _, grads = _grads_of(model, lambda: (policy_completion_logps(model, ids, mask, prompt_len, 4), None))
    assert light_path_ok(model)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    _assert_grads_close(grads, ref_grads)
