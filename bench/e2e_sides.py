"""The two sides of bench/e2e.py, each run as a subprocess timed from interpreter start to exit: trl 1.13.0's
BCOTrainer in its own virtualenv (created on first use) and bco-ray's `jobs/bco.py`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRL_VERSION, TORCH_VERSION = "1.13.0", "2.13.0"
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


def log(msg: str) -> None:
    print(f"[e2e] {msg}", file=sys.stderr, flush=True)


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
