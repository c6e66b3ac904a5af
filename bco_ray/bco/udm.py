"""Underlying-distribution matching (UDM): a logistic-regression classifier of P(desirable | prompt
embedding) and the clamped density-ratio weight it gives each undesirable row."""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression


def fit_udm_classifier(chosen: np.ndarray, rejected: np.ndarray) -> tuple[LogisticRegression, dict]:
    """Fit on chosen (label 1) and rejected (label 0) prompt embeddings, balanced classes as the reference."""
    x = np.concatenate([chosen, rejected]).astype(np.float32)
    y = np.concatenate([np.ones(len(chosen)), np.zeros(len(rejected))])
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


def udm_weights(clf: LogisticRegression, embeddings: np.ndarray, labels: np.ndarray,
                min_ratio: float = 0.5, max_ratio: float = 10.0) -> np.ndarray:
    """w = clamp(p / (1 - p + 1e-8), min_ratio, max_ratio) for undesirable rows, 1 for desirable rows.

    Computed in float32 like the reference (probabilities cast to the embeddings' float32 dtype)."""
    labels = np.asarray(labels, dtype=bool)
    w = np.ones(len(labels), dtype=np.float32)
    if (~labels).any():
        p = clf.predict_proba(embeddings[~labels].astype(np.float32))[:, 1].astype(np.float32)
        ratio = p / (np.float32(1.0) - p + np.float32(1e-8))
        w[~labels] = np.clip(ratio, np.float32(min_ratio), np.float32(max_ratio))
    return w
