"""bench/e2e.py's workload, shared by both sides through a temp dir: a small Qwen2 shape, random init, saved
with the bundled tokenizer, and unpaired rows of random single-token words (JSONL), labels balanced."""

from __future__ import annotations

import json
from pathlib import Path

SHAPE = dict(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


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
