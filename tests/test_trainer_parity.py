"""The drop-in `BCOTrainer.train()`'s logged step 1 equals the reference BCOTrainer's (trl==1.13.0) on one
16-row micro-batch (marked e2e: a real Ray job, on the session's Ray head, 1 worker, 1 step, no UDM, no eval).

tests/test_reference_parity.py calls the BCO forward directly; this runs what the trainer does (packed
micro-batches, the default, δ on the device, DeepSpeed, the metric window, MLflow) and compares the logged
loss, rewards, δ, log-probs and gradient norm with trl's own log, recorded by
tests/parity/run_reference_trainer.py (see its docstring) in tests/parity/reference_trainer_step1.json:
the tiny Qwen2 (seed 0) as the policy, the same config (seed 1) as the reference model, 16 rows (8 of each
label), per_device_train_batch_size=16, lr 0, float32 on CPU, beta 0.1. δ starts empty, so the step's δ is
the mean reward of the 16 rows, absorbed before any of their losses."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from bco_ray.builtin import materialize_tiny_model, tokenizer_path

REF = json.loads((Path(__file__).resolve().parent / "parity" / "reference_trainer_step1.json").read_text())
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "delta")


def _fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()  # tests/parity/run_reference.py's weights_fingerprint
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def step1(tmp_path_factory, ray_client):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bco_ray import BCOConfig, BCOTrainer

    tmp = tmp_path_factory.mktemp("trainer_parity")
    s = REF["settings"]
    models = {}
    for name, seed in (("policy", s["policy_seed"]), ("ref", s["ref_seed"])):
        models[name] = AutoModelForCausalLM.from_pretrained(materialize_tiny_model(tmp / name, seed=seed))
        if _fingerprint(models[name]) != REF["fingerprints"][name]:
            pytest.skip(f"materialize_tiny_model(seed={seed}) builds other weights here: re-run the generator")
    if (
        hashlib.sha256((tokenizer_path() / "tokenizer.json").read_bytes()).hexdigest()
        != REF["fingerprints"]["tokenizer.json"]
    ):
        pytest.skip("the bundled tokenizer changed since the reference was recorded: re-run the generator")
    args = BCOConfig(
        output_dir=str(tmp / "out"),
        per_device_train_batch_size=s["per_device_train_batch_size"],
        gradient_accumulation_steps=s["gradient_accumulation_steps"],
        learning_rate=s["learning_rate"],
        max_steps=1,
        logging_steps=1,
        beta=s["beta"],
        bf16=False,
        use_cpu=True,
        run_name="trainer-parity",
        mlflow_tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
    )
    trainer = BCOTrainer(
        model=models["policy"],
        ref_model=models["ref"],
        args=args,
        processing_class=AutoTokenizer.from_pretrained(tokenizer_path()),
        train_dataset=Dataset.from_list(REF["rows"]),
    )
    trainer.train()
    return next(h for h in trainer.state.log_history if "loss" in h)


@pytest.mark.e2e
def test_logged_step1_equals_trl(step1):
    ref = REF["log"]
    print({k: (step1[k], ref[k]) for k in (*KEYS, "grad_norm")})
    assert (step1["count/chosen"], step1["count/rejected"]) == (8, 8)
    for key in KEYS:  # trl logs float32 values; ours are summed in float64
        assert step1[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (key, step1[key], ref[key])
    assert step1["loss"] == pytest.approx(ref["loss"], abs=1e-6)  # before the fix: 0.7090 vs 0.7048
    assert step1["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)  # the gradient, not the loss only
