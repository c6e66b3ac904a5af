"""The pass's light per-row work, run in Ray Data tasks: tagging raw rows, the UDM sample draw, the seeded
shuffle + weights of the final split, row ids, and per-block statistics. No torch here: a task worker that
runs these imports numpy and pyarrow only (and scikit-learn for a UDM classifier), not a deep-learning stack."""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
import pyarrow as pa

HIST_BINS = 20


def fit_sample_mask(input_ids: list, labels: np.ndarray, rates: dict[bool, float], seed: int) -> np.ndarray:
    """Rows drawn into the UDM classifier's sample: a seeded hash of each row's tokens against its class's
    rate, so the draw does not depend on how rows are batched or on which actor scores them."""
    out = np.zeros(len(labels), dtype=bool)
    for i, (ids, lab) in enumerate(zip(input_ids, labels)):
        h = zlib.crc32(np.asarray(ids, dtype=np.int32).tobytes(), seed & 0xFFFFFFFF) / 0xFFFFFFFF
        out[i] = h < rates[bool(lab)]
    return out


def finalize(
    table: pa.Table, *, clf_json: bytes | None, min_ratio: float, max_ratio: float, permute_seed: int | None
) -> pa.Table:
    """Scored rows → training rows: (small data) a seeded permutation of the whole split, which does what
    the all-to-all shuffle does for large data; the UDM weight of each row; embedding columns dropped."""
    if permute_seed is not None:
        table = table.take(np.random.default_rng(permute_seed).permutation(table.num_rows))
    labels = np.asarray(table.column("label").to_pylist(), dtype=bool)
    if clf_json is None:
        w = np.ones(len(labels), dtype=np.float32)
    else:
        from bco_ray.bco.udm import classifier_from_json

        clf = classifier_from_json(clf_json)
        emb = np.zeros((len(labels), int(clf.n_features_in_)), dtype=np.float32)
        rejected = np.flatnonzero(~labels)
        if len(rejected):
            emb[rejected] = np.stack(
                [
                    np.asarray(x, dtype=np.float32)
                    for x in table.column("prompt_embedding").take(pa.array(rejected)).to_pylist()
                ]
            )
        from bco_ray.bco.udm import udm_weights

        w = udm_weights(clf, emb, labels, min_ratio, max_ratio)
    drop = [c for c in ("prompt_embedding", "fit_sample", "split") if c in table.column_names]
    return (
        table.drop_columns(drop)
        .append_column("udm_weight", pa.array(w, pa.float32()))
        .append_column("row_id", row_ids(table))
    )


def row_ids(table: pa.Table) -> pa.Array:
    """A 63-bit content hash of each row (tokens, prompt length, label): which rows a step trained on, for
    checks such as "a resumed epoch trains every row once" (identical rows share an id, as a multiset)."""
    out = np.empty(table.num_rows, dtype=np.int64)
    cols = zip(
        table.column("input_ids").to_pylist(), table.column("prompt_len").to_pylist(), table.column("label").to_pylist()
    )
    for i, (ids, plen, lab) in enumerate(cols):
        h = hashlib.blake2b(np.asarray(ids, dtype=np.int32).tobytes(), digest_size=8, key=f"{plen}:{int(lab)}".encode())
        out[i] = int.from_bytes(h.digest(), "little") >> 1
    return pa.array(out, pa.int64())


def block_stats(table: pa.Table, lo: float, hi: float) -> pa.Table:
    """Row, token and weight counts of one block (summed by the driver for the precompute summary)."""
    labels = np.asarray(table.column("label").to_pylist(), dtype=bool)
    lengths = np.asarray([len(x) for x in table.column("input_ids").to_pylist()])
    plen = np.asarray(table.column("prompt_len").to_pylist())
    w = np.asarray(table.column("udm_weight").to_pylist(), dtype=np.float32)[~labels]
    hist, _ = np.histogram(w, bins=HIST_BINS, range=(lo, hi))
    return pa.table(
        {
            "rows": [len(labels)],
            "chosen": [int(labels.sum())],
            "tokens": [int(lengths.sum())],
            "completion_tokens": [int((lengths - plen).sum())],
            "pad_tokens": [int(np.asarray(table.column("pad_tokens").to_pylist()).sum())],
            "weight_sum": [float(w.sum())],
            "hist": [hist.tolist()],
        }
    )
