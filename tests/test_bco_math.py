"""Hand-checked numbers for the BCO maths: per-row loss and rewards, the running reward shift δ,
summed completion log-probs (against a hand computation and against a full-logits reference), and the
UDM density-ratio weights. Expected values are written out with plain `math`, never with the code under test."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from bco_ray.bco.logprobs import completion_logps, completion_positions, policy_completion_logps
from bco_ray.bco.loss import RunningMean, bco_losses
from bco_ray.bco.udm import fit_udm_classifier, udm_weights

from tiny_models import tiny_qwen2


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------------------- bco_losses
def test_bco_losses_hand_computed():
    beta, delta = 0.1, 0.05
    policy = torch.tensor([-10.0, -15.0, -5.0, -3.0, -7.0])
    ref = torch.tensor([-12.0, -12.0, -5.0, -8.0, -9.0])
    labels = torch.tensor([True, False, True, False, True])
    weights = torch.tensor([1.0, 2.0, 7.0, 0.5, 1.0])  # row 2: a weight on a desirable row is ignored

    losses, rewards = bco_losses(policy, ref, labels, weights, beta, delta)

    # r = 0.1 * (policy - ref)
    exp_rewards = [0.1 * 2, 0.1 * -3, 0.0, 0.1 * 5, 0.1 * 2]  # 0.2, -0.3, 0, 0.5, 0.2
    exp_losses = [
        softplus(-(0.2 - 0.05)),  # desirable: -log σ(0.15) = log(1+e^-0.15) ≈ 0.620957
        2.0 * softplus(-0.3 - 0.05),  # undesirable, w=2: -2 log σ(-(-0.35)) = 2 log(1+e^-0.35) ≈ 1.0996
        softplus(0.05),  # desirable: -log σ(0 - 0.05) = log(1+e^0.05) ≈ 0.718306 (w=7 ignored)
        0.5 * softplus(0.5 - 0.05),  # undesirable, w=0.5: -0.5 log σ(-0.45) = 0.5 log(1+e^0.45) ≈ 0.4719
        softplus(-0.15),  # desirable, same as row 0
    ]
    assert math.isclose(exp_losses[0], 0.6209570, abs_tol=1e-6)
    assert rewards.dtype == torch.float32 and losses.dtype == torch.float32
    torch.testing.assert_close(rewards, torch.tensor(exp_rewards), atol=1e-6, rtol=0)
    torch.testing.assert_close(losses, torch.tensor(exp_losses), atol=1e-6, rtol=0)


def test_bco_losses_gradient_and_extremes():
    beta, delta = 0.1, 0.05
    policy = torch.tensor([-10.0, -15.0], requires_grad=True)
    ref = torch.tensor([-12.0, -12.0])
    labels = torch.tensor([True, False])
    weights = torch.tensor([1.0, 2.0])
    losses, _ = bco_losses(policy, ref, labels, weights, beta, delta)
    losses.sum().backward()

    def sig(x):
        return 1.0 / (1.0 + math.exp(-x))

    # desirable: d/dp [-log σ(β(p-ref)-δ)] = -β σ(-(r-δ)) = -0.1 σ(-0.15)
    # undesirable: d/dp [-w log σ(-(β(p-ref)-δ))] = w β σ(r-δ) = 2 * 0.1 * σ(-0.35)
    torch.testing.assert_close(policy.grad, torch.tensor([-0.1 * sig(-0.15), 0.2 * sig(-0.35)]), atol=1e-7, rtol=0)

    # numerically stable far in the tails: -log σ(-200) = 200 (no inf / nan)
    losses, _ = bco_losses(
        torch.tensor([-2000.0, 2000.0]),
        torch.tensor([0.0, 0.0]),
        torch.tensor([True, False]),
        torch.tensor([1.0, 3.0]),
        0.1,
        0.0,
    )
    torch.testing.assert_close(losses, torch.tensor([200.0, 600.0]))


def test_bco_losses_accepts_bf16_and_int_labels():
    losses, rewards = bco_losses(
        torch.tensor([-1.0, -2.0], dtype=torch.bfloat16),
        torch.tensor([-1.5, -1.0]),
        torch.tensor([1, 0]),
        torch.tensor([1.0, 1.0]),
        0.1,
        0.0,
    )
    assert losses.dtype == torch.float32
    torch.testing.assert_close(rewards, torch.tensor([0.05, -0.1]))
    torch.testing.assert_close(losses, torch.tensor([softplus(-0.05), softplus(-0.1)]))


# ----------------------------------------------------------------------------------------- RunningMean
def test_running_mean_sequence_and_state_dict():
    rm = RunningMean()
    assert rm.mean == 0.0 and rm.count == 1e-24
    # batch 1: [1, 2, 3], mean 2; count ≈ 0, so δ = 0 + (2 - 0) * 3 / (1e-24 + 3) = 2
    assert rm.update(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(2.0, abs=1e-6)
    assert rm.count == pytest.approx(3.0)
    # batch 2: [5]; δ = 2 + (5 - 2) * 1 / 4 = 2.75 = (1+2+3+5)/4
    assert rm.update(torch.tensor([5.0])) == pytest.approx(11 / 4, abs=1e-6)
    # an empty micro-batch changes nothing
    assert rm.update(torch.tensor([])) == pytest.approx(11 / 4, abs=1e-6)
    assert rm.count == pytest.approx(4.0)

    state = rm.state_dict()
    assert state["mean"] == pytest.approx(2.75) and state["count"] == pytest.approx(4.0)
    restored = RunningMean()
    restored.load_state_dict(state)
    assert restored.mean == rm.mean and restored.count == rm.count

    # batch 3: [0, 0]; δ = 2.75 + (0 - 2.75) * 2 / 6 = 11/6 = (1+2+3+5+0+0)/6
    for m in (rm, restored):
        assert m.update(torch.tensor([0.0, 0.0])) == pytest.approx(11 / 6, abs=1e-6)
    # batch 4: [4, 6, 8, 10, 2] (sum 30, n 5); δ = (11 + 30) / 11 = 41/11 ≈ 3.727273
    for m in (rm, restored):
        assert m.update(torch.tensor([4.0, 6.0, 8.0, 10.0, 2.0])) == pytest.approx(41 / 11, abs=1e-6)
        assert m.count == pytest.approx(11.0)
        assert m.mean == pytest.approx(41 / 11, abs=1e-6)
    # the update does not keep a graph and accepts bf16 / 2-D rewards
    x = torch.tensor([[1.0, 1.0]], dtype=torch.bfloat16, requires_grad=True)
    after = rm.update(x)  # δ stays on the rewards' device (a 0-d tensor): read only where it is logged
    assert after.ndim == 0 and not after.requires_grad and float(after) == pytest.approx((41 + 2) / 13, abs=1e-6)


# ----------------------------------------------------------------------- completion log-probs: hand model
# Count matrix C: with one-hot hidden states and lm_head logits log C[a], p(v | previous token a) = C[a, v] / sum_v C[a, v].
C = torch.tensor(
    [
        [1.0, 2.0, 3.0, 4.0],  # row sum 10
        [4.0, 3.0, 2.0, 1.0],  # row sum 10
        [1.0, 1.0, 1.0, 1.0],  # row sum 4
        [2.0, 2.0, 3.0, 3.0],
    ]
)  # row sum 10


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(4, 4)
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(4))  # hidden state = one-hot of the token

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        assert use_cache is False
        return SimpleNamespace(last_hidden_state=self.embed(input_ids))  # identity "transformer"


class _HandModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = _Backbone()
        self.lm_head = nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(C.log().T)  # logits(one_hot(a)) = W @ e_a = log C[a]

    def get_decoder(self):
        return self.backbone

    def get_output_embeddings(self):
        return self.lm_head


PAD = 3
HAND_IDS = torch.tensor(
    [
        [2, 0, 1, 3, PAD, PAD],  # prompt [2, 0], completion [1, 3], 2 pads
        [1, 3, 2, 0, 1, 2],  # prompt [1, 3, 2], completion [0, 1, 2], no pad
        [0, 2, PAD, PAD, PAD, PAD],  # prompt [0], completion [2]
        [3, 3, 1, PAD, PAD, PAD],  # prompt [3, 3, 1], empty completion
    ]
)
HAND_MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
HAND_PROMPT = torch.tensor([2, 3, 1, 3])
HAND_EXPECTED = [
    math.log(2 / 10) + math.log(1 / 10),  # p(1|0)=C[0,1]/10, p(3|1)=C[1,3]/10
    math.log(1 / 4) + math.log(2 / 10) + math.log(2 / 10),  # p(0|2)=1/4, p(1|0)=2/10, p(2|1)=2/10
    math.log(3 / 10),  # p(2|0)=3/10
    0.0,  # nothing to predict
]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 1024])
def test_policy_completion_logps_hand_model(chunk_size):
    model = _HandModel()
    out = policy_completion_logps(model, HAND_IDS, HAND_MASK, HAND_PROMPT, chunk_size)
    assert out.dtype == torch.float32 and out.shape == (4,)
    torch.testing.assert_close(out, torch.tensor(HAND_EXPECTED), atol=1e-5, rtol=0)

    # padding never counts: other pad ids give the same sums
    other = HAND_IDS.clone()
    other[HAND_MASK == 0] = 0
    torch.testing.assert_close(
        policy_completion_logps(model, other, HAND_MASK, HAND_PROMPT, chunk_size),
        torch.tensor(HAND_EXPECTED),
        atol=1e-5,
        rtol=0,
    )

    # gradients reach the lm_head: d/dW of sum over rows; the empty row contributes 0
    out.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_completion_positions_and_prompt_tokens_not_counted():
    rows, pos = completion_positions(HAND_IDS, HAND_PROMPT, HAND_MASK.sum(1))
    assert list(zip(rows.tolist(), pos.tolist())) == [(0, 2), (0, 3), (1, 3), (1, 4), (1, 5), (2, 1)]

    # prompt_len 0: token 0 has no predictor, so the whole sequence after it counts
    lm_head = _HandModel().lm_head
    ids = torch.tensor([[2, 0, 1]])
    hidden = torch.eye(4)[ids]
    out = completion_logps(hidden, lm_head, ids, torch.tensor([0]), torch.tensor([3]))
    # p(0|2) = 1/4, p(1|0) = 2/10
    torch.testing.assert_close(out, torch.tensor([math.log(1 / 4) + math.log(2 / 10)]), atol=1e-6, rtol=0)
    # prompt_len 2: only p(1|0)
    out = completion_logps(hidden, lm_head, ids, torch.tensor([2]), torch.tensor([3]))
    torch.testing.assert_close(out, torch.tensor([math.log(2 / 10)]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- completion log-probs: tiny Qwen2 vs full logits
def _tiny_qwen2(seed: int = 0, tie: bool = True):
    return tiny_qwen2(50, seed=seed, tie=tie)


def _reference_logps(model, ids, mask, prompt_len):
    """Plain full-logits reference: log_softmax over [B, T, V], labels -100 on prompt and padding."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    labels = ids.clone()
    t = torch.arange(ids.shape[1]).unsqueeze(0)
    labels[t < prompt_len.unsqueeze(1)] = -100
    labels[mask == 0] = -100
    labels, logits = labels[:, 1:], logits[:, :-1]
    keep = labels != -100
    lp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * keep).sum(-1)


def _qwen_batch():
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([9, 12, 5, 7])
    prompt_len = torch.tensor([4, 3, 2, 7])  # last row: empty completion
    ids = torch.randint(0, 50, (4, 12), generator=g)
    mask = (torch.arange(12).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids[mask == 0] = 0  # right padding
    return ids, mask, prompt_len


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_policy_completion_logps_matches_full_logits(chunk_size, tie):
    ids, mask, prompt_len = _qwen_batch()
    model = _tiny_qwen2(tie=tie)
    coef = torch.tensor([1.0, -0.5, 2.0, 3.0])  # arbitrary per-row weights for the backward

    ref = _reference_logps(model, ids, mask, prompt_len)
    (ref * coef).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    out = policy_completion_logps(model, ids, mask, prompt_len, chunk_size)
    (out * coef).sum().backward()
    assert out[3].item() == 0.0
    assert (out[:3] < 0).all()
    torch.testing.assert_close(out, ref.detach(), atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")

    with torch.no_grad():  # no-grad path (no checkpointing) gives the same numbers
        torch.testing.assert_close(
            policy_completion_logps(model, ids, mask, prompt_len, chunk_size), ref.detach(), atol=1e-5, rtol=1e-5
        )


# ----------------------------------------------------------------------------------------- UDM
def _fit_separable():
    chosen = np.array([[2.0], [3.0], [4.0]])
    rejected = np.array([[-2.0], [-3.0], [-4.0], [-5.0]])
    clf, metrics = fit_udm_classifier(chosen, rejected)
    return clf, metrics


def test_fit_udm_classifier_separable():
    clf, metrics = _fit_separable()
    assert list(clf.classes_) == [0.0, 1.0]  # predict_proba[:, 1] is P(desirable)
    assert metrics == {"udm/accuracy": 1.0, "udm/accuracy_chosen": 1.0, "udm/accuracy_rejected": 1.0}
    p = clf.predict_proba(np.array([[3.0], [-3.0]], dtype=np.float32))[:, 1]
    assert p[0] > 0.5 > p[1]
    # balanced class weights: the decision boundary of this symmetric-ish data sits near 0
    assert abs(clf.intercept_[0] / clf.coef_[0, 0]) < 1.0


def test_udm_weights_exact_probabilities_and_clamping():
    clf, _ = _fit_separable()
    clf.coef_ = np.array([[1.0]])  # p(x) = σ(x) exactly, so p/(1-p) = e^x
    clf.intercept_ = np.array([0.0])
    xs = [math.log(3.0), 0.0, math.log(0.25), math.log(20.0), math.log(0.5), math.log(7.0), math.log(20.0)]
    labels = [False, False, False, False, False, False, True]
    w = udm_weights(clf, np.array(xs, dtype=np.float32)[:, None], np.array(labels))
    # e^x = 3 → 3;  1 → 1;  0.25 → clamped up to 0.5;  20 → clamped down to 10;  0.5 → 0.5 (the lower edge);
    # 7 → 7;  last row desirable → 1 whatever p
    expected = [3.0, 1.0, 0.5, 10.0, 0.5, 7.0, 1.0]
    assert w.dtype == np.float32 and w.shape == (7,)
    np.testing.assert_allclose(w, expected, rtol=2e-5)

    # custom clamp range [2, 5]
    w = udm_weights(clf, np.array(xs, dtype=np.float32)[:, None], np.array(labels), 2.0, 5.0)
    np.testing.assert_allclose(w, [3.0, 2.0, 2.0, 5.0, 2.0, 5.0, 1.0], rtol=2e-5)

    # with an intercept: p = σ(2x - 1) → ratio e^(2x-1); x = 1 → e ≈ 2.71828
    clf.coef_, clf.intercept_ = np.array([[2.0]]), np.array([-1.0])
    w = udm_weights(clf, np.array([[1.0]], dtype=np.float32), np.array([0]))
    np.testing.assert_allclose(w, [math.e], rtol=2e-5)


def test_udm_weights_all_desirable_is_ones():
    clf, _ = _fit_separable()
    w = udm_weights(clf, np.zeros((3, 1), dtype=np.float32), np.array([1, 1, 1]))
    np.testing.assert_array_equal(w, np.ones(3, dtype=np.float32))


def test_classifier_round_trips_through_plain_json():
    """The cache and MLflow hold the UDM classifier as JSON parameters (no pickle): same probabilities."""
    import json

    from bco_ray.bco.udm import classifier_from_json, classifier_to_json

    rng = np.random.default_rng(0)
    chosen, rejected = rng.normal(1, 1, (30, 5)), rng.normal(-1, 1, (40, 5))
    clf, _ = fit_udm_classifier(chosen, rejected)
    data = classifier_to_json(clf)
    assert set(json.loads(data)) == {"kind", "classes", "coef", "intercept", "dtype"}
    again = classifier_from_json(data)
    x = rng.normal(size=(20, 5)).astype(np.float32)
    np.testing.assert_array_equal(again.predict_proba(x), clf.predict_proba(x))
    labels = np.arange(20) % 3 == 0
    np.testing.assert_array_equal(udm_weights(again, x, labels), udm_weights(clf, x, labels))
    with pytest.raises(ValueError, match="not a UDM classifier"):
        classifier_from_json(b'{"kind": "os.system"}')
