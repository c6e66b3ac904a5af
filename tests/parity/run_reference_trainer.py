"""Record the logged step-1 metrics of the reference BCOTrainer (trl==1.13.0, trl.experimental.bco) on one
16-row micro-batch, for tests/test_api_runs.py (whose snippet runs the same case through bco-ray's
`BCOTrainer.train()`, packed micro-batches by default).

Runs where trl 1.13.0 can be imported (see run_reference.py's docstring for a separate virtualenv; trl's
wheel unpacked on PYTHONPATH next to torch, transformers, accelerate and datasets works as well):

    python tests/parity/run_reference_trainer.py

The case: the tiny Qwen2 built with seed 0 as the policy, the same config built with seed 1 as the reference
model, 16 unpaired rows (8 desirable, 8 undesirable, inline below), per_device_train_batch_size=16, one
optimizer step, lr 0, float32 on CPU, no UDM, beta 0.1. δ starts empty, so the step's δ is the mean reward
of the 16 rows, and the logged loss is the mean over the 16 rows of the losses shifted by that δ. It writes
tests/parity/reference_trainer_step1.json: versions, settings, weight fingerprints, the rows, and the
numeric entries of trl's first `log_history` record.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TQDM_DISABLE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from run_reference import BETA, POLICY_SEED, REF_SEED, load_model, one_step_args, tiny_models  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl.experimental.bco import BCOTrainer  # noqa: E402

from bco_ray.builtin import tokenizer_path  # noqa: E402

OUT_JSON = HERE / "reference_trainer_step1.json"
BATCH = 16
# The first 8 desirable and first 8 undesirable rows of bco_ray/assets/arithmetic/train.jsonl (as of this
# fixture), in file order, inline so that regenerating the bundled data set does not move the fixture.
ROWS = [
    {"prompt": "What is 14 + 5?\nAnswer:", "completion": " 19", "label": True},
    {"prompt": "Double the number 56.\nAnswer:", "completion": " Probably 98.", "label": False},
    {"prompt": "What is 24 * 17 + 99?\nAnswer:", "completion": " 507.", "label": True},
    {"prompt": "What is the max of 138 and 50?\nAnswer:", "completion": " 138.", "label": True},
    {"prompt": "Which is larger, 83 or 107?\nAnswer:", "completion": " 107", "label": True},
    {"prompt": "Which is larger, 156 or 103?\nAnswer:", "completion": " Probably 103.", "label": False},
    {"prompt": "What is 99 minus 80?\nAnswer:", "completion": " I think it is 19, not sure.", "label": True},
    {"prompt": "What is 71 minus 52?\nAnswer:", "completion": " 19", "label": True},
    {"prompt": "Multiply 46 by 7, then add 95.\nAnswer:", "completion": " 418", "label": False},
    {"prompt": "What is double 428?\nAnswer:", "completion": " Maybe 858?", "label": False},
    {"prompt": "What is 83 + 12?\nAnswer:", "completion": " The answer is 95.", "label": True},
    {"prompt": "What is the sum of 44 and 75?\nAnswer:", "completion": " 119", "label": True},
    {"prompt": "Multiply 3 by 10.\nAnswer:", "completion": " 31", "label": False},
    {"prompt": "Subtract 18 from 72.\nAnswer:", "completion": " Maybe 55?", "label": False},
    {"prompt": "Multiply 4 by 8.\nAnswer:", "completion": " Maybe 30?", "label": False},
    {"prompt": "What is 20 minus 2?\nAnswer:", "completion": " I think it is 21, not sure.", "label": False},
]


def main() -> None:
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        policy_dir, ref_dir, fingerprints = tiny_models(tmp)
        policy, ref = load_model(policy_dir), load_model(ref_dir)
        args = one_step_args(tmp / "out", BATCH)
        trainer = BCOTrainer(
            model=policy, ref_model=ref, args=args, processing_class=tok, train_dataset=Dataset.from_list(ROWS)
        )
        trainer.train()
        log = {k: v for k, v in trainer.state.log_history[0].items() if isinstance(v, (int, float))}
        running = {"mean": trainer.running.mean, "count": trainer.running.count}
    result = {
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "settings": {
            "beta": BETA,
            "policy_seed": POLICY_SEED,
            "ref_seed": REF_SEED,
            "per_device_train_batch_size": BATCH,
            "gradient_accumulation_steps": 1,
            "max_length": args.max_length,
            "learning_rate": 0.0,
            "bf16": False,
            "dtype": "float32",
            "attn_implementation": "sdpa",
        },
        "fingerprints": fingerprints,
        "rows": ROWS,
        "log": log,
        "running": running,
    }
    OUT_JSON.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT_JSON}")
    print(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
