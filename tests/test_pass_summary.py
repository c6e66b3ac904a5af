"""The precompute pass's summary is typed (`PrecomputeSummary`) but keeps its JSON form and metric names: the
cache's summary.json and COMPLETE.json, MLflow's precompute/summary.json and the `precompute/*`, `udm/*` metrics
are what they were when the summary was a dict; entries written by older versions still load."""

from __future__ import annotations

import json

from bco_ray.data.pass_summary import PrecomputeSummary, SplitSummary, UdmFit, WeightHist
from bco_ray.tracking.history import precompute_metrics

SPLIT = {
    "rows": 10,
    "chosen": 6,
    "tokens": 100,
    "completion_tokens": 40,
    "pad_tokens": 25,
    "weight_sum": 6.0,
    "rejected": 4,
    "padding_fraction": 0.2,
    "mean_rejected_weight": 1.5,
    "weight_hist": {"edges": [0.5, 5.25, 10.0], "counts": [3, 1]},
}
# As the pass wrote it when it was a dict (bco_ray/precompute/pipeline.py before the typed summary).
WRITTEN = {
    "udm": {"udm/accuracy": 0.75, "udm/accuracy_chosen": 0.5, "udm/accuracy_rejected": 1.0},
    "dropped": {"empty_completion": 2},
    "train": SPLIT,
    "eval": {**SPLIT, "rows": 4},
    "seconds": 3.5,
}


def test_json_form_is_the_dict_the_pass_wrote_key_for_key():
    s = PrecomputeSummary.from_dict(WRITTEN)
    assert s.train.rows == 10 and s.eval.rows == 4 and s.udm.accuracy_rejected == 1.0
    assert s.train.weight_hist == WeightHist([0.5, 5.25, 10.0], [3, 1])
    assert json.dumps(s.to_dict()) == json.dumps(WRITTEN)  # same keys, same order, same values
    assert PrecomputeSummary.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_no_eval_split_and_udm_off_are_written_as_before():
    s = PrecomputeSummary(udm=None, dropped={}, train=SplitSummary.from_dict(SPLIT), eval=None, seconds=1.0)
    d = s.to_dict()
    assert "eval" not in d and d["udm"] == {} and list(d) == ["udm", "dropped", "train", "seconds"]
    assert PrecomputeSummary.from_dict(d) == s and UdmFit.from_dict({}) is None


def test_an_older_entry_with_fewer_counts_and_unknown_keys_loads():
    old = {
        "udm": {},
        "dropped": None,
        "seconds": 2,
        "train": {
            "rows": 8,
            "chosen": 5,
            "tokens": 64,
            "rejected": 3,
            "mean_rejected_weight": 1.0,
            "some_later_removed_count": 7,
            "weight_hist": {"edges": [0.5, 10.0], "counts": [3]},
        },
    }
    s = PrecomputeSummary.from_dict(old)
    assert (s.train.rows, s.train.completion_tokens, s.train.padding_fraction) == (8, 0, 0.0)
    assert s.dropped == {} and s.udm is None and s.eval is None and s.seconds == 2.0


def test_metric_names_are_unchanged():
    m = precompute_metrics(PrecomputeSummary.from_dict(WRITTEN))
    assert m == {
        "precompute/rows": 10.0,
        "precompute/tokens": 100.0,
        "precompute/chosen": 6.0,
        "precompute/rejected": 4.0,
        "precompute/padding_fraction": 0.2,
        "precompute/mean_rejected_weight": 1.5,
        "precompute/seconds": 3.5,
        "precompute/dropped/empty_completion": 2.0,
        "udm/accuracy": 0.75,
        "udm/accuracy_chosen": 0.5,
        "udm/accuracy_rejected": 1.0,
    }
