"""The generation eval as a Ray Data pass, run by the driver after training: one row per policy snapshot
(step 0 = the initial policy, each eval step, the final model) → a pool of generation actors → one row per
(step, prompt) with the policy's and the reference's completions, their verifier scores and implicit rewards.

Each actor loads the reference once and generates its completions once (greedy, and sampled if asked); per
snapshot it loads the policy, generates, and scores both completions with r = β·(log π_step − log π_ref)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

import fsspec
import pyarrow as pa
import ray
import torch
from ray.data import ActorPoolStrategy

from bco_ray.builtin import resolve_data
from bco_ray.config.schema import Config
from bco_ray.console import console
from bco_ray.data import formats
from bco_ray.data.reader import files_of
from bco_ray.data.sources import hf_rows
from bco_ray.data.tokenize import with_bos
from bco_ray.eval.generation import completion_logps, generate, load_verifier, verifier_scores
from bco_ray.models import Paths, load_causal_lm, load_tokenizer, pick_dtype, reference_dtype
from bco_ray.remote import local_model_dir
from bco_ray.storage import is_remote, local_path

if TYPE_CHECKING:  # annotations only
    from bco_ray.tracking.tracker import Tracker

log = logging.getLogger(__name__)


def held_out_prompts(spec, tokenizer, n: int, max_prompt_length: int) -> list[dict]:
    """The first `n` distinct prompts of the eval split in file order, rendered as training renders them
    (conversations through the chat template): [{"prompt": text, "prompt_ids": ids as the policy sees them}]."""

    def rows():
        if isinstance(spec, str) and spec.startswith("hf:"):
            yield from hf_rows(spec)
            return
        if not isinstance(spec, str):  # a datasets.Dataset handed over in memory
            yield from spec
            return
        for path in files_of(resolve_data(spec)):
            for _, row in formats.iter_rows(path):
                yield row

    out, seen = [], set()
    for row in rows():
        fmt = formats.detect_format(row)
        prompt = formats.to_unpaired(row, fmt)[0]["prompt"]
        text = (
            prompt
            if isinstance(prompt, str)
            else tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        )
        if text in seen:
            continue
        seen.add(text)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt_length:]
        ids = with_bos(ids, tokenizer.bos_token_id)  # as training's tokenization
        out.append({"prompt": text, "prompt_ids": ids})
        if len(out) == n:
            break
    return out


@contextlib.contextmanager
def _local_model_dir(path: str, snapshot: bool):
    """A local directory of the model at `path`, for the time of its loading. A policy snapshot on remote storage
    (s3://, gs://, ...) is copied to a temporary directory, removed once loaded; the reference (or a step-0
    policy) comes from this node's model cache (bco_ray/remote.py), where the pass already put it. A LoRA
    snapshot's merged model (`merged/`) is what generates."""
    tmp = None
    if is_remote(path) and snapshot:
        fs, p = fsspec.core.url_to_fs(path)
        tmp = tempfile.mkdtemp(prefix="bco-gen-")
        fs.get(p.rstrip("/") + "/", tmp, recursive=True)
        path = tmp
    path = local_model_dir(local_path(path))
    merged = os.path.join(path, "merged")
    try:
        yield merged if os.path.isdir(merged) else path
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


class Generator:
    """One generation actor: the reference and its completions are ready from the start; each call gets one
    snapshot row and returns its per-prompt rows."""

    def __init__(
        self,
        *,
        reference: str,
        prompts: list[dict],
        verifier: str | None,
        settings: dict,
        model_kwargs: dict,
        dtype: str,
        num_gpus: float,
        beta: float,
        eos_id,
        pad_id: int,
        threads: int | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")
        self.dtype = pick_dtype(dtype, self.device.type == "cuda")
        self.model_kwargs, self.settings, self.beta = model_kwargs, settings, beta
        self.eos_id, self.pad_id = eos_id, pad_id
        self.prompts = prompts
        self.ids = [p["prompt_ids"] for p in prompts]
        self.verify = load_verifier(verifier) if verifier else None
        self.reference_path = reference
        self.reference = self._load(reference)
        self.ref = {kind: self._completions(self.reference, kind) for kind in self._kinds()}

    def _kinds(self) -> list[str]:
        return ["greedy", "sampled"] if self.settings["sample"] else ["greedy"]

    def _load(self, path: str, snapshot: bool = False):
        with _local_model_dir(path, snapshot) as local:
            return load_causal_lm(local, dtype=self.dtype, **self.model_kwargs).to(self.device).eval()

    def _completions(self, model, kind: str) -> dict:
        s = self.settings
        ids = generate(
            model,
            self.ids,
            max_new_tokens=s["max_new_tokens"],
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            batch_size=s["batch_size"],
            sample=kind == "sampled",
            temperature=s["temperature"],
            top_p=s["top_p"],
            seed=s["seed"],
        )
        texts = [self._decode(c) for c in ids]
        ref_logps = completion_logps(self.reference, self.ids, ids, self.pad_id, s["batch_size"])
        scores = [verifier_scores(self.verify, p["prompt"], t) for p, t in zip(self.prompts, texts)]
        return {"ids": ids, "text": texts, "ref_logps": ref_logps, "scores": scores}

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in ids if t != self.eos_id], skip_special_tokens=True)

    @property
    def tokenizer(self):
        if not hasattr(self, "_tok"):
            self._tok = load_tokenizer(
                self.settings["tokenizer"],
                self.model_kwargs.get("revision"),
                self.model_kwargs.get("trust_remote_code", False),
            )
        return self._tok

    def _rows(self, step: int, model, kind: str) -> list[dict]:
        ref = self.ref[kind]
        same = model is self.reference
        pol = ref if same else self._completions(model, kind)
        bs = self.settings["batch_size"]
        pol_logps = pol["ref_logps"] if same else completion_logps(model, self.ids, pol["ids"], self.pad_id, bs)
        ref_under_pol = ref["ref_logps"] if same else completion_logps(model, self.ids, ref["ids"], self.pad_id, bs)
        rows = []
        for i, p in enumerate(self.prompts):
            row = {
                "step": step,
                "kind": kind,
                "prompt_index": i,
                "prompt": p["prompt"],
                "completion": pol["text"][i],
                "completion_ref": ref["text"][i],
                "length": len(pol["ids"][i]),
                "length_ref": len(ref["ids"][i]),
                "finished": float(bool(pol["ids"][i]) and pol["ids"][i][-1] == self.eos_id),
                "reward": self.beta * (pol_logps[i] - pol["ref_logps"][i]),
                "reward_ref": self.beta * (ref_under_pol[i] - ref["ref_logps"][i]),
            }
            row.update({f"verifier/{k}": v for k, v in pol["scores"][i].items()})
            row.update({f"verifier_ref/{k}": v for k, v in ref["scores"][i].items()})
            rows.append(row)
        return rows

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = []
        for item in table.to_pylist():
            step = int(item["step"])  # step 0: the initial policy (a model path); later steps: snapshots
            model = self.reference if item["path"] == self.reference_path else self._load(item["path"], step > 0)
            for kind in self._kinds():
                rows.extend(self._rows(step, model, kind))
            if model is not self.reference:
                del model
        return pa.Table.from_pylist(rows)


def generator_kwargs(cfg: Config, paths: Paths, prompts: list[dict], tokenizer, threads: int | None) -> dict:
    """The `Generator` of the config's generation eval over `prompts` (held_out_prompts'), as keywords."""
    e, m, g = cfg.eval, cfg.model, cfg.precompute.num_gpus_per_actor
    settings = {
        "max_new_tokens": e.max_new_tokens,
        "batch_size": e.batch_size,
        "sample": e.sample,
        "temperature": e.temperature,
        "top_p": e.top_p,
        "seed": cfg.train.seed,
        "tokenizer": paths.tokenizer,
    }
    return dict(
        reference=paths.reference,
        prompts=prompts,
        verifier=e.verifier,
        settings=settings,
        model_kwargs={
            "revision": m.revision,
            "trust_remote_code": m.trust_remote_code,
            "attn_implementation": m.attn_implementation,
        },
        dtype=reference_dtype(cfg),
        num_gpus=g,
        beta=cfg.train.beta,
        eos_id=tokenizer.eos_token_id,
        pad_id=paths.pad_id,
        threads=threads,
    )


def run_generation_eval(cfg: Config, paths: Paths, snapshots: dict[int, str], res, tokenizer) -> list[dict]:
    """Rows of every (snapshot step, prompt, completion kind); [] when there are no prompts."""
    e, g = cfg.eval, cfg.precompute.num_gpus_per_actor
    prompts = held_out_prompts(cfg.data.eval, tokenizer, e.num_prompts, cfg.data.max_prompt_length)
    if not prompts or not snapshots:
        return []
    kwargs = generator_kwargs(cfg, paths, prompts, tokenizer, res.actor_threads)
    items = [{"step": s, "path": p} for s, p in sorted(snapshots.items())]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        Generator,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=res.actor_cpus,
        compute=ActorPoolStrategy(min_size=1, max_size=max(1, min(len(items), res.max_actors))),
        fn_constructor_kwargs=kwargs,
        **({"num_gpus": g} if g > 0 else {}),
    )
    return sorted(ds.take_all(), key=lambda r: (r["step"], r["kind"], r["prompt_index"]))


def generation_eval(cfg: Config, paths: Paths, res, snapshots: dict[int, str], tracker: Tracker) -> dict:
    """The driver's pass after training over the policy at each step of `snapshots` ({step: model path}: step 0
    the initial policy, the snapshots the workers left, the final model); metrics and tables into `tracker` (the
    job's: bco_ray/tracking/tracker.py), a summary line. Returns {step: metrics}."""
    from bco_ray.eval import report

    tok = load_tokenizer(paths.tokenizer, cfg.model.revision, cfg.model.trust_remote_code)
    rows = run_generation_eval(cfg, paths, snapshots, res, tok)
    metrics = report.log_report(tracker, rows) if rows else {}
    console(f"[bco-ray] {report.summary_line(metrics)}")
    return metrics
