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
import shutil
import sys
import tempfile
from pathlib import Path

# bench/e2e_*.py: a script's directory is first on sys.path; bco_ray is installed
from e2e_sides import TRL_VERSION, log, run_bco_ray, run_trl
from e2e_workload import SHAPE, build_model, write_rows


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
