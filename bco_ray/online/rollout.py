"""The rollout of online BCO: one long-lived process (a Ray actor in a job: bco_ray/job/online.py) that holds the
current policy (behind the generation backend seam, bco_ray/online/generate.py) and the reference, fixed for the
whole run. Each round it samples k completions of each prompt from the policy (`generate`), and scores the
round's labelled rows with the offline pass's code (`score`: bco_ray/precompute/stages.py's tokenize and reference
log-probs), into the columns a training micro-batch is built from (bco_ray/train/batches.py: collate). Between
rounds it takes the updated policy (`load_policy`). Plain Python: the fast tests run it in process."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import torch

from bco_ray.config.schema import Config
from bco_ray.data.tokenize import with_bos
from bco_ray.eval.pipeline import Generator, generator_kwargs, held_out_prompts
from bco_ray.models import Paths, load_tokenizer, pick_dtype, reference_dtype
from bco_ray.online.generate import HFBackend
from bco_ray.precompute.pipeline import embed_kwargs
from bco_ray.precompute.stages import Embed, RefLogps, tokenize

SCORED = ("input_ids", "prompt_len", "label", "ref_logps", "udm_weight")  # what the update needs of a row


class Rollout:
    """Generation from the current policy and reference scoring, for one online run (`cfg`, `paths` resolved
    by the job's checks); `threads`: torch's threads here."""

    def __init__(self, cfg: Config, paths: Paths, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.cfg, self.paths, self.evaluator = cfg, paths, None
        m, o, p, d = cfg.model, cfg.online, cfg.precompute, cfg.data
        gpus = p.num_gpus_per_actor
        device = torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")
        self.tok = load_tokenizer(paths.tokenizer, m.revision, m.trust_remote_code)
        self.max_prompt_length = d.max_prompt_length
        settings = {
            "max_new_tokens": o.max_new_tokens,
            "temperature": o.temperature,
            "top_p": o.top_p,
            "batch_size": cfg.eval.batch_size,
        }
        model_kwargs = {"revision": m.revision, "trust_remote_code": m.trust_remote_code}
        model_kwargs["attn_implementation"] = m.attn_implementation
        dtype = pick_dtype(reference_dtype(cfg), device.type == "cuda")
        self.backend = HFBackend(
            settings, eos_id=self.tok.eos_token_id, pad_id=paths.pad_id, dtype=dtype, device=device,
            model_kwargs=model_kwargs,
        )  # fmt: skip
        self.backend.load(paths.policy)
        self.tokenize_kwargs = dict(
            tokenizer_path=paths.tokenizer, revision=m.revision, max_length=d.max_length,
            max_prompt_length=d.max_prompt_length,
        )  # fmt: skip
        self.ref = RefLogps(
            paths.reference, m.revision, reference_dtype(cfg), gpus, p.token_budget, p.logp_chunk_size,
            paths.pad_id, m.attn_implementation, p.packed,
        )  # fmt: skip
        self.embedder = Embed(**embed_kwargs(cfg, paths)) if cfg.udm.enabled else None  # the pass's UDM embedder
        self.udm_metrics: dict[str, float] = {}

    def prompt_ids(self, prompt: str) -> list[int]:
        """A text prompt's ids as training tokenizes it (its end kept, BOS in front)."""
        ids = self.tok(prompt, add_special_tokens=False)["input_ids"][-self.max_prompt_length :]
        return with_bos(ids, self.tok.bos_token_id)

    def generate(self, prompts: list[str], k: int, seed: int) -> tuple[list[tuple[str, str]], int]:
        """k sampled completions of each prompt from the current policy: ([(prompt, completion text)], each
        prompt's k in a row; the number of samples left out because their text is empty or blank: the policy
        stopped at once, nothing to label or train on, as the data reader refuses an empty completion). Seeded: a
        round generates the same samples again from the same policy."""
        asked = [p for p in prompts for _ in range(k)]
        out = self.backend.sample([self.prompt_ids(p) for p in asked], seed)
        eos = self.tok.eos_token_id
        texts = [self.tok.decode([t for t in ids if t != eos], skip_special_tokens=True) for ids in out]
        kept = [(p, c) for p, c in zip(asked, texts) if c.strip()]
        return kept, len(asked) - len(kept)

    def score(self, rows: list[dict]) -> list[dict]:
        """The rows (prompt, completion, label) tokenized as the offline pass tokenizes them, with their reference
        log-probs and their loss weight (`udm_weights`, 1 without udm.enabled; an undesirable row's times
        online.undesirable_weight): [{input_ids, prompt_len, label, ref_logps, udm_weight}]. A row whose
        completion is empty after tokenization is dropped (as the pass drops it)."""
        table = pa.table(
            {
                "prompt": [json.dumps(r["prompt"]) for r in rows],
                "completion": [json.dumps(r["completion"]) for r in rows],
                "label": pa.array([bool(r["label"]) for r in rows], pa.bool_()),
            }
        )
        scored = self.ref(tokenize(table, split="train", **self.tokenize_kwargs))
        labels = np.asarray(scored.column("label").to_pylist(), dtype=bool)
        texts = scored.column("prompt_text").to_pylist()  # the rendered prompts, as the offline pass embeds them
        weights = self.udm_weights(texts, labels) if self.embedder is not None else np.ones(len(labels), np.float32)
        weights[~labels] *= self.cfg.online.undesirable_weight
        scored = scored.append_column("udm_weight", pa.array(weights, pa.float32()))
        return scored.select(list(SCORED)).to_pylist()

    def udm_weights(self, prompts: list[str], labels: np.ndarray) -> np.ndarray:
        """UDM weights of the rows an update trains on (the round's rows and its replayed ones): the classifier is
        fitted on these rows' own prompts, desirable vs undesirable (a prompt once per sample of it, at most
        udm.prompt_sample_size of each label, drawn with the round's seed), and weighs each undesirable row by
        clamp(p / (1 - p), udm.min_density_ratio, udm.max_density_ratio) (bco_ray/bco/udm.py, as the offline pass).
        Fewer than 2 rows of either label: nothing to fit, every row weighs 1 (udm/fitted 0)."""
        from bco_ray.bco.udm import fit_udm_classifier, udm_weights

        u, ones = self.cfg.udm, np.ones(len(labels), np.float32)
        if min(labels.sum(), (~labels).sum()) < 2:
            self.udm_metrics = {"udm/fitted": 0.0, "udm/mean_rejected_weight": 1.0}
            return ones
        emb = self.embedder.embed(prompts)
        rng = np.random.default_rng([self.cfg.train.seed, len(labels)])
        pick = {lab: np.flatnonzero(labels == lab) for lab in (True, False)}
        pick = {lab: rng.choice(i, u.prompt_sample_size, replace=False) if len(i) > u.prompt_sample_size else i
                for lab, i in pick.items()}  # fmt: skip
        clf, metrics = fit_udm_classifier(emb[pick[True]], emb[pick[False]])
        w = udm_weights(clf, emb, labels, u.min_density_ratio, u.max_density_ratio)
        self.udm_metrics = {**metrics, "udm/fitted": 1.0, "udm/mean_rejected_weight": float(w[~labels].mean())}
        return w

    def udm_report(self) -> dict[str, float]:
        """The last `score`'s UDM figures (udm/accuracy, udm/fitted, udm/mean_rejected_weight); {} without UDM."""
        return dict(self.udm_metrics)

    def load_policy(self, path: str) -> float:
        """The updated policy from `path`; returns the seconds it took."""
        t0 = time.perf_counter()
        self.backend.load(path)
        return time.perf_counter() - t0

    def evaluate(self, step: int, path: str) -> list[dict]:
        """The generation eval's rows (bco_ray/eval/pipeline.py's Generator: the offline job's eval code) for the
        policy at `path` as step `step`: greedy completions of the held-out prompts, policy vs reference, their
        verifier scores and implicit rewards. The reference's completions are made at the first call."""
        if self.evaluator is None:
            cfg = self.cfg
            prompts = held_out_prompts(cfg.data.eval, self.tok, cfg.eval.num_prompts, cfg.data.max_prompt_length)
            self.evaluator = Generator(**generator_kwargs(cfg, self.paths, prompts, self.tok, None))
        return self.evaluator(pa.Table.from_pylist([{"step": step, "path": path}])).to_pylist()

    def ping(self) -> bool:
        return True
