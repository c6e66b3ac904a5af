"""Step-0 parity with the reference BCOTrainer (trl==1.13.0, trl.experimental.bco, deleted after 1.13.0).

The reference numbers were recorded once by tests/parity/run_reference.py in a separate virtualenv with
trl installed (see its docstring); this test needs no trl. It rebuilds the same tiny policy (seed 0) and
reference model (seed 1) with `materialize_tiny_model`, tokenizes the same 8 rows with our code, runs one
micro-batch of our BCO forward (fresh δ) and aggregates it with our metric window, and compares:

  * token ids and prompt lengths (our tokenize_batch vs the reference's _tokenize/_process_tokens),
  * per-row policy and reference log-probs, rewards, losses,
  * the logged step-0 loss, rewards/chosen, rewards/rejected, rewards/margins, logps/*, and δ,
  * UDM: our density-ratio weights from the reference's fitted classifier on the reference's prompt
    embeddings, the resulting loss, and our classifier fit on the reference's sampled embeddings.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from transformers import AutoModelForCausalLM, AutoTokenizer

from bco_ray.bco.logprobs import policy_completion_logps
from bco_ray.bco.loss import RunningMean
from bco_ray.bco.udm import fit_udm_classifier, udm_weights
from bco_ray.builtin import materialize_tiny_model, tokenizer_path
from bco_ray.data.tokenize import tokenize_batch
from bco_ray.train.batches import collate
from bco_ray.train.forward import bco_forward
from bco_ray.train.metrics import WindowSums

PARITY = Path(__file__).resolve().parent / "parity"
REF = json.loads((PARITY / "reference_step0.json").read_text())
BETA = REF["settings"]["beta"]
MAX_LENGTH = REF["settings"]["max_length"]  # BCOConfig.max_length default (1024)
MAX_PROMPT_LENGTH = 512  # our default; trl 1.13 has no prompt limit, rows are short
ATOL = 1e-5


def _fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()  # same recipe as run_reference.weights_fingerprint
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity_models")
    out = {}
    for name, seed in (("policy", REF["settings"]["policy_seed"]), ("ref", REF["settings"]["ref_seed"])):
        path = materialize_tiny_model(root / name, seed=seed)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
        if _fingerprint(model) != REF["fingerprints"][name]:
            pytest.skip(
                f"materialize_tiny_model(seed={seed}) builds different weights here than where the "
                f"reference was recorded ({REF['versions']}; here torch {torch.__version__}): "
                "re-run tests/parity/run_reference.py in a trl==1.13.0 venv with these versions"
            )
        out[name] = model
    out["policy"].train()  # as in the reference's training step (the tiny config has no dropout)
    out["ref"].eval()
    return out


@pytest.fixture(scope="module")
def tok():
    digest = hashlib.sha256((tokenizer_path() / "tokenizer.json").read_bytes()).hexdigest()
    if digest != REF["fingerprints"]["tokenizer.json"]:
        pytest.skip(
            "the bundled tokenizer changed since the reference was recorded: re-run "
            "tests/parity/run_reference.py in a trl==1.13.0 venv"
        )
    return AutoTokenizer.from_pretrained(tokenizer_path())


@pytest.fixture(scope="module")
def tokenized(tok):
    rows = REF["rows"]
    cols = {k: [r[k] for r in rows] for k in ("prompt", "completion", "label")}
    out, dropped = tokenize_batch(tok, cols, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    assert sum(dropped.values()) == 0
    return out


def _step0(models, tok, tokenized, udm_weight):
    """Our step 0 on one micro-batch of all rows: reference log-probs, then bco_forward with a fresh δ."""
    n = len(tokenized["input_ids"])
    batch = collate(
        {
            "input_ids": tokenized["input_ids"],
            "prompt_len": tokenized["prompt_len"],
            "label": tokenized["label"],
            "ref_logps": np.zeros(n, np.float32),
            "udm_weight": np.asarray(udm_weight, np.float32),
        },
        tok.pad_token_id,
    )
    with torch.no_grad():
        batch.ref_logps = policy_completion_logps(
            models["ref"], batch.input_ids, batch.attention_mask, batch.prompt_len
        ).float()
    delta = RunningMean()
    losses, rewards, logps = bco_forward(models["policy"], batch, delta, BETA)
    window = WindowSums()
    window.add(losses, rewards, logps, batch.label, tokens=int(batch.attention_mask.sum()))
    return {
        "losses": losses.detach(),
        "rewards": rewards.detach(),
        "logps": logps.detach(),
        "ref_logps": batch.ref_logps,
        "delta": delta,
        "metrics": window.reduce(),
        "loss": losses.mean(),
    }


def _close(ours, ref, atol=ATOL, what=""):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=atol, err_msg=what)


# ------------------------------------------------------------------------------------------ tokenization
def test_tokenization_matches_reference(tokenized):
    ref = REF["plain"]["tokenized"]
    assert tokenized["label"] == ref["label"]
    assert tokenized["input_ids"] == ref["completion_input_ids"]
    assert tokenized["prompt_len"] == [len(p) for p in ref["prompt_input_ids"]]
    assert tokenized["prompt_ids"] == ref["prompt_input_ids"]


# ---------------------------------------------------------------------------------------- step 0, no UDM
def test_step0_without_udm_matches_reference(models, tok, tokenized):
    ref = REF["plain"]
    ours = _step0(models, tok, tokenized, np.ones(len(REF["rows"])))

    # per row (log-probs are sums of ~5 float32 terms of size ~5: allow a few float32 ulps)
    _close(ours["logps"], ref["policy_logps"], 5e-5, "policy log-probs")
    _close(ours["ref_logps"], ref["ref_logps"], 5e-5, "reference log-probs")
    _close(ours["rewards"], ref["rewards"], ATOL, "rewards")
    _close(ours["losses"], ref["losses"], ATOL, "losses")

    # δ after the first update, and the running count
    assert ours["delta"].mean == pytest.approx(ref["delta"], abs=ATOL)
    assert ours["delta"].count == pytest.approx(ref["running"]["count"])

    # what is logged at step 0
    m, log = ours["metrics"], ref["log"]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert m[key] == pytest.approx(log[key], abs=ATOL), key
    for key in ("logps/chosen", "logps/rejected"):
        assert m[key] == pytest.approx(log[key], abs=5e-5), key
    assert float(ours["loss"].detach()) == pytest.approx(ref["loss"], abs=ATOL)
    assert m["count/chosen"] == sum(r["label"] for r in REF["rows"])
    assert m["count/rejected"] == sum(not r["label"] for r in REF["rows"])


# ------------------------------------------------------------------------------------------------- UDM
def _reference_clf() -> LogisticRegression:
    """The reference trainer's fitted classifier: the pickle when it loads cleanly, else its parameters."""
    p = REF["udm"]["udm"]["clf"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. InconsistentVersionWarning: rebuild instead
            with open(PARITY / "reference_udm_clf.pkl", "rb") as f:
                clf = pickle.load(f)
        np.testing.assert_array_equal(clf.coef_, np.asarray(p["coef"], dtype=p["dtype"]))
        return clf
    except Exception:
        clf = LogisticRegression(class_weight="balanced")
        clf.classes_ = np.asarray(p["classes"])
        clf.coef_ = np.asarray(p["coef"], dtype=p["dtype"])
        clf.intercept_ = np.asarray(p["intercept"], dtype=p["dtype"])
        clf.n_features_in_ = clf.coef_.shape[1]
        return clf


def test_udm_weights_from_reference_classifier(models, tok, tokenized):
    """Reference prompt embeddings + the reference's classifier -> our weights -> our loss = reference loss."""
    u = REF["udm"]["udm"]
    labels = np.asarray([r["label"] for r in REF["rows"]], dtype=bool)
    emb = np.asarray(u["batch_embeddings"], dtype=np.float32)
    w = udm_weights(_reference_clf(), emb, labels, u["min_density_ratio"], u["max_density_ratio"])
    assert w.dtype == np.float32
    assert np.all(w[labels] == 1.0)
    _close(w[~labels], u["weight_rejected"], 1e-6, "UDM weights of the undesirable rows")

    ours = _step0(models, tok, tokenized, w)
    ref = REF["udm"]
    _close(ours["losses"], ref["losses"], ATOL, "UDM-weighted losses")
    assert ours["metrics"]["loss"] == pytest.approx(ref["log"]["loss"], abs=ATOL)
    assert float(ours["loss"].detach()) == pytest.approx(ref["loss"], abs=ATOL)
    assert ours["delta"].mean == pytest.approx(ref["delta"], abs=ATOL)  # δ ignores the weights
    for key in ("rewards/chosen", "rewards/rejected"):
        assert ours["metrics"][key] == pytest.approx(ref["log"][key], abs=ATOL), key


def test_udm_classifier_fit_matches_reference():
    """Fitted on the reference's own sampled prompt embeddings, our classifier is the reference's."""
    u = REF["udm"]["udm"]
    chosen = np.asarray(u["sample_chosen"], dtype=np.float32)
    rejected = np.asarray(u["sample_rejected"], dtype=np.float32)
    clf, metrics = fit_udm_classifier(chosen, rejected)
    ref = _reference_clf()
    np.testing.assert_allclose(clf.coef_, ref.coef_, rtol=0, atol=1e-6)
    np.testing.assert_allclose(clf.intercept_, ref.intercept_, rtol=0, atol=1e-6)
    emb = np.asarray(u["batch_embeddings"], dtype=np.float32)
    np.testing.assert_allclose(clf.predict_proba(emb), ref.predict_proba(emb), rtol=0, atol=1e-6)
    assert 0.0 <= metrics["udm/accuracy"] <= 1.0
