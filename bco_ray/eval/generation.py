"""Completions of prompts from a causal LM and their scores, in plain torch (no Ray): batched `generate` on
left-padded prompts, the summed completion log-prob under any model (as training computes it), and the user's
verifier (`eval.verifier: "module:function"`). The Ray Data pass (bco_ray/eval/pipeline.py) runs these."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch

from bco_ray.bco.logprobs import policy_completion_logps
from bco_ray.errors import InputError

Verifier = Callable[[str, str], "bool | float | dict"]


class VerifierError(InputError, ValueError):
    """eval.verifier does not name a usable function: the message says why and what to give."""


def import_function(spec: str, name: str, error: type[Exception], hint: str = "") -> Callable:
    """`"package.module:function"` → the function; `error` (naming the field `name`) if it cannot be had."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise error(f"{name} {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise error(
            f"{name} {spec!r}: cannot import {module_name!r} ({e}); install it on every node or ship it in the "
            f"job's working directory{hint}"
        ) from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise error(f"{name} {spec!r}: {module_name!r} has no function {attr!r}")
    return fn


def load_verifier(spec: str, name: str = "eval.verifier") -> Verifier:
    """The verifier function. Raises VerifierError naming the field `name` (eval.verifier, online.labeler)."""
    return import_function(spec, name, VerifierError)


def verifier_scores(verify: Verifier | None, prompt: str, completion: str) -> dict[str, float]:
    """The verifier's verdict as named floats: a bool or number becomes {"score": x}; a dict is taken as is
    (its "score" is the main one, other keys are extra metrics). No verifier: {}."""
    if verify is None:
        return {}
    out = verify(prompt, completion)
    if isinstance(out, dict):
        return {str(k): float(v) for k, v in out.items()}
    if isinstance(out, (bool, int, float)):
        return {"score": float(out)}
    raise VerifierError(
        f"eval.verifier returned {type(out).__name__} for a completion; it must return a bool, "
        "a number, or a dict of named numbers"
    )


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s) :] = torch.as_tensor(s)
        mask[i, n - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _cut(tokens: list[int], eos_id: int | None, pad_id: int) -> list[int]:
    """A generated row up to and including its first EOS (the padding after it dropped)."""
    out = []
    for t in tokens:
        out.append(t)
        if t == eos_id:
            return out
    while out and out[-1] == pad_id and pad_id != eos_id:
        out.pop()
    return out


@torch.inference_mode()
def generate(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    batch_size: int = 32,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    synced_gpus: bool = False,
) -> list[list[int]]:
    """Completion token ids (EOS included where the model stopped) of each prompt, greedy or sampled.
    Prompts go in batches of `batch_size`, left-padded; sampling is seeded, so a run repeats exactly.
    `synced_gpus`: every rank of a ZeRO-3 group calls this in lockstep (DeepSpeed gathers the shards)."""
    device = next(model.parameters()).device
    gen = dict(max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id, synced_gpus=synced_gpus)
    gen.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if sample else gen.update(
        do_sample=False, temperature=None, top_p=None, top_k=None
    )
    out: list[list[int]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            ids, mask = _left_pad(prompts[i : i + batch_size], pad_id, device)
            seqs = model.generate(input_ids=ids, attention_mask=mask, **gen)[:, ids.shape[1] :]
            out.extend(_cut(row, eos_id, pad_id) for row in seqs.tolist())
    return out


@torch.inference_mode()
def completion_logps(
    model,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    batch_size: int = 32,
    chunk_size: int = 1024,
) -> list[float]:
    """Summed log-prob of each completion given its prompt (the quantity the BCO reward is built from);
    an empty completion has log-prob 0."""
    device = next(model.parameters()).device
    out = [0.0] * len(prompts)
    rows = [i for i, c in enumerate(completions) if c]
    for k in range(0, len(rows), batch_size):
        b = rows[k : k + batch_size]
        seqs = [prompts[i] + completions[i] for i in b]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(b), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(b), n), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.as_tensor(s)
            mask[j, : len(s)] = 1
        plen = torch.as_tensor([len(prompts[i]) for i in b])
        logps = policy_completion_logps(model, ids.to(device), mask.to(device), plen.to(device), chunk_size)
        for j, i in enumerate(b):
            out[i] = float(logps[j])
    return out


def mean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")
