"""Record step-0 numbers of the reference BCOTrainer (trl==1.13.0, trl.experimental.bco) for
tests/test_reference_parity.py.

Runs in a SEPARATE virtualenv that has trl installed (the project's venv does not), e.g.:

    python3 -m venv /tmp/trlenv
    /tmp/trlenv/bin/pip install torch==2.13.0
    /tmp/trlenv/bin/pip install trl==1.13.0 accelerate datasets scikit-learn   # picks transformers 5.23
    /tmp/trlenv/bin/python tests/parity/run_reference.py

It writes tests/parity/reference_step0.json (rows, reference token ids, per-row log-probs, rewards,
losses, δ, logged metrics, UDM embeddings/probabilities/weights/classifier parameters) and
tests/parity/reference_udm_clf.pkl (the reference trainer's fitted `trainer.clf`, plain pickle).

Two runs, one optimizer step each (lr 0, so step 0 is all that is measured), on CPU:
  * "plain": no UDM;
  * "udm":   embedding_func + embedding_tokenizer (a fixed random token-embedding table, masked mean).
Policy = the bundled tiny Qwen2 built with seed 0, reference model = the same config built with seed 1.
All 8 rows form one batch (per_device_train_batch_size=8; BCOTrainer uses a SequentialSampler anyway).

bf16=False is set explicitly: trl's base config defaults `bf16` to True (unless fp16), and on CPU that
means accelerate runs both models' forwards under torch.autocast("cpu", dtype=torch.bfloat16) (outputs
converted back to float32). That mixed-precision run is printed for information (`trl defaults`), not
stored: its numbers depend on the CPU's bf16 GEMM kernels. The stored, float32 numbers are what the test
compares against (the project runs float32 on CPU).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TQDM_DISABLE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import sklearn  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl.experimental.bco import BCOConfig, BCOTrainer  # noqa: E402

from bco_ray.builtin import materialize_tiny_model, tokenizer_path  # noqa: E402

OUT_JSON = HERE / "reference_step0.json"
OUT_CLF = HERE / "reference_udm_clf.pkl"

BETA = 0.1
POLICY_SEED, REF_SEED = 0, 1
EMB_DIM, EMB_SEED = 16, 1234
# 8 unpaired rows, both labels, inline so that regenerating the bundled data set does not move the fixture:
# the first 7 rows of bco_ray/assets/arithmetic/train.jsonl as of commit 3450f3f, plus one row whose
# prompt/completion boundary falls inside a BPE merge ("?" + "\n" -> "?\u010a"), which exercises the
# last-prompt-token fix-up of the tokenizer.
ROWS = [
    {"prompt": "Subtract 46 from 76.\nAnswer:", "completion": " 28", "label": False},
    {"prompt": "Compute 21 times 13 plus 3.\nAnswer:", "completion": " 276", "label": True},
    {"prompt": "What is 50 + 74?\nAnswer:", "completion": " 124", "label": True},
    {"prompt": "Double the number 416.\nAnswer:", "completion": " 832.", "label": True},
    {"prompt": "Compute 13 times 11 plus 51.\nAnswer:", "completion": " 194", "label": True},
    {"prompt": "Add 41 and 23.\nAnswer:", "completion": " 53", "label": False},
    {"prompt": "What is 19 - 18?\nAnswer:", "completion": " 1.", "label": True},
    {"prompt": "What is 5 + 3?", "completion": "\nAnswer: 8", "label": False},
]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the float32 state dict (sorted names): tells the test whether it rebuilt the same model."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def load_model(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model


def tiny_models(tmp: Path) -> tuple[Path, Path, dict[str, str]]:
    """The policy (seed POLICY_SEED) and reference model (seed REF_SEED) built under `tmp`, and the fingerprints
    of their weights and of the tokenizer that the fixtures store."""
    policy_dir = materialize_tiny_model(tmp / "policy", seed=POLICY_SEED)
    ref_dir = materialize_tiny_model(tmp / "ref", seed=REF_SEED)
    fingerprints = {
        "policy": weights_fingerprint(load_model(policy_dir)),
        "ref": weights_fingerprint(load_model(ref_dir)),
        "tokenizer.json": sha256_file(tokenizer_path() / "tokenizer.json"),
    }
    return policy_dir, ref_dir, fingerprints


def one_step_args(output_dir: Path, batch_size: int, bf16: bool = False) -> BCOConfig:
    """trl's BCOConfig for the fixtures' runs: one optimizer step at lr 0 (so step 0 is what is measured), one
    micro-batch of `batch_size` rows, beta BETA, on CPU, float32 unless `bf16`."""
    return BCOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        learning_rate=0.0,
        max_steps=1,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=42,
        beta=BETA,
        dataloader_num_workers=0,
        disable_tqdm=True,
        bf16=bf16,
    )


# A tiny deterministic prompt embedder: masked mean of a fixed random token-embedding table.
_TABLE = torch.randn(512, EMB_DIM, generator=torch.Generator().manual_seed(EMB_SEED))


def embedding_func(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    m = attention_mask.unsqueeze(-1).to(torch.float32)
    return (_TABLE[input_ids] * m).sum(1) / m.sum(1).clamp(min=1.0)


class RecordingBCOTrainer(BCOTrainer):
    """BCOTrainer that records what it computes at step 0 (no change to any computation)."""

    rec: dict = {}

    def _get_sample_prompt_embeddings(self, dataset, sample_size=512):
        emb = super()._get_sample_prompt_embeddings(dataset, sample_size=sample_size)
        RecordingBCOTrainer.rec.setdefault("udm_samples", []).append(emb.tolist())
        return emb

    def forward(self, model, batch):
        out = super().forward(model, batch)
        calls = RecordingBCOTrainer.rec.setdefault("forward", [])
        calls.append({"chosen_logps": out[0].detach().tolist(), "rejected_logps": out[1].detach().tolist()})
        RecordingBCOTrainer.rec["batch"] = {
            "label": list(batch["label"]),
            "completion_input_ids": batch["completion_input_ids"].tolist(),
            "completion_attention_mask": batch["completion_attention_mask"].tolist(),
            "completion_labels": batch["completion_labels"].tolist(),
        }
        return out

    def _get_prompt_embeddings(self, batch):
        chosen, rejected = super()._get_prompt_embeddings(batch)
        if chosen is not None:
            RecordingBCOTrainer.rec["batch_embeddings"] = {"chosen": chosen.tolist(), "rejected": rejected.tolist()}
        return chosen, rejected

    def _get_udm_weight(self, rejected_embeddings):
        w = super()._get_udm_weight(rejected_embeddings)
        RecordingBCOTrainer.rec["udm_prob"] = self._get_chosen_prob(rejected_embeddings).tolist()
        RecordingBCOTrainer.rec["udm_weight_rejected"] = w.tolist()
        return w

    def bco_loss(self, *args, **kwargs):
        losses, chosen_rewards, rejected_rewards, delta = super().bco_loss(*args, **kwargs)
        RecordingBCOTrainer.rec["bco_loss"] = {
            "losses": losses.detach().tolist(),
            "chosen_rewards": chosen_rewards.detach().tolist(),
            "rejected_rewards": rejected_rewards.detach().tolist(),
            "delta": float(delta),
        }
        return losses, chosen_rewards, rejected_rewards, delta

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        RecordingBCOTrainer.rec.setdefault("loss", float((loss[0] if return_outputs else loss).detach()))
        return loss


def per_row(labels: list[bool], chosen: list[float], rejected: list[float]) -> list[float]:
    """Undo the reference's chosen-then-rejected split: values back in batch (= dataset) order."""
    ci, ri = iter(chosen), iter(rejected)
    return [next(ci) if lab else next(ri) for lab in labels]


def run_case(rows, tok, policy_dir, ref_dir, workdir, udm: bool, bf16: bool = False) -> dict:
    RecordingBCOTrainer.rec = {}
    policy, ref = load_model(policy_dir), load_model(ref_dir)
    args = one_step_args(workdir / f"{'udm' if udm else 'plain'}{'-bf16' if bf16 else ''}", 8, bf16=bf16)
    kwargs = dict(embedding_func=embedding_func, embedding_tokenizer=tok) if udm else {}
    trainer = RecordingBCOTrainer(
        model=policy, ref_model=ref, args=args, processing_class=tok, train_dataset=Dataset.from_list(rows), **kwargs
    )
    ds = trainer.train_dataset
    tokenized = {
        "prompt_input_ids": [list(map(int, x)) for x in ds["prompt_input_ids"]],
        "completion_input_ids": [list(map(int, x)) for x in ds["completion_input_ids"]],
        "label": [bool(x) for x in ds["label"]],
    }
    trainer.train()
    rec = RecordingBCOTrainer.rec
    labels = rec["batch"]["label"]
    assert labels == [r["label"] for r in rows], "reference batch is not in dataset order"
    pol, refc = rec["forward"][0], rec["forward"][1]  # policy forward first, then the reference model
    bl = rec["bco_loss"]
    n_chosen = sum(labels)
    losses = per_row(labels, bl["losses"][:n_chosen], bl["losses"][n_chosen:])
    log = {k: v for k, v in trainer.state.log_history[0].items() if isinstance(v, (int, float))}
    out = {
        "tokenized": tokenized,
        "batch": rec["batch"],
        "policy_logps": per_row(labels, pol["chosen_logps"], pol["rejected_logps"]),
        "ref_logps": per_row(labels, refc["chosen_logps"], refc["rejected_logps"]),
        "rewards": per_row(labels, bl["chosen_rewards"], bl["rejected_rewards"]),
        "losses": losses,
        "delta": bl["delta"],
        "loss": rec["loss"],
        "running": {"mean": trainer.running.mean, "var": trainer.running.var, "count": trainer.running.count},
        "log": log,
    }
    if udm:
        clf = trainer.clf
        chosen_sample, rejected_sample = rec["udm_samples"]
        be = rec["batch_embeddings"]
        out["udm"] = {
            "min_density_ratio": args.min_density_ratio,
            "max_density_ratio": args.max_density_ratio,
            "prompt_sample_size": args.prompt_sample_size,
            "sample_chosen": chosen_sample,
            "sample_rejected": rejected_sample,
            "batch_embeddings": per_row(labels, be["chosen"], be["rejected"]),
            "prob_rejected": rec["udm_prob"],
            "weight_rejected": rec["udm_weight_rejected"],
            "clf": {
                "classes": clf.classes_.tolist(),
                "coef": clf.coef_.tolist(),
                "dtype": str(clf.coef_.dtype),
                "intercept": clf.intercept_.tolist(),
                "params": {k: v for k, v in clf.get_params().items() if isinstance(v, (int, float, str, type(None)))},
            },
        }
        with open(OUT_CLF, "wb") as f:
            pickle.dump(clf, f)
    return out


def main() -> None:
    torch.set_num_threads(1)
    rows = ROWS
    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        policy_dir, ref_dir, fingerprints = tiny_models(tmp)
        plain = run_case(rows, tok, policy_dir, ref_dir, tmp, udm=False)
        udm = run_case(rows, tok, policy_dir, ref_dir, tmp, udm=True)
        bf16 = run_case(rows, tok, policy_dir, ref_dir, tmp, udm=False, bf16=True)  # printed, not stored
    result = {
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "sklearn": sklearn.__version__,
            "numpy": np.__version__,
        },
        "settings": {
            "beta": BETA,
            "policy_seed": POLICY_SEED,
            "ref_seed": REF_SEED,
            "max_length": 1024,
            "bf16": False,
            "per_device_train_batch_size": 8,
            "learning_rate": 0.0,
            "attn_implementation": "sdpa",
            "dtype": "float32",
        },
        "fingerprints": fingerprints,
        "rows": rows,
        "plain": plain,
        "udm": udm,
    }
    OUT_JSON.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT_JSON} ({OUT_JSON.stat().st_size} B) and {OUT_CLF} ({OUT_CLF.stat().st_size} B)")
    for name, r in (("plain", plain), ("udm", udm), ("trl defaults (bf16 autocast)", bf16)):
        print(
            name,
            {k: r["log"].get(k) for k in ("loss", "rewards/chosen", "rewards/rejected", "delta")},
            "loss(unlogged)",
            r["loss"],
        )
        print("   policy_logps", r["policy_logps"])
        print("   ref_logps   ", r["ref_logps"])


if __name__ == "__main__":
    main()
