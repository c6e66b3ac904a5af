"""The callable classes Ray Data runs in `map_batches`: tokenize (CPU), reference log-probs and prompt
embeddings (actor pools, GPU when configured), UDM weights. Each takes and returns a pyarrow Table."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import ray
import torch

from bco_ray.bco.logprobs import policy_completion_logps
from bco_ray.data import formats
from bco_ray.data.tokenize import tokenize_batch
from bco_ray.models import load_causal_lm, load_embedder, load_tokenizer, mean_pool, pick_dtype
from bco_ray.precompute.batching import budget_batches


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


class Tokenize:
    """Raw rows (JSON lines in a `text` column, or columns) → unpaired, rendered, tokenized rows."""

    def __init__(self, tokenizer_path: str, revision, max_length: int, max_prompt_length: int,
                 on_bad_rows: str, source: str, counters):
        self.tok = load_tokenizer(tokenizer_path, revision)
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.on_bad_rows, self.source, self.counters = on_bad_rows, source, counters

    def _rows(self, table: pa.Table):
        if table.column_names == ["text"]:
            return [json.loads(line) for line in table.column("text").to_pylist() if line.strip()]
        return table.to_pylist()

    def __call__(self, table: pa.Table) -> pa.Table:
        cols: dict[str, list] = {"prompt": [], "completion": [], "label": []}
        skipped: Counter = Counter()
        for i, row in enumerate(self._rows(table)):
            try:
                fmt = formats.detect_format(row, source=self.source, index=i)
                formats.check_row(row, source=self.source, index=i, fmt=fmt)
            except formats.DataFormatError:
                if self.on_bad_rows == "error":
                    raise   # the driver validated the data already; this is a second line of defence
                skipped["bad_row"] += 1
                continue
            for r in formats.to_unpaired(row, fmt):
                for k in cols:
                    cols[k].append(r[k])
        out, dropped = tokenize_batch(self.tok, cols, max_length=self.max_length,
                                      max_prompt_length=self.max_prompt_length)
        skipped.update(dropped)
        if skipped:
            self.counters.add.remote(dict(skipped))
        return pa.table({
            "input_ids": pa.array(out["input_ids"], pa.list_(pa.int32())),
            "prompt_len": pa.array(out["prompt_len"], pa.int32()),
            "label": pa.array(out["label"], pa.bool_()),
            "prompt_text": pa.array(out["prompt_text"], pa.string()),
        })


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, :len(s)] = torch.as_tensor(s)
        mask[j, :len(s)] = 1
    return ids, mask


class RefLogps:
    """Reference model actor: summed completion log-prob per row, in token-budget sub-batches."""

    def __init__(self, model_path: str, revision, dtype: str, num_gpus: float, token_budget: int,
                 chunk_size: int, pad_id: int, attn_implementation: str = "sdpa"):
        self.device = _device(num_gpus)
        self.model = load_causal_lm(model_path, revision=revision, attn_implementation=attn_implementation,
                                    dtype=pick_dtype(dtype, self.device.type == "cuda")).to(self.device).eval()
        self.token_budget, self.chunk_size, self.pad_id = token_budget, chunk_size, pad_id

    @torch.inference_mode()
    def __call__(self, table: pa.Table) -> pa.Table:
        ids = table.column("input_ids").to_pylist()
        plen = table.column("prompt_len").to_pylist()
        lengths = [len(s) for s in ids]
        logps = np.zeros(len(ids), dtype=np.float32)
        pad_tokens = np.zeros(len(ids), dtype=np.int32)
        for b in budget_batches(lengths, self.token_budget):
            x, m = _pad([ids[i] for i in b], self.pad_id)
            p = torch.as_tensor([plen[i] for i in b])
            out = policy_completion_logps(self.model, x.to(self.device), m.to(self.device), p.to(self.device),
                                          self.chunk_size)
            logps[b] = out.float().cpu().numpy()
            pad_tokens[b] = [x.shape[1] - lengths[i] for i in b]
        return table.append_column("ref_logps", pa.array(logps)).append_column("pad_tokens", pa.array(pad_tokens))


class Embed:
    """Embedding model actor: mean-pooled, normalised embedding of each row's prompt text."""

    def __init__(self, model_path: str, num_gpus: float, max_length: int, token_budget: int):
        self.device = _device(num_gpus)
        self.tok, self.model = load_embedder(model_path, pick_dtype("auto", self.device.type == "cuda"))
        self.model = self.model.to(self.device).eval()
        self.max_length, self.token_budget = max_length, token_budget

    @torch.inference_mode()
    def __call__(self, table: pa.Table) -> pa.Table:
        texts = table.column("prompt_text").to_pylist()
        enc = self.tok(texts, truncation=True, max_length=self.max_length, add_special_tokens=True)
        lengths = [len(s) for s in enc["input_ids"]]
        emb = None
        for b in budget_batches(lengths, self.token_budget):
            x, m = _pad([enc["input_ids"][i] for i in b], self.tok.pad_token_id or 0)
            h = self.model(input_ids=x.to(self.device), attention_mask=m.to(self.device)).last_hidden_state
            e = mean_pool(h, m.to(self.device)).cpu().numpy()
            if emb is None:
                emb = np.zeros((len(texts), e.shape[1]), dtype=np.float32)
            emb[b] = e
        if emb is None:
            emb = np.zeros((0, 1), dtype=np.float32)
        col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
        return table.append_column("prompt_embedding", col)


class AddWeights:
    """UDM density-ratio weight per row from the fitted classifier (1 for desirable rows, or without UDM)."""

    def __init__(self, clf_bytes: bytes | None, min_ratio: float, max_ratio: float):
        import pickle
        self.clf = pickle.loads(clf_bytes) if clf_bytes else None
        self.min_ratio, self.max_ratio = min_ratio, max_ratio

    def __call__(self, table: pa.Table) -> pa.Table:
        from bco_ray.bco.udm import udm_weights
        labels = np.asarray(table.column("label").to_pylist(), dtype=bool)
        if self.clf is None:
            w = np.ones(len(labels), dtype=np.float32)
        else:
            emb = np.asarray(table.column("prompt_embedding").to_pylist(), dtype=np.float32)
            w = udm_weights(self.clf, emb.reshape(len(labels), -1), labels, self.min_ratio, self.max_ratio)
        keep = [c for c in table.column_names if c not in ("prompt_embedding", "prompt_text")]
        return table.select(keep).append_column("udm_weight", pa.array(w, pa.float32()))
