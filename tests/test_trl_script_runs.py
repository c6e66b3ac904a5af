"""The TRL example script (tests/trl_example/bco.py, only the import changed) trains for real, marked e2e: one run
with full fine-tuning and UDM through the script's `--embedding_model` (a tiny BartModel in bf16, prepared by
accelerate, mean-pooled by the script's embedding function), then `push_to_hub` to a fake Hub on loopback; and one
with `--use_peft --lora_target_modules all-linear` under ZeRO-0 (through `--bco_ray_overrides`). Each is a real Ray
job on the session's Ray head (two optimizer steps). Everything the script and a TRL user read is checked on those
two runs: save_model's directory, log_history, evaluate(), the pushed files, the UDM classifier and weights.
"""

from __future__ import annotations

import json
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bco_ray.builtin import ASSETS, materialize_tiny_model, tokenizer_path

from harness import ROOT, sqlite_store

pytestmark = pytest.mark.e2e


def _args(tmp: Path, model: str, data: Path, name: str, *extra: str) -> list[str]:
    return [
        *("--model_name_or_path", model, "--dataset_name", str(data), "--output_dir", str(tmp / "out")),
        *("--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--max_steps", "2"),
        *("--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "0.5", "--save_strategy", "no"),
        *("--logging_first_step", "--max_length", "256", "--max_completion_length", "128"),
        *("--no_remove_unused_columns", "--warmup_steps", "0.1", "--bf16", "false", "--report_to", "none"),
        *("--run_name", name, "--mlflow_tracking_uri", sqlite_store(tmp / "mlflow.db"), "--num_workers", "1"),
        *extra,
    ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_script_inputs")
    data = root / "data"
    data.mkdir()
    for split, src, n in (("train", "train.jsonl", 32), ("test", "eval.jsonl", 8)):
        lines = (ASSETS / "arithmetic" / src).read_text().splitlines()[:n]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return SimpleNamespace(
        model=str(materialize_tiny_model(root / "model", seed=0)), data=data, embedder=_tiny_bart(root / "bart")
    )


BART_DIM = 24


def _tiny_bart(path: Path) -> str:
    """A tiny BartModel with the bundled tokenizer, saved as a user's embedding model directory."""
    from transformers import AutoTokenizer, BartConfig, BartModel

    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    torch.manual_seed(0)
    sizes = {f"{part}_{k}": v for part in ("encoder", "decoder") for k, v in (("layers", 1), ("ffn_dim", 48))}
    heads = {"encoder_attention_heads": 2, "decoder_attention_heads": 2}
    config = BartConfig(vocab_size=len(tok), d_model=BART_DIM, **sizes, **heads, pad_token_id=tok.pad_token_id)
    BartModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _main():
    from test_trl_script import script

    return script().main


@pytest.fixture(scope="module")
def fake_hub_server():
    import huggingface_hub.constants as c
    from test_model_card import _FakeHub

    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _FakeHub.commits, _FakeHub.auth, _FakeHub.validated = [], [], []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(c, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        mp.setattr(c, "HF_HUB_OFFLINE", False)
        mp.setenv("HF_TOKEN", "hf_script_token")
        yield _FakeHub
    server.shutdown()


def _run(tmp_path_factory, inputs, name: str, *extra: str) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp(name)
    return SimpleNamespace(tmp=tmp, trainer=_main()(_args(tmp, inputs.model, inputs.data, name, *extra)))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, inputs, ray_client, fake_hub_server):
    hub = ("--push_to_hub", "--hub_model_id", "me/bco-script")
    run = _run(tmp_path_factory, inputs, "script-full", "--embedding_model", inputs.embedder, *hub)
    run.hub = fake_hub_server
    return run


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory, inputs, ray_client):
    lora = ("--use_peft", "--lora_target_modules", "all-linear")
    return _run(tmp_path_factory, inputs, "script-peft", *lora, "--bco_ray_overrides", '{"train.zero_stage": 0}')


def test_full_fine_tuning_script(full_run, inputs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, out = full_run.trainer, full_run.tmp / "out"
    assert {"max_completion_length", "remove_unused_columns", "logging_first_step"} <= set(trainer.args.ignored_fields)
    # save_model(output_dir): model and tokenizer, loadable by from_pretrained, changed by training
    saved = AutoModelForCausalLM.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(inputs.model)
    diff = max(float((saved.state_dict()[k] - v).abs().max()) for k, v in before.state_dict().items())
    assert diff > 1e-4 and AutoTokenizer.from_pretrained(out).pad_token_id is not None
    # log_history as transformers writes it: steps 1 and 2, eval entries, a summary
    logs = trainer.state.log_history
    assert [h["step"] for h in logs if "loss" in h] == [1, 2] and trainer.state.global_step == 2
    assert any("eval_loss" in h for h in logs) and "train_runtime" in logs[-1]
    # evaluate(): the run's eval split, scored here with the run's δ: the run's final eval numbers
    ev = trainer.evaluate()
    assert ev["eval_loss"] == pytest.approx(trainer.result.metrics["eval/loss"], abs=2e-5) and ev["eval_samples"] == 8
    # push_to_hub (the script calls it with --push_to_hub): one commit of the run's model dir, HF_TOKEN's token
    (commit,) = full_run.hub.commits
    assert commit["path"].startswith("/api/models/me/bco-script/commit/")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(commit["files"])
    assert set(full_run.hub.auth) == {"Bearer hf_script_token"}
    # UDM through the script's embedding function: the classifier is fitted on the BART embeddings, the rejected
    # rows are weighted by it
    from mlflow.tracking import MlflowClient

    from bco_ray.bco.udm import classifier_from_json

    result = trainer.result
    assert trainer.config.udm.enabled
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert {"udm/accuracy", "loss", "delta"} <= set(run.data.metrics)
    clf = classifier_from_json((Path(result.raw.precompute_dir) / "classifier.json").read_bytes())
    assert clf.n_features_in_ == BART_DIM
    weight = run.data.metrics["precompute/mean_rejected_weight"]
    assert weight != pytest.approx(1.0) and 0.5 <= weight <= 10.0


def test_peft_script_trains_an_all_linear_lora_adapter(peft_run):
    from safetensors.torch import load_file

    out = peft_run.tmp / "out"
    cfg = json.loads((out / "adapter_config.json").read_text())
    # "all-linear": every linear layer of the blocks, not just attention
    modules = {m.rsplit(".", 1)[-1] for m in cfg["target_modules"]}  # peft records the full names it matched
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= modules
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and max(float(v.abs().max()) for v in lora_b) > 0  # B starts at zero: the adapter trained
    assert peft_run.trainer.config.train.lora.target_modules == ["all-linear"]
    assert peft_run.trainer.config.train.zero_stage == 0
    steps = [h for h in peft_run.trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2] and all(h["grad_norm"] > 0 for h in steps)  # ZeRO-0's real norm
    # the adapter loads with peft, and the merged model (the adapter folded into the base) with transformers
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(out)
    AutoModelForCausalLM.from_pretrained(out / "merged")
    assert torch.isfinite(torch.tensor(peft_run.trainer.evaluate()["eval_loss"]))
    assert (ROOT / "tests" / "trl_example" / "bco.py").is_file()
