"""Shared pieces of the benchmarks: model shapes, synthetic rows, timing, FLOP/s peaks.

Nothing here needs Ray: if `ray` cannot be imported, a stub that makes `@ray.remote` a no-op is put in
`sys.modules` so that `bco_ray.precompute.stages` (whose `RefLogps` is plain Python) still imports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bco_ray.train.throughput import peak_flops as gpu_peak_flops  # noqa: E402

# Model shapes. "qwen0.5b" is Qwen2.5-0.5B's architecture, randomly initialised (no hub download).
SHAPES = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    ),
    "qwen0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
    ),
}
PAD_ID = 0


def ensure_ray_importable() -> bool:
    """True if the real Ray is importable; otherwise install a no-op stub (enough for `stages` to import)."""
    if importlib.util.find_spec("ray") is not None:
        return True
    stub = types.ModuleType("ray")
    stub.remote = lambda *a, **k: a[0] if a and callable(a[0]) and not k else (lambda obj: obj)
    sys.modules["ray"] = stub
    return False


def device_and_dtype(dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]


def pick_attn(requested: str, device: torch.device) -> str:
    """auto: flash_attention_2 when the flash_attn package is importable on a GPU, else sdpa."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        try:
            import flash_attn  # noqa: F401  (a build for another torch fails here, not mid-benchmark)

            return "flash_attention_2"
        except Exception as e:
            print(f"flash_attn present but unusable ({type(e).__name__}: {e}); using sdpa", flush=True)
    return "sdpa"


def make_model_dir(shape: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> str:
    """Random-init model of `shape`, saved (safetensors) to a temp dir, so every consumer loads it with
    from_pretrained as the real pipeline does. Caller removes it with `shutil.rmtree`."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(
        **SHAPES[shape],
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        attention_dropout=0.0,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    path = tempfile.mkdtemp(prefix=f"bench-{shape}-")
    model.save_pretrained(path, safe_serialization=True)
    del model
    free_memory()
    return path


def load_model(path: str, dtype: torch.dtype, device: torch.device, attn: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device)


def remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def synthetic_rows(
    n: int,
    vocab: int,
    prompt: tuple[int, int],
    completion: tuple[int, int],
    seed: int = 0,
    total: tuple[int, int] | None = None,
) -> dict[str, list]:
    """`n` rows of random token ids (never the pad id). Lengths uniform in the given inclusive ranges;
    with `total`, the whole length is drawn from it and the prompt takes 1/8..1/2 of it."""
    rng = np.random.default_rng(seed)
    ids, plen = [], []
    for _ in range(n):
        if total:
            t = int(rng.integers(total[0], total[1] + 1))
            p = int(rng.integers(max(1, t // 8), t // 2 + 1))
        else:
            p = int(rng.integers(prompt[0], prompt[1] + 1))
            t = p + int(rng.integers(completion[0], completion[1] + 1))
        ids.append(rng.integers(1, vocab, size=t, dtype=np.int64).tolist())
        plen.append(p)
    labels = (rng.random(n) < 0.5).tolist()
    return {"input_ids": ids, "prompt_len": plen, "label": labels}


def full_logits_logps(model, ids: torch.Tensor, mask: torch.Tensor, plen: torch.Tensor) -> torch.Tensor:
    """The typical HF recipe: full [B, T, V] logits in float32, log_softmax, gather, masked sum over the
    completion tokens (the token at t is predicted by position t-1)."""
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    t = torch.arange(1, ids.shape[1], device=ids.device).unsqueeze(0)
    keep = (t >= plen.unsqueeze(1)) & (mask[:, 1:] > 0)
    return (logp * keep).sum(-1)


def flop_shape_of(path: str) -> dict:
    """bco-ray's MFU parameter counts (bco_ray/train/throughput.py) of the model at `path`, built on meta."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bco_ray.train.throughput import flop_shape

    with torch.device("meta"):
        return flop_shape(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)))


def peak_flops(override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if not torch.cuda.is_available():
        return None, "cpu (no MFU)"
    name = torch.cuda.get_device_name()
    peak = gpu_peak_flops(name, "bf16")  # the trainer's table (its MFU metric), dense bf16
    return (peak, name) if peak else (None, f"{name} (unknown peak: pass --peak-tflops)")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *a):
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0
        return False


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    free_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def result_line(data: dict) -> None:
    print("RESULT " + json.dumps(data, sort_keys=True), flush=True)


def env_info(device: torch.device) -> dict:
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
    }
