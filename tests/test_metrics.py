"""Metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from pipeline.eval.metrics import METRIC_FUNCTIONS, multitask_score, task_metrics
from pipeline.tasks import BUILTIN


@pytest.mark.parametrize("name, preds, refs, expected", [
    ("accuracy", [0, 1, 1, 0], [0, 1, 0, 0], 0.75),
    ("f1", [1, 1, 0, 0], [1, 0, 1, 0], 0.5),                    # P = R = 1/2
    ("macro_f1", [0, 1, 2, 2], [0, 1, 1, 2], (1 + 2 / 3 + 2 / 3) / 3),
    ("matthews", [1, 1, 1, 0], [1, 0, 1, 0], 2 / math.sqrt(12)),  # (TP·TN − FP·FN)/√(3·2·2·1)
    ("matthews", [0, 1, 0, 1], [1, 0, 1, 0], -1.0),
    ("pearson", [1, 2, 3, 4], [1, 3, 2, 4], 0.8),
    ("spearman", [1, 2, 3], [1, 4, 9], 1.0),                     # monotone, not linear
    ("pearson", [1, 1, 1], [1, 2, 3], 0.0),                      # constant predictions: defined as 0
])
def test_metric_values(name, preds, refs, expected):
    assert METRIC_FUNCTIONS[name](preds, refs) == pytest.approx(expected)


def test_task_metrics_and_multitask_score():
    stsb, cola = BUILTIN.get("stsb"), BUILTIN.get("cola")
    reg = task_metrics(stsb, [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])
    assert reg == pytest.approx({"pearson": 0.8, "spearman": 0.8})
    cls = task_metrics(cola, [1.0, 1.0, 1.0, 0.0], [1, 0, 1, 0])   # float class indices are accepted
    assert cls["accuracy"] == 0.75 and cls["matthews"] == pytest.approx(2 / math.sqrt(12))
    score = multitask_score({"stsb": reg, "cola": cls}, {"stsb": stsb, "cola": cola})
    assert score == pytest.approx((80.0 + 100 * 2 / math.sqrt(12)) / 2)  # primary metrics: pearson, matthews
