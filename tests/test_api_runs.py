"""The drop-in Python API's real runs (marked e2e): TRL's BCOTrainer snippet, with a tiny model, tokenizer and
dataset built here, trains end to end through Ray Data, Ray Train + DeepSpeed and MLflow; its logged step 1 equals
the reference BCOTrainer's (trl==1.13.0); evaluate() gives the run's final eval. The run joins the session's Ray
head from this process (module fixtures). BCOConfig's mapping, the trainer's argument checks and the config-file
path's equivalence (the same Config reaches the same job) are in tests/test_api.py; UDM with a user embedding
function runs in the TRL example script's run (tests/test_trl_script_runs.py).

Parity: tests/test_reference_parity.py calls the BCO forward directly; the snippet runs what the trainer does
(packed micro-batches, the default, δ on the device, DeepSpeed, the metric window, MLflow) on the inputs and
settings of trl's own log, recorded by tests/parity/run_reference_trainer.py (see its docstring) in
tests/parity/reference_trainer_step1.json: the tiny Qwen2 (seed 0) as the policy, the same config (seed 1) as the
reference model, 16 rows (8 of each label), per_device_train_batch_size=16, float32 on CPU, beta 0.1. δ starts
empty, so step 1's δ is the mean reward of the 16 rows, absorbed before any of their losses. The learning rate
(trl's log used 0) changes nothing logged at step 1: its loss and gradient come before the first update.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bco_ray import BCOConfig, BCOTrainer
from bco_ray.builtin import ASSETS, materialize_tiny_model

from harness import ROOT, sqlite_store

REF = json.loads((ROOT / "tests" / "parity" / "reference_trainer_step1.json").read_text())
PARITY_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "delta",
)
TRAIN_ROWS = REF["rows"]  # 8 desirable, 8 undesirable
EVAL_ROWS = [json.loads(line) for line in (ASSETS / "arithmetic" / "eval.jsonl").read_text().splitlines()[:16]]


@pytest.fixture(scope="module")
def local_ray(ray_client):
    """This module's runs use the session's Ray head from this process, as a notebook user's would."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # The pass unions train and eval rows before its seeded shuffle; without preserve_order the union's block
    # order follows which read finishes first, so the training order can change between two runs of the same
    # inputs. Pinned here so that the run's micro-batches are those of the recorded reference log.
    preserve, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    yield
    ctx.execution_options.preserve_order = preserve


def _fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()  # tests/parity/run_reference.py's weights_fingerprint
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """The tiny Qwen2 (seed 0) as the model, a second one (seed 1) as the reference, so rewards are not zero (the
    seeds of trl's recorded log)."""
    root = tmp_path_factory.mktemp("tiny_models")
    s = REF["settings"]
    return {
        "model_id": str(materialize_tiny_model(root / "policy", seed=s["policy_seed"])),
        "ref_id": str(materialize_tiny_model(root / "reference", seed=s["ref_seed"])),
    }


@pytest.fixture(scope="module")
def snippet(tmp_path_factory, tiny_models, local_ray):
    """TRL's BCOTrainer snippet, only the import changed (plus an eval set and a few steps)."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tmp_path_factory.mktemp("snippet")
    model_id, ref_id = tiny_models["model_id"], tiny_models["ref_id"]
    s = REF["settings"]
    output_dir, batch_size, gradient_accumulation_steps = str(tmp / "out"), 16, 1
    dataset = DatasetDict({"train": Dataset.from_list(TRAIN_ROWS), "test": Dataset.from_list(EVAL_ROWS)})

    model = AutoModelForCausalLM.from_pretrained(model_id)
    ref_model = AutoModelForCausalLM.from_pretrained(ref_id)
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fingerprints = {"policy": _fingerprint(model), "ref": _fingerprint(ref_model)}
    training_args = BCOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=1e-3,
        max_steps=3,
        logging_steps=1,
        beta=s["beta"],
        bf16=False,
        use_cpu=True,
        run_name="snippet",
        mlflow_tracking_uri=sqlite_store(tmp / "mlflow.db"),
        mlflow_experiment="api",
    )
    trainer = BCOTrainer(
        model=model,
        ref_model=ref_model,
        args=training_args,
        processing_class=tokenizer,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
    )
    result = trainer.train()
    return SimpleNamespace(
        tmp=tmp,
        trainer=trainer,
        result=result,
        model=model,
        initial=initial,
        tokenizer=tokenizer,
        args=training_args,
        fingerprints=fingerprints,
    )


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.e2e
def test_snippet_trains_through_ray_deepspeed_and_mlflow(snippet):
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    r, trainer = snippet.result, snippet.trainer
    client = MlflowClient(r.tracking_uri)
    run = client.get_run(r.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "snippet"
    p = run.data.params
    assert (p["train.num_workers"], p["train.zero_stage"], p["train.micro_batch_size"]) == ("1", "2", "16")
    assert (p["train.gradient_accumulation_steps"], p["train.lr"], p["udm.enabled"]) == ("1", "0.001", "False")
    assert sorted(_history(client, r.run_id, "loss")) == [1, 2, 3]
    assert {"eval/loss", "eval/auc", "rewards/margins", "delta", "grad_norm"} <= set(run.data.metrics)
    assert {"config.yaml", "plots"} <= {a.path for a in client.list_artifacts(r.run_id)}
    assert run.data.tags["model.id"].startswith("m-")  # the model: an MLflow 3 LoggedModel

    # the result: final metrics and where the outputs are
    assert r.global_step == 3 and r.metrics["eval/loss"] == pytest.approx(run.data.metrics["eval/loss"])
    # trainer.state as transformers' TrainerState, from the run's MLflow history
    assert trainer.state.global_step == 3 and [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3]
    assert r.training_loss == pytest.approx(sum(_history(client, r.run_id, "loss").values()) / 3)
    assert Path(r.model_dir, "model.safetensors").is_file() and Path(r.output_dir, "result.json").is_file()

    # in-memory inputs were saved once under <output_dir>/inputs, content-addressed
    cfg = trainer.config
    inputs = Path(snippet.args.output_dir).resolve() / "inputs"
    assert Path(cfg.model.policy).parent == inputs / "models" and Path(cfg.model.reference).parent == inputs / "models"
    assert cfg.model.policy != cfg.model.reference and Path(cfg.data.train).parent == inputs / "data"

    # the model object the user holds now has the trained weights
    trained = AutoModelForCausalLM.from_pretrained(r.model_dir)
    state = snippet.model.state_dict()
    assert trainer.model is snippet.model
    assert max(float((state[k] - v).abs().max()) for k, v in snippet.initial.items()) > 1e-4
    assert all(torch.equal(state[k], v) for k, v in trained.state_dict().items())

    # save_model: the trained model and tokenizer, loadable with transformers
    saved = trainer.save_model(str(snippet.tmp / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in state.items())
    assert Path(saved, "tokenizer.json").is_file()


@pytest.mark.e2e
def test_logged_step1_equals_trl(snippet):
    if snippet.fingerprints != {k: REF["fingerprints"][k] for k in ("policy", "ref")}:
        pytest.skip("materialize_tiny_model builds other weights here: re-run tests/parity/run_reference_trainer.py")
    tokenizer_json = (Path(snippet.tokenizer.name_or_path) / "tokenizer.json").read_bytes()
    if hashlib.sha256(tokenizer_json).hexdigest() != REF["fingerprints"]["tokenizer.json"]:
        pytest.skip("the bundled tokenizer changed since the reference was recorded: re-run the generator")
    step1, ref = next(h for h in snippet.trainer.state.log_history if "loss" in h), REF["log"]
    assert (step1["count/chosen"], step1["count/rejected"]) == (8, 8)
    for key in PARITY_KEYS:  # trl logs float32 values; ours are summed in float64
        assert step1[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (key, step1[key], ref[key])
    assert step1["loss"] == pytest.approx(ref["loss"], abs=1e-6)  # before the fix: 0.7090 vs 0.7048
    assert step1["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)  # the gradient, not the loss only


@pytest.mark.e2e
def test_evaluate_matches_the_runs_final_eval(snippet):
    """evaluate() runs here (no Ray, no DeepSpeed) with the trained model and the run's δ; on the run's eval split
    and on the same rows handed over anew (tokenized and reference-scored here) it gives the run's numbers."""
    r, trainer = snippet.result, snippet.trainer
    for ev in (trainer.evaluate(), trainer.evaluate(eval_dataset=EVAL_ROWS)):
        assert ev["eval_samples"] == len(EVAL_ROWS)
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "accuracy", "auc"):
            assert ev[f"eval_{key}"] == pytest.approx(r.metrics[f"eval/{key}"], abs=2e-5), key
