"""Task metrics from scikit-learn / scipy, and the multi-task score.

    scores = task_metrics(spec, predictions, references)   # {"accuracy": 0.91, "f1": 0.88}
    multitask_score({"sst2": scores, ...}, specs)           # mean primary metric, 0-100 scale
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from pipeline.tasks.spec import TaskSpec


def _corr(fn, preds, refs) -> float:
    if len(preds) < 2 or np.std(preds) == 0 or np.std(refs) == 0:
        return 0.0  # undefined for constant inputs; 0 is what an uninformative predictor earns
    return float(fn(preds, refs)[0])


METRIC_FUNCTIONS = {
    "accuracy": lambda p, r: float(accuracy_score(r, p)),
    "f1": lambda p, r: float(f1_score(r, p, average="binary", zero_division=0)),
    "macro_f1": lambda p, r: float(f1_score(r, p, average="macro", zero_division=0)),
    "matthews": lambda p, r: float(matthews_corrcoef(r, p)),
    "pearson": lambda p, r: _corr(pearsonr, p, r),
    "spearman": lambda p, r: _corr(spearmanr, p, r),
}


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(predictions: Sequence[str], references: Sequence[str], types: Sequence[str] = ROUGE_TYPES) -> dict[str, float]:
    """Mean ROUGE F-measures with Porter stemming (the `rouge-score` package, as used by `evaluate`).
    rougeLsum treats newlines as sentence boundaries."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {t: float(np.mean([s[t].fmeasure for s in scores])) if scores else 0.0 for t in types}


class MetricFailed(Exception):
    """A task's metric raised while scoring predictions (training is not at fault: the step is kept)."""

    def __init__(self, task: str, metric: str, error: str):
        self.task, self.metric, self.error = task, metric, error
        super().__init__(f"task {task}: metric {metric!r} failed ({error})")


# Fault injection for tests (like Ray's own RAY_testing_* variables): "task/metric" makes that metric
# raise when it is computed. The training driver forwards it to its workers.
FAULT_METRIC = "MTL_FAULT_METRIC"


def task_metrics(spec: TaskSpec, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Every metric the task declares. Classification predictions are class indices; summarization
    predictions and references are texts. A metric that raises becomes `MetricFailed` naming it."""
    injected = os.environ.get(FAULT_METRIC, "")
    if spec.kind == "summarization":
        names = [m for m in spec.metrics if m in ROUGE_TYPES]
    else:
        preds, refs = np.asarray(predictions), np.asarray(references)
        if spec.kind == "classification":
            preds, refs = preds.astype(np.int64), refs.astype(np.int64)
        names = [m for m in spec.metrics if m in METRIC_FUNCTIONS]
    for name in names:
        if injected == f"{spec.name}/{name}":
            raise MetricFailed(spec.name, name, f"RuntimeError: injected by ${FAULT_METRIC}")
    try:
        if spec.kind == "summarization":
            return rouge(predictions, references, names)
        out = {}
        for name in names:
            out[name] = METRIC_FUNCTIONS[name](preds, refs)
        return out
    except Exception as err:  # noqa: BLE001 - any library error becomes one line naming the task and metric
        metric = name if spec.kind != "summarization" else ",".join(names)
        raise MetricFailed(spec.name, metric, f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}") from err


def multitask_score(per_task: Mapping[str, Mapping[str, float]], specs: Mapping[str, TaskSpec]) -> float:
    """Mean over tasks of each task's primary metric, on a 0-100 scale (GLUE-style average)."""
    values = [100.0 * per_task[name][specs[name].primary_metric] for name in per_task]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")
