"""The log-prob kernel (`TokenLogps`: one pass over a [chunk, vocab] tile in forward, only the log-sum-exp
kept for backward) equals a float64 full-logits reference, values and gradients, at and across chunk edges."""

from __future__ import annotations

import pytest
import torch

from bco_ray.bco.logprobs import summed_head_logps, token_logps

N, H, VOCAB = 23, 16, 97


def test_token_logps_matches_float64_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, VOCAB, generator=g) * 4).requires_grad_()
    targets = torch.randint(0, VOCAB, (N,), generator=g)
    coef = torch.randn(N, generator=g)
    got = token_logps(logits, targets)
    (got * coef).sum().backward()
    ref_logits = logits.detach().double().requires_grad_()
    ref = ref_logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    (ref * coef.double()).sum().backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-6)


def test_bf16_logits_are_reduced_in_float32():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(N, VOCAB, generator=g) * 4
    targets = torch.randint(0, VOCAB, (N,), generator=g)
    got = token_logps(logits.bfloat16(), targets)
    ref = logits.bfloat16().double().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)  # exact up to float32: no bf16 rounding


@pytest.mark.parametrize("chunk", [1, 5, 11, 22, 23, 24, 1024])
def test_summed_head_logps_equals_float64_reference_at_every_chunk_size(chunk):
    """23 states in chunks of 1, 5, 11, 22 (one state past the edge), 23 (exactly one), 24 and 1024."""
    g = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(H, VOCAB, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, H, generator=g))
    h = torch.randn(N, H, generator=g).requires_grad_()
    targets = torch.randint(0, VOCAB, (N,), generator=g)
    rows = torch.sort(torch.randint(0, 4, (N,), generator=g)).values
    coef = torch.tensor([1.0, -2.0, 0.5, 3.0])
    got = summed_head_logps(head, h, targets, rows, 4, chunk)
    (got * coef).sum().backward()

    w = head.weight.detach().double().requires_grad_()
    hd = h.detach().double().requires_grad_()
    lp = (hd @ w.T).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    ref = torch.zeros(4, dtype=torch.float64).index_add(0, rows, lp)
    (ref * coef.double()).sum().backward()
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), hd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.weight.grad.double(), w.grad, rtol=1e-5, atol=1e-5)
