"""The optional Liger Kernel output head (`model.liger_kernel`, bco_ray/bco/liger.py) equals the plain path.

Liger's kernels are Triton kernels; here they run on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`,
set before liger-kernel is first imported), the same kernel source a GPU compiles. Checked: per-token log-probs and
their gradients against a float64 reference (with Cohere- and Granite-style logit scaling), and a tiny Qwen2
model's packed per-row log-probs and every parameter's gradient against the plain chunked path. Gemma2's
soft-capped head keeps the plain path (Liger's soft-capping kernel does not run under the interpreter)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from test_packing import BUDGET, CHUNK, LENGTHS, PAD, PROMPT, _model, _rows

from bco_ray.bco import head_logps
from bco_ray.bco.head_logps import LogitHead, logit_head, summed_head_logps, use_liger_kernel
from bco_ray.bco.liger import liger_token_logps
from bco_ray.bco.logprobs import packed_completion_logps
from bco_ray.config.schema import Config, ConfigError, validate
from bco_ray.data.packing import collate_packed, plan_step, to_device

pytest.importorskip("liger_kernel", reason="liger-kernel is in the dev extra")

N, H, VOCAB = 41, 16, 97


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def interpreter():
    """On CPU, Triton's interpreter: tests/conftest.py turns it on before anything imports triton."""
    if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and Triton's interpreter is off (TRITON_INTERPRET=1 before triton is imported)")


def _float64_reference(h, w, b, targets, rows, n_rows, coef, scale=1.0):
    hd, wd = h.detach().cpu().double().requires_grad_(), w.detach().cpu().double().requires_grad_()
    bd = b.detach().cpu().double().requires_grad_() if b is not None else None
    targets, rows = targets.cpu(), rows.cpu()
    logits = ((hd @ wd.T) + (bd if bd is not None else 0.0)) * scale
    lp = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    out = torch.zeros(n_rows, dtype=torch.float64).index_add(0, rows, lp)
    (out * coef.cpu().double()).sum().backward()
    return out.detach(), hd.grad, wd.grad, (bd.grad if bd is not None else None)


@pytest.mark.parametrize(
    "post,bias",
    [({}, False), ({"multiply": 0.5}, False), ({"divide": 4.0}, False), ({"multiply": 0.5}, True)],
    ids=["plain", "logit_scale", "logits_scaling", "scaled_with_bias"],
)
def test_liger_head_equals_float64_reference(interpreter, post, bias):
    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(H, VOCAB, bias=bias, device=DEVICE)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, H, generator=g))
        if bias:
            head.bias.copy_(torch.randn(VOCAB, generator=g))
    h = torch.randn(N, H, generator=g).to(DEVICE).requires_grad_()
    targets = torch.randint(0, VOCAB, (N,), generator=g).to(DEVICE)
    rows = torch.sort(torch.randint(0, 5, (N,), generator=g)).values.to(DEVICE)
    coef = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.25], device=DEVICE)

    got = summed_head_logps(LogitHead(head, liger=True, **post), h, targets, rows, 5, chunk_size=7)
    (got * coef).sum().backward()
    scale = post.get("multiply", 1.0) / post.get("divide", 1.0)
    ref, ref_h, ref_w, ref_b = _float64_reference(h, head.weight, head.bias, targets, rows, 5, coef, scale)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.cpu().double(), ref_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.weight.grad.cpu().double(), ref_w, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(head.bias.grad.cpu().double(), ref_b, rtol=1e-5, atol=1e-5)


def _packed_logps_and_grads(model, rows, coef):
    (packs, n_chunks) = plan_step([LENGTHS], [PROMPT], BUDGET, CHUNK, 0)
    got, total = torch.zeros(len(LENGTHS), device=DEVICE), 0.0
    for pack, nc in zip(packs, n_chunks):
        batch = to_device(collate_packed(rows, pack, PAD, len(LENGTHS), nc), DEVICE)
        lp = packed_completion_logps(model, batch, CHUNK)
        got[pack] = lp.detach()
        total = total + (lp * coef[pack]).sum()
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return got, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_scored_with_liger_equals_plain_path(interpreter, monkeypatch, dtype):
    """A whole model's packed per-row log-probs and every parameter's gradient, Liger head vs the plain one: to
    float32 rounding in float32; in bf16 Liger rounds the logits' gradient to bf16 before scaling it by each
    token's upstream gradient, so gradients agree to bf16 rounding there (values still to float32 rounding)."""
    rows, coef = _rows(), torch.linspace(-1.0, 2.0, len(LENGTHS), device=DEVICE)
    model = _model("qwen2").to(DEVICE, dtype)
    plain, plain_grads = _packed_logps_and_grads(model, rows, coef)
    assert use_liger_kernel(model, DEVICE)
    assert logit_head(model).liger
    calls = []
    monkeypatch.setattr(head_logps, "liger_token_logps", lambda *a: calls.append(1) or liger_token_logps(*a))
    got, grads = _packed_logps_and_grads(model, rows, coef)
    assert len(calls) == len(plan_step([LENGTHS], [PROMPT], BUDGET, CHUNK, 0)[0])  # once per pack: Liger ran
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    for n, g in grads.items():
        if dtype == torch.float32:
            torch.testing.assert_close(g, plain_grads[n], rtol=1e-5, atol=1e-5, msg=n)
        else:  # a few bf16 ulps (2^-8 relative) of the tensor's largest entry: measured up to 1.5 % here
            ref = plain_grads[n].float()
            torch.testing.assert_close(g.float(), ref, rtol=0, atol=2**-5 * float(ref.abs().max()), msg=n)


def test_soft_capped_head_keeps_the_plain_path(interpreter):
    model = _model("gemma2")
    assert use_liger_kernel(model, DEVICE)  # the model opts in; its soft-capped head is not Liger's
    assert logit_head(model).softcap == 2.0 and not logit_head(model).liger


def test_without_a_triton_backend_the_plain_path_is_used(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = _model("qwen2")
    with caplog.at_level(logging.WARNING, logger="bco_ray.bco.head_logps"):
        assert not use_liger_kernel(model, torch.device("cpu"))
    assert not logit_head(model).liger
    assert "plain path" in caplog.text


def test_config_refuses_liger_under_zero3():
    cfg = Config()
    cfg.model.liger_kernel, cfg.train.zero_stage = True, 3
    with pytest.raises(ConfigError, match=r"model\.liger_kernel.*train\.zero_stage <= 2"):
        validate(cfg)
    cfg.train.zero_stage = 2
    validate(cfg)


def test_trl_use_liger_kernel_maps_to_the_model_field():
    from bco_ray import BCOConfig

    assert BCOConfig(output_dir="out", use_liger_kernel=True).to_config().model.liger_kernel


def test_config_names_the_missing_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name))
    cfg = Config()
    cfg.model.liger_kernel = True
    with pytest.raises(ConfigError, match=r"liger-kernel is not installed: pip install 'bco-ray\[liger\]'"):
        validate(cfg)


def test_the_trained_policy_uses_liger_and_scoring_without_gradients_does_not(interpreter, tmp_path, monkeypatch):
    """The job's wiring: `model.liger_kernel` reaches the policy the workers build; its forwards without
    gradients (evaluation, and the reference pass's alike) keep the plain path (bco_ray/bco/liger.py says why)."""
    from bco_ray.config.schema import load_config
    from bco_ray.job.run import resolve_paths
    from bco_ray.train.policy import build_policy

    cfg = load_config(overrides={"output_dir": str(tmp_path), "model": {"liger_kernel": True}})
    paths, _ = resolve_paths(cfg)
    model = build_policy(cfg, paths.policy, on_gpu=False)
    assert logit_head(model).liger
    calls = []
    monkeypatch.setattr(head_logps, "liger_token_logps", lambda *a: calls.append(1) or liger_token_logps(*a))
    rows = {"input_ids": [np.arange(3, 13), np.arange(5, 11)], "prompt_len": [4, 2]}
    batch = collate_packed(rows, [0, 1], PAD, 2)
    with torch.no_grad():
        packed_completion_logps(model, batch, CHUNK)
    assert calls == []
    packed_completion_logps(model, batch, CHUNK).sum().backward()
    assert calls == [1]
