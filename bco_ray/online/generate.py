"""The generation backend of online BCO: what samples the round's completions from the current policy. A backend
takes prompt token ids and returns completion token ids, and takes new policy weights between rounds; the rollout
(bco_ray/online/rollout.py) renders, decodes, labels nothing and scores with the reference itself, so a backend
is only this seam.

`HFBackend` (Hugging Face `generate`, through bco_ray/eval/generation.py's `generate`, the eval pass's sampling
code) is the one implemented and tested. A vLLM backend (`ray.data.llm`, GPUs) would be another class with the
same two methods, chosen by the rollout's constructor; the round loop does not change."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Protocol

import fsspec
import torch

from bco_ray.eval.generation import generate
from bco_ray.models import load_causal_lm
from bco_ray.remote import local_model_dir
from bco_ray.storage import is_remote, local_path


class GenerateBackend(Protocol):
    def load(self, path: str) -> None:
        """The policy at `path` (a Hugging Face model directory, local or a URI) from now on."""

    def sample(self, prompt_ids: list[list[int]], seed: int) -> list[list[int]]:
        """One sampled completion (token ids, EOS included where the policy stopped) per prompt; seeded."""


class HFBackend:
    """The policy in this process, sampled with Hugging Face `generate` in batches of `batch_size` prompts.
    `settings`: max_new_tokens, temperature, top_p, batch_size."""

    def __init__(self, settings: dict, *, eos_id, pad_id: int, dtype: torch.dtype, device, model_kwargs: dict):
        self.settings, self.eos_id, self.pad_id = settings, eos_id, pad_id
        self.dtype, self.device, self.model_kwargs = dtype, device, model_kwargs
        self.model = None

    def load(self, path: str) -> None:
        tmp = None
        if is_remote(path):  # a snapshot on object storage: copied here for its loading only
            tmp = tempfile.mkdtemp(prefix="bco-online-")
            fs, p = fsspec.core.url_to_fs(path)
            fs.get(p.rstrip("/") + "/", tmp, recursive=True)
            path = tmp
        local = local_model_dir(local_path(path))
        merged = os.path.join(local, "merged")  # a LoRA export: the merged model generates
        try:
            model = load_causal_lm(merged if os.path.isdir(merged) else local, dtype=self.dtype, **self.model_kwargs)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        self.model = model.to(self.device).eval()

    def sample(self, prompt_ids: list[list[int]], seed: int) -> list[list[int]]:
        s = self.settings
        return generate(
            self.model,
            prompt_ids,
            max_new_tokens=s["max_new_tokens"],
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            batch_size=s["batch_size"],
            sample=True,
            temperature=s["temperature"],
            top_p=s["top_p"],
            seed=seed,
        )
