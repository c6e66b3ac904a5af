"""Length bucketing keeps every micro-batch's label mix (issue #13, item 3).

`length_bucketed` pools a window of micro-batches and re-cuts it by length to cut padding. Sorting the pool by
length alone would bring back one-label micro-batches whenever completion length follows the label (the very
thing the shuffle after unpairing fixes), so each micro-batch gets its proportional share of desirable and
undesirable rows, each label's rows taken in length order. Plain numpy, no model."""

import numpy as np
import pytest

from bco_ray.data.packing import ragged
from bco_ray.train.batching import length_bucketed

SIZE = 8  # rows per micro-batch
WINDOW = 16  # micro-batches pooled


def _stream(n_micro: int, size: int = SIZE, p_desirable: float = 0.5, seed: int = 0) -> list[dict]:
    """Micro-batches as the loop reads them (dataset order, already shuffled): rejected completions are
    longer than chosen ones (5-39 vs 30-149 tokens after a 10-59 token prompt). `idx` names each row."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_micro):
        label = rng.random(size) < p_desirable
        completion = np.where(label, rng.integers(5, 40, size), rng.integers(30, 150, size))
        lengths = rng.integers(10, 60, size) + completion
        out.append(
            {
                "input_ids": ragged([rng.integers(3, 500, n) for n in lengths]),
                "label": label,
                "prompt_len": np.full(size, 10),
                "ref_logps": rng.normal(size=size).astype(np.float32),
                "udm_weight": np.ones(size, dtype=np.float32),
                "idx": np.arange(i * size, (i + 1) * size),
            }
        )
    return out


def _single_label_share(batches) -> float:
    return float(np.mean([len(set(np.asarray(b["label"], dtype=bool).tolist())) == 1 for b in batches]))


def _padding_fraction(batches) -> float:
    """Padded tokens / real tokens, with each micro-batch right-padded to its longest row (as `collate` pads)."""
    lengths = [np.array([len(x) for x in b["input_ids"]]) for b in batches]
    real = sum(int(n.sum()) for n in lengths)
    return sum(len(n) * int(n.max()) for n in lengths) / real - 1.0


def _sorted_by_length_only(batches, window: int) -> list[dict]:
    """What sorting each window by length and cutting it again gives (the behaviour this test guards against)."""
    out = []
    for w in range(0, len(batches), window):
        pool = batches[w : w + window]
        rows = [(len(x), bool(y)) for b in pool for x, y in zip(b["input_ids"], b["label"])]
        rows.sort(key=lambda r: r[0])
        for c in range(0, len(rows), SIZE):
            out.append(
                {
                    "input_ids": [np.zeros(n) for n, _ in rows[c : c + SIZE]],
                    "label": np.array([y for _, y in rows[c : c + SIZE]]),
                }
            )
    return out


def _windows(batches_in, batches_out, window: int):
    """(input window, output micro-batches of that window): each window's micro-batches come out together."""
    for w in range(0, len(batches_in), window):
        n = len(batches_in[w : w + window])
        yield batches_in[w : w + window], batches_out[w : w + n]


@pytest.mark.parametrize("p_desirable", [0.5, 0.2])
def test_label_mix_kept_while_padding_drops(p_desirable):
    stream = _stream(WINDOW * 30 + 5, p_desirable=p_desirable)  # 30 windows and a partial one
    bucketed = list(length_bucketed(stream, WINDOW, seed=1))
    naive = _sorted_by_length_only(stream, WINDOW)
    single = {
        "none": _single_label_share(stream),
        "bucketed": _single_label_share(bucketed),
        "sorted by length only": _single_label_share(naive),
    }
    padding = {
        "none": _padding_fraction(stream),
        "bucketed": _padding_fraction(bucketed),
        "sorted by length only": _padding_fraction(naive),
    }
    print(f"\np(desirable)={p_desirable}: single-label micro-batches {single}; padding / real tokens {padding}")

    assert single["sorted by length only"] > 0.3  # the data shows the problem
    assert single["bucketed"] <= single["none"] + 0.02
    assert padding["bucketed"] < 0.7 * padding["none"]

    for window_in, window_out in _windows(stream, bucketed, WINDOW):
        labels = np.concatenate([b["label"] for b in window_in])
        share = labels.mean()  # every micro-batch: the window's share, ±1 row
        for b in window_out:
            assert abs(int(b["label"].sum()) - share * len(b["label"])) < 1


def test_every_row_once_fixed_rows_and_partial_last_window():
    stream = _stream(WINDOW * 3 + 5)
    by_idx = {int(i): (b, j) for b in stream for j, i in enumerate(b["idx"])}
    out = list(length_bucketed(stream, WINDOW, seed=3))

    assert len(out) == len(stream)
    assert all(len(b[k]) == SIZE for b in out for k in b)
    for window_in, window_out in _windows(stream, out, WINDOW):
        assert sorted(np.concatenate([b["idx"] for b in window_out]).tolist()) == sorted(
            np.concatenate([b["idx"] for b in window_in]).tolist()
        )
    for b in out:  # every column of a row travels with it
        for j, i in enumerate(b["idx"]):
            src, k = by_idx[int(i)]
            assert np.array_equal(b["input_ids"][j], src["input_ids"][k])
            for col in ("label", "prompt_len", "ref_logps", "udm_weight"):
                assert b[col][j] == src[col][k]


def test_deterministic_for_a_seed():
    stream = _stream(WINDOW * 2 + 3)

    def order(seed):
        return [b["idx"].tolist() for b in length_bucketed(stream, WINDOW, seed)]

    assert order(7) == order(7)
    assert order(7) != order(8)  # the seed shuffles the micro-batch order
    assert sorted(map(sorted, order(7))) == sorted(map(sorted, order(8)))  # the cuts themselves do not move


@pytest.mark.parametrize("label", [True, False])
def test_all_one_label_windows(label):
    stream = _stream(WINDOW * 2 + 3)
    for b in stream:
        b["label"] = np.full(SIZE, label)
    out = list(length_bucketed(stream, WINDOW, seed=0))

    assert len(out) == len(stream) and all(len(b["idx"]) == SIZE for b in out)
    assert sorted(np.concatenate([b["idx"] for b in out]).tolist()) == list(range(len(stream) * SIZE))
    assert all(b["label"].all() == label and b["label"].any() == label for b in out)
    # one label: plain length sorting within the window
    assert _padding_fraction(out) == pytest.approx(_padding_fraction(_sorted_by_length_only(stream, WINDOW)))


def test_labels_as_integers_and_a_window_of_one_micro_batch():
    stream = _stream(5, size=4)
    for b in stream:
        b["label"] = b["label"].astype(np.int64)  # 0/1, as a Parquet column may hold them
    out = list(length_bucketed(stream, 1, seed=0))
    for b_in, b_out in zip(stream, out):  # re-cut within itself: same rows, same mix
        assert sorted(b_out["idx"].tolist()) == b_in["idx"].tolist()
        assert b_out["label"].sum() == b_in["label"].sum()
