"""The Tune-efficiency benchmark's own arithmetic (the benchmark itself runs two Tune experiments and is
not part of the test suite): rung correlations and the table they explain."""

import math

import pytest

from pipeline.benchmarks import tune


def _trial(i: int, scores: dict[int, float], best: float, steps: int = 40) -> dict:
    return {"trial": f"t_{i:05d}", "status": "finished", "steps": steps, "best_score": best, "weights": {"a": 1.0, "b": 1.0},
            "ratios": {"a": 0.5, "b": 0.5}, "baseline": i == 0, "dev_scores": scores}


def test_rung_correlation_follows_the_rungs_and_ranks():
    # score at step 5 ranks the trials like their best does; at step 20 exactly the other way round
    trials = [_trial(i, {5: 10.0 + i, 20: 50.0 - i, 40: 60.0 + i}, 60.0 + i) for i in range(5)]
    got = tune.rung_correlation(trials, grace=5, reduction=4, steps=40)
    assert set(got) == {5, 20}  # 80 is past the budget
    assert got[5] == pytest.approx(1.0) and got[20] == pytest.approx(-1.0)
    # fewer than three trials with a score at a rung: no number rather than a meaningless one
    assert tune.rung_correlation(trials[:2], grace=5, reduction=4, steps=40) == {}


def test_markdown_reports_both_sides_the_ratios_and_the_rung_scores():
    full = [_trial(i, {5: 10.0 + i, 20: 20.0 + i}, 60.0 + i) for i in range(4)]
    asha = [_trial(0, {5: 10.0}, 60.0), {**_trial(3, {5: 13.0, 20: 23.0}, 63.0)},
            {**_trial(1, {5: 11.0}, 11.0, steps=5), "status": "stopped (ASHA)"},
            {**_trial(2, {5: 12.0}, 12.0, steps=5), "status": "stopped (ASHA)"}]
    side = lambda ts: {"best_score": max(t["best_score"] for t in ts), "best_trial": max(ts, key=lambda t: t["best_score"])["trial"],  # noqa: E731
                       "steps": sum(t["steps"] for t in ts), "seconds": 60.0, "trials": ts}
    f, a = side(full), side(asha)
    r = {"command": "python jobs/benchmark.py tune", "machine": {"cpus": 2, "cpu": "x", "memory_gb": 1, "python": "3", "torch": "2"},
         "spec": "tune_default.yaml", "samples": 4, "steps_per_trial": 40, "report_every": 5, "grace_period": 5,
         "reduction_factor": 4, "full": f, "asha": a, "score_ratio": a["best_score"] / f["best_score"],
         "steps_ratio": a["steps"] / f["steps"], "rung_correlation": tune.rung_correlation(full, 5, 4, 40)}
    md = tune.markdown(r)
    assert f"**{100 * r['score_ratio']:.1f}%**" in md and "**56%**" in md  # 90 of 160 steps
    assert "step 5: 1.00, step 20: 1.00" in md
    assert "| 00002 | 1.00 / 1.00 | 12.00, 22.00, 40, 62.00 | stopped (ASHA), 5, 12.00 |" in md
    assert not math.isnan(r["score_ratio"])
