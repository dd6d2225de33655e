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


def test_replay_asha_stops_what_ray_tunes_asha_stops():
    # grace 5, reduction 2, max_t 41: rungs at 5, 10, 20 and 40. Trials arrive one at a time; at a rung
    # a trial continues when its score is at least the median of the scores recorded there before it.
    curve = lambda a, b, c, d: {5: a, 10: b, 20: c, 40: d}  # noqa: E731
    trials = [_trial(0, curve(30, 40, 50, 60), 60), _trial(1, curve(20, 45, 55, 70), 70),
              _trial(2, curve(35, 30, 60, 65), 65), _trial(3, curve(10, 50, 50, 50), 50)]
    r = tune.replay_asha(trials, steps=40, grace=5, reduction=2)
    # t0 first at every rung: runs out. t1 at 5: 20 < 30: stopped.
    # t2 at 5: 35 >= median(30, 20) = 25; at 10: 30 < 40: stopped. t3 at 5: 10 < median(30, 20, 35) = 30: stopped.
    assert r["ran"] == {"t_00000": 40, "t_00001": 5, "t_00002": 10, "t_00003": 5}
    assert r["steps"] == 60 and r["best_score"] == 60  # t2 stopped at 10 never saw its 65
    grid = tune.what_if(trials, steps=40, graces=(5, 40), reductions=(2,), orders=50)
    assert [(w["grace_period"], w["steps_ratio"]) for w in grid] == [(5, 60 / 160)]  # grace 40 is the whole budget
    assert grid[0]["score_ratio"] == 60 / 70
    # over random orders: t1 (the best, 70) survives whenever it runs first, and then finds 100%
    w = grid[0]
    assert 60 / 70 < w["orders_score_ratio"] < 1 and 0 < w["orders_at_98"] < 1
    # the steps' share over orders: the first trial always runs all 40 steps and every other one at least 5
    assert 55 / 160 <= w["orders_steps_min"] <= w["orders_steps_ratio"] <= w["orders_steps_max"] <= 1
    assert w["orders_steps_min"] < w["orders_steps_max"]
    assert tune.shuffled_order(trials, 3) == tune.shuffled_order(trials, 3) != tune.shuffled_order(trials, 4)
    first = tune.replay_asha([trials[1], trials[0], trials[2], trials[3]], steps=40, grace=5, reduction=2)
    assert first["ran"]["t_00001"] == 40 and first["best_score"] == 70


def test_score_correlation_at_every_report():
    trials = [_trial(i, {5: 10.0 - i, 10: 20.0 + i}, 60.0 + i) for i in range(4)]
    got = tune.score_correlation(trials)
    assert got[5] == pytest.approx(-1.0) and got[10] == pytest.approx(1.0)


def test_fixed_cost_summary_and_its_table():
    costs = [{"startup/worker_group_s": 10.0, "startup/engine_s": 5.0, "end/after_last_checkpoint_s": 5.0, "fixed_s": 20.0,
              "run_s": 80.0, "pauses_s": 12.0, "checkpoints_s": 7.0},
             {"startup/worker_group_s": 12.0, "startup/engine_s": 4.0, "end/after_last_checkpoint_s": 4.0, "fixed_s": 20.0,
              "run_s": 40.0, "pauses_s": 8.0, "checkpoints_s": 3.0}]
    trials = [{**_trial(i, {5: 1.0}, 1.0), "costs": c} for i, c in enumerate(costs)] + [{**_trial(2, {}, 0.0), "costs": {}}]
    s = tune.fixed_cost_summary(trials)
    assert s["trials"] == 2  # the trial without a recorded run time is left out, not counted as zero
    assert s["startup/worker_group_s"] == 11.0 and s["fixed_s"] == 20.0 and s["run_s"] == 60.0
    assert s["share"] == pytest.approx((20 / 80 + 20 / 40) / 2)  # mean of per-trial shares
    assert tune.fixed_cost_summary([_trial(0, {}, 0.0)]) == {}
    side = {"best_score": 1.0, "best_trial": "t_00000", "steps": 80, "seconds": 60.0, "trials": trials[:2]}
    r = {"command": "c", "machine": {"cpus": 2, "cpu": "x", "memory_gb": 1, "python": "3", "torch": "2"}, "spec": "s.yaml",
         "samples": 2, "steps_per_trial": 40, "report_every": 5, "grace_period": 5, "reduction_factor": 4, "full": side,
         "asha": side, "score_ratio": 1.0, "steps_ratio": 1.0, "fixed_costs": {"full": s, "asha": {}}}
    md = tune.markdown(r)
    assert ("| side | trials | worker group | engine | after last checkpoint | fixed | evaluations | checkpoints | "
            "training steps | run | fixed share |") in md
    # pauses 10 s of which checkpoints 5 s; 60 - 20 - 10 s of steps
    assert "| full | 2 | 11.0 | 4.5 | 4.5 | 20.0 | 5.0 | 5.0 | 30.0 | 60.0 | 38% |" in md


def test_tune_cost_compares_the_sides_per_trial():
    def run(fixed, pauses, ckpt, seconds):  # one side's Tune job: two trials of 100 s each
        trials = [{**_trial(i, {5: 1.0}, 1.0), "costs": {"startup/worker_group_s": fixed, "fixed_s": fixed, "run_s": 100.0,
                                                          "pauses_s": pauses, "checkpoints_s": ckpt}} for i in range(2)]
        return {"seconds": seconds, "trials": trials, "between_trials_s": (seconds - 200.0) / 2}
    sides = {}
    for name, r in (("a checkpoint at every report", run(30.0, 40.0, 30.0, 220.0)),
                    ("the spec's checkpoint_every", run(30.0, 14.0, 4.0, 180.0))):
        # the second side is shorter per run: rescale its run time so the arithmetic is visible
        for t in r["trials"]:
            t["costs"]["run_s"] = 100.0 if name.startswith("a ") else 80.0
        r["between_trials_s"] = (r["seconds"] - sum(t["costs"]["run_s"] for t in r["trials"])) / 2
        sides[name] = {"overrides": tune.COST_SIDES[name], "runs": [r], "costs": tune.fixed_cost_summary(r["trials"]),
                       "between_trials_s": r["between_trials_s"], "trial_wall_s": r["seconds"] / 2}
    result = {"command": "c", "machine": {"cpus": 2, "cpu": "x", "memory_gb": 1, "python": "3", "torch": "2"},
              "spec": "s.yaml", "samples": 2, "steps_per_trial": 60, "report_every": 15, "repeats": 1, "sides": sides}
    md = tune.cost_markdown(result)
    assert "**a checkpoint at every report** (checkpoint_every=15)" in md
    assert "| a checkpoint at every report | 2 | 30.0 | 30.0 | 10.0 | 30.0 | 30.0 | 100.0 | 30% |" in md
    assert "| the spec's checkpoint_every | 2 | 30.0 | 30.0 | 10.0 | 4.0 | 36.0 | 80.0 | 38% |" in md
    # Tune's wall time per trial, the time between trials (wall minus runs), the steps' share of the wall time
    assert "| a checkpoint at every report | 110.0 | 10.0 | 27% |" in md
    assert "| the spec's checkpoint_every | 90.0 | 10.0 | 40% |" in md
    assert "Per trial: 110.0 s → 90.0 s (-18%)." in md


def test_startup_times_split_the_worker_group():
    from pipeline.train.loop import startup_times
    stamps = [110.0, 111.0, 115.0, 115.5, 116.0]  # set-up began, tokenizer, engine, restore, data
    t = startup_times(100.0, stamps, process=103.0, loaded=107.0)
    assert t["startup/worker_group_s"] == 10.0 and t["startup/engine_s"] == 4.0
    assert (t["startup/worker_process_s"], t["startup/imports_s"], t["startup/backend_s"]) == (3.0, 4.0, 3.0)
    # a process Ray started before the fit: its wait counts from the fit's start, nothing of it before
    t = startup_times(100.0, stamps, process=90.0, loaded=104.0)
    assert (t["startup/worker_process_s"], t["startup/imports_s"], t["startup/backend_s"]) == (0.0, 4.0, 6.0)
    # a pooled process that had loaded the module before the fit: no process start, no imports paid by this fit
    t = startup_times(100.0, stamps, process=90.0, loaded=95.0)
    assert (t["startup/worker_process_s"], t["startup/imports_s"], t["startup/backend_s"]) == (0.0, 0.0, 10.0)
    assert "startup/imports_s" not in startup_times(100.0, stamps)  # process start unknown: no split
    assert "startup/worker_group_s" not in startup_times(0.0, stamps, process=90.0, loaded=95.0)


def test_benchmark_knobs_from_overrides_are_checked_before_anything_runs():
    from pipeline.errors import PipelineError
    with pytest.raises(PipelineError) as err:
        tune.run("c", extra=["asha.reduction_factor=2.5"])
    assert str(err.value).startswith("asha.reduction_factor: '2.5' is not a whole number")
    assert "e.g. asha.reduction_factor=4" in str(err.value)
