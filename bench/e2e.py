"""End to end: the same BCO job through trl 1.13.0's BCOTrainer and through bco-ray, timed, in one invocation.

    python bench/e2e.py                        # the issue's workload: 400 rows, 2 workers, fp32, CPU
    python bench/e2e.py --rows 48 --workers 1  # smoke run

Workload (generated from --seed, shared by both sides through a temp dir):
  * model: a Qwen2 shape of 3.08 M parameters (hidden 256, 4 layers, 4 heads / 2 KV heads, intermediate 704,
    tied embeddings, vocab = the bundled tokenizer's 512), random init, `save_pretrained` + the tokenizer;
  * data: --rows unpaired rows (JSONL) of 50-400 tokens each (random single-token words of the bundled
    tokenizer; the prompt takes 1/8-1/2 of the row), labels balanced and shuffled.

trl side: a separate virtualenv (created on first use: torch==2.13.0, then trl==1.13.0 accelerate datasets
scikit-learn from PyPI) runs a small script: `trl.experimental.bco.BCOTrainer`, ref_model=None with
precompute_ref_log_probs=True, fp32 (bf16=False), use_cpu=True, no UDM, no checkpoints, report_to="none",
gradient_checkpointing=False (trl's default is True; bco-ray's is False). It reports the time of
`trainer.train()` (reference pass + training) and of its whole script (imports, loading, tokenization).

bco-ray side: `python jobs/bco.py` with overrides (the same model as policy and reference, the same JSONL, no
eval, no UDM, max_prompt_length = max_length - 1, which is trl 1.13's truncation, a fresh output dir so the
precompute cache is cold, sqlite MLflow in the temp dir, RAY_ADDRESS=local unless --ray-address).

Step counts: bco-ray runs `workers` ranks of `--batch-size` rows each per optimizer step and drops the
epoch's last partial global batch. trl runs one process, so it gets gradient_accumulation_steps = workers
(the same rows per forward and per optimizer step) and max_steps = rows // (batch × workers) (trl would
otherwise also train the partial last batch). Both sides score every row with the reference model.

Wall seconds are each subprocess's whole wall time (interpreter start to exit); speed-up = trl / bco-ray.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRL_VERSION, TORCH_VERSION = "1.13.0", "2.13.0"
SHAPE = dict(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "CUDA_VISIBLE_DEVICES": "",
}

# Runs inside the trl virtualenv: argv[1] is a JSON dict of settings; the last stdout line is `E2E_TRL {json}`.
TRL_SCRIPT = r"""
import json, sys, time
T0 = time.perf_counter()
c = json.loads(sys.argv[1])
import torch, transformers, trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.bco import BCOConfig, BCOTrainer
T_IMPORT = time.perf_counter()
with open(c["data"]) as f:
    rows = [json.loads(line) for line in f]
tok = AutoTokenizer.from_pretrained(c["model"])
model = AutoModelForCausalLM.from_pretrained(c["model"], dtype=torch.float32, attn_implementation="sdpa")
args = BCOConfig(output_dir=c["output_dir"], per_device_train_batch_size=c["batch_size"],
                 gradient_accumulation_steps=c["grad_accum"], num_train_epochs=1, max_steps=c["steps"],
                 dataloader_drop_last=True, learning_rate=c["lr"], beta=c["beta"], warmup_steps=c["warmup_ratio"],
                 lr_scheduler_type="linear", max_length=c["max_length"], precompute_ref_log_probs=True,
                 bf16=False, use_cpu=True, gradient_checkpointing=False, report_to="none", save_strategy="no",
                 logging_steps=1, disable_tqdm=True, seed=c["seed"], data_seed=c["seed"],
                 remove_unused_columns=False)
trainer = BCOTrainer(model=model, ref_model=None, args=args, processing_class=tok,
                     train_dataset=Dataset.from_list(rows))
T_BUILT = time.perf_counter()
out = trainer.train()
T_TRAIN = time.perf_counter()
print("E2E_TRL " + json.dumps({
    "train_seconds": round(T_TRAIN - T_BUILT, 2), "construct_seconds": round(T_BUILT - T_IMPORT, 2),
    "import_seconds": round(T_IMPORT - T0, 2), "script_seconds": round(T_TRAIN - T0, 2),
    "steps": trainer.state.global_step, "rows": len(rows), "train_loss": out.training_loss,
    "torch_threads": torch.get_num_threads(),
    "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}}),
    flush=True)
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--workers", type=int, default=2, help="bco-ray Ray Train workers (trl: gradient accumulation)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward: trl per-device, bco-ray micro-batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-7)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument(
        "--trl-venv",
        default=str(Path(tempfile.gettempdir()) / f"bco-ray-e2e-trl-{TRL_VERSION}"),
        help="virtualenv with trl (created if missing; default under the system temp dir)",
    )
    p.add_argument("--ray-address", default=None, help="RAY_ADDRESS for bco-ray (default: local, a fresh Ray)")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--skip-bco-ray", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (model, data, logs, outputs)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")
    a = p.parse_args(argv)
    a.steps = a.rows // (a.batch_size * a.workers)
    if a.steps < 1:
        p.error(f"--rows {a.rows} gives no optimizer step with --workers {a.workers} × --batch-size {a.batch_size}")
    return a


def log(msg: str) -> None:
    print(f"[e2e] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- workload
def build_model(model_dir: Path, seed: int):
    """The Qwen2 shape, random init from `seed`, saved with its tokenizer; returns (tokenizer, parameters)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from bco_ray.builtin import tokenizer_path

    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    cfg = Qwen2Config(
        vocab_size=len(tok),
        **SHAPE,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        attention_dropout=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    return tok, sum(p.numel() for p in model.parameters())


def word_pool(tok) -> list[str]:
    """Vocabulary entries that are one token as " word" (byte-level BPE: 'Ġ' + letters)."""
    return sorted(t[1:] for t in tok.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 2)


def write_rows(path: Path, tok, n: int, seed: int, lengths=(50, 400)) -> dict:
    """`n` unpaired rows of `lengths` tokens (prompt 1/8-1/2 of them), labels balanced; returns token stats."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pool = word_pool(tok)
    labels = np.array([True] * (n // 2) + [False] * (n - n // 2))
    rng.shuffle(labels)
    totals = []
    with open(path, "w") as f:
        for label in labels:
            total = int(rng.integers(lengths[0], lengths[1] + 1))
            plen = int(rng.integers(max(1, total // 8), total // 2 + 1))
            words = [" " + pool[i] for i in rng.integers(0, len(pool), size=total)]
            row = {"prompt": "".join(words[:plen]), "completion": "".join(words[plen:]), "label": bool(label)}
            totals.append(len(tok(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]))
            f.write(json.dumps(row) + "\n")
    return {
        "rows": n,
        "tokens": sum(totals),
        "min_tokens": min(totals),
        "max_tokens": max(totals),
        "true_labels": int(labels.sum()),
    }


# --------------------------------------------------------------------------------------- processes
def run_logged(cmd: list[str], env: dict, log_path: Path) -> tuple[float, str]:
    """Run `cmd`, its output to `log_path`; returns (wall seconds, output). Raises with the log's tail."""
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        rc = subprocess.run(cmd, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    seconds = time.perf_counter() - t0
    out = log_path.read_text(errors="replace")
    if rc != 0:
        raise RuntimeError(
            f"{cmd[0]} ... exited {rc} after {seconds:.1f} s; last lines of {log_path}:\n"
            + "\n".join(out.splitlines()[-30:])
        )
    return seconds, out


def ensure_trl_venv(venv: Path) -> Path:
    """The venv's python, after creating the venv and installing trl into it when missing."""
    py = venv / "bin" / "python"
    check = [str(py), "-c", f"import sys, trl; sys.exit(trl.__version__ != '{TRL_VERSION}')"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return py
    log(f"creating the trl virtualenv at {venv} (a few minutes of pip)")
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    for cmd in (
        ["python3", "-m", "venv", str(venv)],
        pip + [f"torch=={TORCH_VERSION}"],
        pip + [f"trl=={TRL_VERSION}", "accelerate", "datasets", "scikit-learn"],
        check,
    ):
        subprocess.run(cmd, check=True, stdout=sys.stderr)  # stdout stays the table
    return py


def run_trl(a, work: Path, model_dir: Path, data: Path) -> dict:
    py = ensure_trl_venv(Path(a.trl_venv))
    script = work / "trl_bco.py"
    script.write_text(TRL_SCRIPT)
    settings = {
        "model": str(model_dir),
        "data": str(data),
        "output_dir": str(work / "trl-out"),
        "batch_size": a.batch_size,
        "grad_accum": a.workers,
        "steps": a.steps,
        "lr": a.lr,
        "beta": a.beta,
        "warmup_ratio": a.warmup_ratio,
        "max_length": a.max_length,
        "seed": a.seed,
    }
    log(f"trl {TRL_VERSION}: {a.steps} steps of {a.workers} × {a.batch_size} rows (gradient accumulation)")
    seconds, out = run_logged([str(py), str(script), json.dumps(settings)], QUIET_ENV, work / "trl.log")
    line = [ln for ln in out.splitlines() if ln.startswith("E2E_TRL ")][-1]
    res = json.loads(line[len("E2E_TRL ") :])
    res["warnings"] = sorted({m.group(0)[:160] for m in re.finditer(r"\w*Warning: .*", out)})
    return {"wall_seconds": round(seconds, 2), **res}


def bco_ray_command(a, work: Path, model_dir: Path, data: Path, run_name: str) -> list[str]:
    config = work / "bco-ray.yaml"  # dataclass defaults, not configs/tiny.yaml's toy settings
    config.write_text("mlflow:\n  experiment: bco-ray-e2e\n")
    overrides = {
        "output_dir": work / "bco-ray-out",
        "model.policy": model_dir,
        "model.dtype": "float32",
        "data.train": data,
        "data.eval": "none",
        "data.max_length": a.max_length,
        "data.max_prompt_length": a.max_length - 1,
        "data.seed": a.seed,
        "udm.enabled": "false",
        "train.num_workers": a.workers,
        "train.micro_batch_size": a.batch_size,
        "train.num_epochs": 1,
        "train.max_steps": -1,
        "train.lr": a.lr,
        "train.beta": a.beta,
        "train.warmup_ratio": a.warmup_ratio,
        "train.lr_scheduler": "linear",
        "train.bf16": "false",
        "train.use_gpu": "false",
        "train.seed": a.seed,
        "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "mlflow.run_name": run_name,
    }
    return [sys.executable, str(ROOT / "jobs" / "bco.py"), "--config", str(config)] + [
        f"--{k}={v}" for k, v in overrides.items()
    ]


def parse_done_line(out: str) -> tuple[float, dict[str, float]]:
    """`[bco-ray] done in X s (checks 0.3, ray_start 2.1, ...): model at ...` → (X, {phase: seconds})."""
    m = re.search(r"\[bco-ray\] done in ([\d.]+) s \((.*?)\): model at", out)
    if not m:
        raise RuntimeError("no '[bco-ray] done in ...' line in the job's output")
    phases = {}
    for part in m.group(2).split(", "):
        name, _, value = part.rpartition(" ")
        phases[name] = float(value)
    return float(m.group(1)), phases


def run_bco_ray(a, work: Path, model_dir: Path, data: Path) -> dict:
    run_name = "e2e"
    cmd = bco_ray_command(a, work, model_dir, data, run_name)
    env = {**QUIET_ENV, "RAY_ADDRESS": a.ray_address or "local"}
    log(f"bco-ray: {a.workers} worker(s) × {a.batch_size} rows, RAY_ADDRESS={env['RAY_ADDRESS']}")
    seconds, out = run_logged(cmd, env, work / "bco-ray.log")
    job_seconds, phases = parse_done_line(out)
    if "precompute reused" in out:
        log("WARNING: bco-ray reused a precompute cache; the pass is not counted")
    result = json.loads((work / "bco-ray-out" / "runs" / run_name / "result.json").read_text())
    final = result.get("final", {})
    return {
        "wall_seconds": round(seconds, 2),
        "job_seconds": job_seconds,
        "phases": phases,
        "steps": int(final.get("step", 0)),
        "precompute_reused": bool(result.get("precompute_reused")),
        "command": " ".join(cmd),
    }


# ------------------------------------------------------------------------------------------ report
FIT_PARTS = ("train_start", "train", "eval", "save")  # measured by rank 0 inside the `fit` phase


def phase_text(phases: dict[str, float]) -> str:
    """`checks 6.9, ..., fit 85.1 (train_start 71.3, train 8.4, ...), ...`: fit's parts in parentheses."""
    parts = ", ".join(f"{k} {phases[k]:g}" for k in FIT_PARTS if k in phases)
    return ", ".join(
        f"{k} {v:g}" + (f" ({parts})" if k == "fit" and parts else "") for k, v in phases.items() if k not in FIT_PARTS
    )


def table(a, res: dict) -> str:
    head = ("side", "workers", "rows", "steps", "wall s", "detail")
    lines = []
    if "trl" in res:
        t = res["trl"]
        lines.append(
            (
                f"trl {TRL_VERSION}",
                f"1 (GA {a.workers})",
                t["rows"],
                t["steps"],
                t["wall_seconds"],
                f"train() {t['train_seconds']} s, construct {t['construct_seconds']} s, "
                f"imports {t['import_seconds']} s, {t['torch_threads']} torch threads",
            )
        )
    if "bco_ray" in res:
        b = res["bco_ray"]
        lines.append(
            (
                "bco-ray",
                a.workers,
                a.rows,
                b["steps"],
                b["wall_seconds"],
                f"job {b['job_seconds']} s: {phase_text(b['phases'])}",
            )
        )
    rows = [tuple(str(x) for x in r) for r in [head] + lines]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    out = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    if res.get("speedup"):
        out.append(f"bco-ray speed-up (trl wall / bco-ray wall): {res['speedup']}x")
    if res.get("speedup_core"):
        out.append(f"  without start-up (trl train() / bco-ray precompute + fit): {res['speedup_core']}x")
    return "\n".join(out)


def main(argv=None) -> int:
    a = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bco-ray-e2e-"))
    try:
        model_dir, data = work / "model", work / "train.jsonl"
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's import-time log line: keep stdout the table
            tok, n_params = build_model(model_dir, a.seed)
            stats = write_rows(data, tok, a.rows, a.seed)
        log(f"workload in {work}: {n_params / 1e6:.2f} M parameters, {stats}")
        res = {
            "workload": {
                **stats,
                "params": n_params,
                "shape": SHAPE,
                "vocab": len(tok),
                "seed": a.seed,
                "workers": a.workers,
                "batch_size": a.batch_size,
                "expected_steps": a.steps,
                "max_length": a.max_length,
                "lr": a.lr,
                "beta": a.beta,
                "warmup_ratio": a.warmup_ratio,
                "dtype": "float32",
                "device": "cpu",
                "cpus": os.cpu_count(),
            }
        }
        if not a.skip_trl:
            res["trl"] = run_trl(a, work, model_dir, data)
        if not a.skip_bco_ray:
            res["bco_ray"] = run_bco_ray(a, work, model_dir, data)
        if "trl" in res and "bco_ray" in res:
            t, b = res["trl"], res["bco_ray"]
            res["speedup"] = round(t["wall_seconds"] / b["wall_seconds"], 3)
            core = b["phases"].get("precompute", 0) + b["phases"].get("fit", 0)
            res["speedup_core"] = round(t["train_seconds"] / core, 3) if core else None
            if t["steps"] != b["steps"]:
                log(f"WARNING: step counts differ: trl {t['steps']}, bco-ray {b['steps']}")
        print(table(a, res), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    finally:
        if a.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
