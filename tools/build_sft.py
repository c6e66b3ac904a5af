"""The demo's reference, `builtin:tiny-qwen2-sft`: the builtin tiny Qwen2 (seed 0) supervised-fine-tuned on the
bundled arithmetic feedback set, every row (the completions a model under feedback produced, right or wrong,
hedged or not), so that it answers in the data's form and BCO has a reference that generates answers, not noise.

Deterministic: one CPU thread, deterministic algorithms, seeded init and order. The result is shipped in
`bco_ray/assets/tiny-qwen2-sft/` (weights, config, tokenizer, `sft.json` with the recipe and the weights'
SHA-256), so every node loads the same model with no build step. Rebuild or check it with

    python -m tools.build_sft            # writes bco_ray/assets/tiny-qwen2-sft/
    python -m tools.build_sft --check    # rebuilds in a temporary directory and compares the weights
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bco_ray.builtin import ASSETS, BUILTIN_TRAIN, SFT_DIR, resolve_data, tokenizer_path
from bco_ray.console import console

RECIPE = {
    "init_seed": 0,
    "data": BUILTIN_TRAIN,
    "epochs": 40,
    "batch_size": 32,
    "lr": 3e-3,
    "schedule": "cosine",
    "max_grad_norm": 1.0,
    "order_seed": 0,
    "max_length": 64,
    "max_prompt_length": 48,
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _examples(tok, recipe: dict) -> list[dict]:
    from bco_ray.data.tokenize import tokenize_pair

    with open(resolve_data(recipe["data"]), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [
        tokenize_pair(
            tok,
            r["prompt"],
            r["completion"],
            max_length=recipe["max_length"],
            max_prompt_length=recipe["max_prompt_length"],
        )
        for r in rows
    ]


def _batch(examples: list[dict], pad_id: int):
    """Right-padded ids, mask, and labels that count the completion tokens (EOS included) only."""
    import torch

    n = max(len(x["input_ids"]) for x in examples)
    ids = torch.full((len(examples), n), pad_id)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full((len(examples), n), -100)
    for i, x in enumerate(examples):
        seq = torch.as_tensor(x["input_ids"])
        ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1
        labels[i, x["prompt_len"] : len(seq)] = seq[x["prompt_len"] :]
    return ids, mask, labels


def train(recipe: dict = RECIPE, max_steps: int | None = None):
    """The fine-tuned model (on CPU, float32). `max_steps` cuts the run short (tests of determinism)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    examples = _examples(tok, recipe)
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # one summation order: the same weights on every run
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe["init_seed"])  # the same initial weights as builtin:tiny-qwen2
            model = Qwen2ForCausalLM(Qwen2Config.from_pretrained(ASSETS / "tiny-qwen2"))
        opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.0)
        bs = recipe["batch_size"]
        total = recipe["epochs"] * math.ceil(len(examples) / bs)
        order = torch.Generator().manual_seed(recipe["order_seed"])
        step = 0
        model.train()
        for _ in range(recipe["epochs"]):
            perm = torch.randperm(len(examples), generator=order).tolist()
            for i in range(0, len(perm), bs):
                if max_steps is not None and step >= max_steps:
                    return model.eval(), tok
                ids, mask, labels = _batch([examples[j] for j in perm[i : i + bs]], tok.pad_token_id)
                for group in opt.param_groups:
                    group["lr"] = recipe["lr"] * 0.5 * (1 + math.cos(math.pi * step / total))
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["max_grad_norm"])
                opt.step()
                step += 1
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    return model.eval(), tok


def build(dest: Path = SFT_DIR, recipe: dict = RECIPE, max_steps: int | None = None) -> Path:
    """Train and write the model directory `dest` (replaced atomically): weights, config, generation config,
    tokenizer, and `sft.json` (recipe, steps, SHA-256 of the weights)."""
    model, tok = train(recipe, max_steps)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        for f in tokenizer_path().glob("*.json"):
            shutil.copyfile(f, tmp / f.name)
        info = {"recipe": recipe, "max_steps": max_steps, "model.safetensors.sha256": sha256(tmp / "model.safetensors")}
        (tmp / "sft.json").write_text(json.dumps(info, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="rebuild in a temporary directory and compare")
    parser.add_argument("--out", default=str(SFT_DIR), help="where to write the model (default: the shipped asset)")
    args = parser.parse_args(argv)
    if not args.check:
        console(f"built {build(Path(args.out))}")
        return 0
    with tempfile.TemporaryDirectory() as d:
        fresh = sha256(build(Path(d) / "sft") / "model.safetensors")
    shipped = json.loads((SFT_DIR / "sft.json").read_text())["model.safetensors.sha256"]
    same = fresh == shipped == sha256(SFT_DIR / "model.safetensors")
    console(f"rebuilt weights {'match' if same else 'DIFFER from'} the shipped asset ({fresh[:12]} vs {shipped[:12]})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
