"""Underlying-distribution matching (UDM): a logistic-regression classifier of P(desirable | prompt
embedding) and the clamped density-ratio weight it gives each undesirable row."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # scikit-learn is imported where a classifier is made: the processes that only tokenize, score
    # or train (scoring actors, Ray Train workers, the driver) never pay its ~1 s import
    from sklearn.linear_model import LogisticRegression


def fit_udm_classifier(chosen: np.ndarray, rejected: np.ndarray) -> tuple[LogisticRegression, dict]:
    """Fit on chosen (label 1) and rejected (label 0) prompt embeddings, balanced classes as the reference."""
    x = np.concatenate([chosen, rejected]).astype(np.float32)
    y = np.concatenate([np.ones(len(chosen)), np.zeros(len(rejected))])
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(class_weight="balanced").fit(x, y)
    metrics = {
        "udm/accuracy": float(clf.score(x, y)),
        "udm/accuracy_chosen": float(clf.score(chosen.astype(np.float32), np.ones(len(chosen)))),
        "udm/accuracy_rejected": float(clf.score(rejected.astype(np.float32), np.zeros(len(rejected)))),
    }
    return clf, metrics


def sample_rows(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` indices into n rows, drawn with replacement (the reference's prompt sampling)."""
    return rng.integers(0, n, size=size)


def udm_weights(
    clf: LogisticRegression, embeddings: np.ndarray, labels: np.ndarray, min_ratio: float = 0.5, max_ratio: float = 10.0
) -> np.ndarray:
    """w = clamp(p / (1 - p + 1e-8), min_ratio, max_ratio) for undesirable rows, 1 for desirable rows.

    Computed in float32 like the reference (probabilities cast to the embeddings' float32 dtype)."""
    labels = np.asarray(labels, dtype=bool)
    w = np.ones(len(labels), dtype=np.float32)
    if (~labels).any():
        p = clf.predict_proba(embeddings[~labels].astype(np.float32))[:, 1].astype(np.float32)
        ratio = p / (np.float32(1.0) - p + np.float32(1e-8))
        w[~labels] = np.clip(ratio, np.float32(min_ratio), np.float32(max_ratio))
    return w


def classifier_to_json(clf: LogisticRegression) -> bytes:
    """The fitted classifier as plain parameters (classes, coef, intercept): what the cache and MLflow store,
    so that nothing executable is ever loaded from shared storage (a pickle would run code on load)."""
    return json.dumps(
        {
            "kind": "sklearn.linear_model.LogisticRegression",
            "classes": clf.classes_.tolist(),
            "coef": clf.coef_.tolist(),
            "intercept": clf.intercept_.tolist(),
            "dtype": str(clf.coef_.dtype),
        }
    ).encode()


def classifier_from_json(data: bytes | str) -> LogisticRegression:
    """A LogisticRegression that predicts exactly as the one `classifier_to_json` was given."""
    d = json.loads(data)
    if d.get("kind") != "sklearn.linear_model.LogisticRegression":
        raise ValueError(f"not a UDM classifier record: kind={d.get('kind')!r}")
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression()
    clf.classes_ = np.asarray(d["classes"])
    dtype = np.dtype(d.get("dtype", "float64"))  # exact: float32 values survive JSON's float64
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"UDM classifier record: unexpected dtype {dtype}")
    clf.coef_ = np.asarray(d["coef"], dtype=dtype)
    clf.intercept_ = np.asarray(d["intercept"], dtype=dtype)
    clf.n_features_in_ = clf.coef_.shape[1]
    return clf
