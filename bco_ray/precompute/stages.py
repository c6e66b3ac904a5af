"""The callable classes Ray Data runs in `map_batches`: tokenize (CPU), reference log-probs and prompt
embeddings (actor pools, GPU when configured), UDM weights. Each takes and returns a pyarrow Table."""

from __future__ import annotations

import functools
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from bco_ray.bco.logprobs import packed_completion_logps, policy_completion_logps
from bco_ray.bco.udm import classifier_from_json, udm_weights
from bco_ray.data.packing import collate_packed, pack_rows, pad_right, to_device
from bco_ray.data.tokenize import tokenize_batch
from bco_ray.models import load_causal_lm, load_embedder, load_tokenizer, mean_pool, pick_dtype
from bco_ray.precompute.batching import budget_batches
from bco_ray.precompute.read import SPLIT
from bco_ray.precompute.rows import fit_sample_mask


@ray.remote(num_cpus=0)
class Counters:
    """Side channel for counts the streaming stages produce (rows dropped and why)."""

    def __init__(self):
        self.counts: Counter = Counter()

    def add(self, counts: dict) -> None:
        self.counts.update(counts)

    def get(self) -> dict:
        return dict(self.counts)


def _device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, revision):
    return load_tokenizer(path, revision)


def tokenize(
    table: pa.Table,
    *,
    tokenizer_path: str,
    revision,
    max_length: int,
    max_prompt_length: int,
    split: str,
    counters=None,
) -> pa.Table:
    """Checked, unpaired rows (the read's `prompt`/`completion` JSON and `label` columns: bco_ray/precompute/read.py)
    → rendered, tokenized rows. Rows left with an empty completion are dropped and counted. A plain function
    (also called outside Ray); the tokenizer is loaded once per worker process."""
    tok = _tokenizer(tokenizer_path, revision)
    cols: dict[str, list] = {
        "prompt": [json.loads(x) for x in table.column("prompt").to_pylist()],
        "completion": [json.loads(x) for x in table.column("completion").to_pylist()],
        "label": table.column("label").to_pylist(),
    }
    out, dropped = tokenize_batch(tok, cols, max_length=max_length, max_prompt_length=max_prompt_length)
    skipped = {k: v for k, v in dropped.items() if v}
    if skipped and counters is not None:
        counters.add.remote({f"{split}/{k}": v for k, v in skipped.items()})
    n = len(out["label"])
    return pa.table(
        {
            "input_ids": pa.array(out["input_ids"], pa.list_(pa.int32())),
            "prompt_len": pa.array(out["prompt_len"], pa.int32()),
            "label": pa.array(out["label"], pa.bool_()),
            "prompt_text": pa.array(out["prompt_text"], pa.string()),
            "split": pa.array([split] * n, pa.string()),
        }
    )


class RefLogps:
    """Reference model actor: summed completion log-prob per row, in token-budget sub-batches."""

    def __init__(
        self,
        model_path: str,
        revision,
        dtype: str,
        num_gpus: float,
        token_budget: int,
        chunk_size: int,
        pad_id: int,
        attn_implementation: str = "sdpa",
        packed: bool = True,
    ):
        self.device = _device(num_gpus)
        self.model = (
            load_causal_lm(
                model_path,
                revision=revision,
                attn_implementation=attn_implementation,
                dtype=pick_dtype(dtype, self.device.type == "cuda"),
            )
            .to(self.device)
            .eval()
        )
        self.token_budget, self.chunk_size, self.pad_id, self.packed = token_budget, chunk_size, pad_id, packed

    @torch.inference_mode()
    def __call__(self, table: pa.Table) -> pa.Table:
        return self._packed(table) if self.packed else self._padded(table)

    def _padded(self, table: pa.Table) -> pa.Table:
        """Token-budget sub-batches of rows of similar length, right-padded (as the padded trainer scores)."""
        ids = table.column("input_ids").to_pylist()
        plen = table.column("prompt_len").to_pylist()
        lengths = [len(s) for s in ids]
        logps = np.zeros(len(ids), dtype=np.float32)
        pad_tokens = np.zeros(len(ids), dtype=np.int32)
        for b in budget_batches(lengths, self.token_budget):
            x, m = pad_right([ids[i] for i in b], self.pad_id)
            p = torch.as_tensor([plen[i] for i in b])
            out = policy_completion_logps(
                self.model, x.to(self.device), m.to(self.device), p.to(self.device), self.chunk_size
            )
            logps[b] = out.float().cpu().numpy()
            pad_tokens[b] = [x.shape[1] - lengths[i] for i in b]
        return table.append_column("ref_logps", pa.array(logps)).append_column("pad_tokens", pa.array(pad_tokens))

    def _packed(self, table: pa.Table) -> pa.Table:
        """Rows packed back to back up to `token_budget` tokens (bco_ray/data/packing.py: no padding, attention
        within each row; a row's log-prob does not depend on what it is packed with, bitwise, even in bf16);
        the results are read back once all packs are queued."""
        rows = {
            "input_ids": table.column("input_ids").to_pylist(),
            "prompt_len": table.column("prompt_len").to_pylist(),
        }
        lengths = [len(s) for s in rows["input_ids"]]
        logps = np.zeros(len(lengths), dtype=np.float32)
        pending = []
        for pack in pack_rows(lengths, self.token_budget):
            batch = to_device(collate_packed(rows, pack, self.pad_id, len(pack)), self.device)
            pending.append((pack, packed_completion_logps(self.model, batch, self.chunk_size).float()))
        for pack, out in pending:
            logps[pack] = out.cpu().numpy()
        pad_tokens = np.zeros(len(lengths), dtype=np.int32)  # packed: nothing is padded
        return table.append_column("ref_logps", pa.array(logps)).append_column("pad_tokens", pa.array(pad_tokens))


class Embed:
    """Embedding model actor: mean-pooled, normalised prompt embeddings. Without a classifier it adds a
    `prompt_embedding` column (for the UDM fit); with one it adds `udm_weight` instead, embedding only the
    undesirable rows (desirable rows weigh 1), and drops the prompt text."""

    def __init__(
        self,
        model_path: str,
        num_gpus: float,
        max_length: int,
        token_budget: int,
        special_tokens: bool = False,
        clf_json: bytes | None = None,
        min_ratio: float = 0.5,
        max_ratio: float = 10.0,
        func_path: str | None = None,
    ):
        self.device = _device(num_gpus)
        self.func = self.model = None
        if func_path:  # udm.embedding_func: a user callable(input_ids=, attention_mask=) -> [B, D] + its tokenizer
            from bco_ray.precompute.embedding_func import load_embedding_func

            obj = load_embedding_func(func_path)  # only the file BCOTrainer wrote: unpickling runs code
            self.tok, self.func = obj["tokenizer"], obj["func"]
        else:
            self.tok, self.model = load_embedder(model_path, pick_dtype("auto", self.device.type == "cuda"))
            self.model = self.model.to(self.device).eval()
        self.max_length, self.token_budget, self.special_tokens = max_length, token_budget, special_tokens
        self.clf = classifier_from_json(clf_json) if clf_json else None
        self.min_ratio, self.max_ratio = min_ratio, max_ratio
        self.dim = (
            self.model.config.hidden_size
            if self.model is not None
            else (int(self.clf.n_features_in_) if self.clf is not None else None)
        )

    def _forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if self.func is not None:  # as the reference: the function's output as is (no pooling, no normalisation)
            return torch.as_tensor(self.func(input_ids=x, attention_mask=m)).float()
        return mean_pool(self.model(input_ids=x, attention_mask=m).last_hidden_state, m)

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        if self.dim is None:  # a user function and no classifier yet: probe its output width once
            one = torch.ones((1, 1), dtype=torch.long, device=self.device)
            self.dim = int(self._forward(one, one).shape[-1])
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        enc = self.tok(texts, truncation=True, max_length=self.max_length, add_special_tokens=self.special_tokens)
        lengths = [len(s) for s in enc["input_ids"]]
        emb = np.zeros((len(texts), self.dim), dtype=np.float32)
        for b in budget_batches(lengths, self.token_budget):
            x, m = pad_right([enc["input_ids"][i] for i in b], self.tok.pad_token_id or 0)
            emb[b] = self._forward(x.to(self.device), m.to(self.device)).cpu().numpy()
        return emb

    def __call__(self, table: pa.Table) -> pa.Table:
        texts = table.column("prompt_text").to_pylist()
        if self.clf is None:
            emb = self.embed(texts)
            col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
            return table.append_column("prompt_embedding", col)
        labels = np.asarray(table.column("label").to_pylist(), dtype=bool)
        idx = np.flatnonzero(~labels)
        emb = np.zeros((len(labels), self.dim), dtype=np.float32)
        emb[idx] = self.embed([texts[i] for i in idx])
        w = udm_weights(self.clf, emb, labels, self.min_ratio, self.max_ratio)
        return table.drop_columns(["prompt_text"]).append_column("udm_weight", pa.array(w, pa.float32()))


def unit_weights(table: pa.Table) -> pa.Table:
    """Without UDM every row weighs 1."""
    return table.drop_columns(["prompt_text"]).append_column(
        "udm_weight", pa.array(np.ones(table.num_rows, dtype=np.float32))
    )


# ------------------------------------------------------------------ the fused pass (bco_ray/precompute/pipeline.py)
class Score:
    """One scoring actor, the whole per-row work of the pass in one process: raw rows → unpaired,
    tokenized rows → reference log-probs → (UDM) prompt embeddings of the rows that need one: every
    undesirable row (its weight) and the rows drawn into the classifier's sample. Loading the models once
    per actor, with no separate tokenize tasks, is what keeps the pass's fixed cost low."""

    def __init__(
        self,
        *,
        tokenize_kwargs: dict,
        ref_kwargs: dict,
        embed_kwargs: dict | None = None,
        sample_rates: dict | None = None,
        seed: int = 0,
        counters=None,
        threads: int | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.tokenize_kwargs, self.counters = tokenize_kwargs, counters
        self.ref = RefLogps(**ref_kwargs)
        self.embed = Embed(**embed_kwargs) if embed_kwargs else None
        self.rates = {True: 1.0, False: 1.0, **(sample_rates or {})}
        self.seed = seed

    def _tokenized(self, table: pa.Table) -> pa.Table:
        parts = []
        for split in sorted(set(table.column(SPLIT).to_pylist())):
            rows = table.filter(pc.equal(table[SPLIT], split))
            parts.append(tokenize(rows, split=split, counters=self.counters, **self.tokenize_kwargs))
        return pa.concat_tables(parts) if parts else tokenize(table, split="train", **self.tokenize_kwargs)

    def __call__(self, table: pa.Table) -> pa.Table:
        table = self.ref(self._tokenized(table))
        if self.embed is None:
            return table.drop_columns(["prompt_text"])
        labels = np.asarray(table.column("label").to_pylist(), dtype=bool)
        train = np.asarray([s == "train" for s in table.column("split").to_pylist()], dtype=bool)
        sample = fit_sample_mask(table.column("input_ids").to_pylist(), labels, self.rates, self.seed) & train
        need = np.flatnonzero(sample | ~labels)
        texts = table.column("prompt_text").to_pylist()
        emb = self.embed.embed([texts[i] for i in need])
        col: list = [[] for _ in range(len(labels))]
        for j, i in enumerate(need):
            col[i] = emb[j]
        return (
            table.drop_columns(["prompt_text"])
            .append_column("prompt_embedding", pa.array(col, pa.list_(pa.float32())))
            .append_column("fit_sample", pa.array(sample))
        )
