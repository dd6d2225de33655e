"""Loss weights, sampling ratios, and the seeded task sampler."""

from __future__ import annotations

import collections
import math

import pytest

from pipeline.train.mixing import TaskSampler, normalise_weights, sampling_ratios


def test_weights_sum_to_the_number_of_tasks():
    assert normalise_weights({"a": 1, "b": 3}) == {"a": 0.5, "b": 1.5}
    assert normalise_weights({"a": 2, "b": 2, "c": 2}) == {"a": 1.0, "b": 1.0, "c": 1.0}
    with pytest.raises(ValueError):
        normalise_weights({"a": 0, "b": 0})
    with pytest.raises(ValueError):
        normalise_weights({"a": -1, "b": 2})


def test_sampling_strategies_normalise_to_one():
    rows = {"a": 100, "b": 300}
    assert sampling_ratios("proportional", rows) == pytest.approx({"a": 0.25, "b": 0.75})
    t2 = sampling_ratios("temperature", rows, temperature=2.0)
    assert t2["a"] == pytest.approx(10 / (10 + 300 ** 0.5))
    assert sampling_ratios("temperature", rows, temperature=1.0) == pytest.approx({"a": 0.25, "b": 0.75})
    assert abs(sampling_ratios("temperature", rows, temperature=1e6)["a"] - 0.5) < 1e-4  # → uniform
    assert sampling_ratios("explicit", rows, {"a": 3, "b": 1}) == pytest.approx({"a": 0.75, "b": 0.25})
    with pytest.raises(ValueError):
        sampling_ratios("explicit", rows, {"a": 0, "b": 0})


def test_sampler_proportions_interleaving_and_determinism():
    ratios = {"a": 0.2, "b": 0.5, "c": 0.3}
    s1, s2 = TaskSampler(ratios, seed=7), TaskSampler(ratios, seed=7)
    seq = [s1.next() for _ in range(20000)]
    assert seq == [s2.next() for _ in range(20000)]  # every rank draws the same tasks
    counts = collections.Counter(seq)
    for task, p in ratios.items():
        assert abs(counts[task] / len(seq) - p) < 0.015
    switches = sum(1 for x, y in zip(seq, seq[1:]) if x != y)
    assert switches > 0.5 * len(seq)  # interleaved, not blocks of one task
    other = TaskSampler(ratios, seed=8)
    assert [other.next() for _ in range(50)] != seq[:50]


def test_sampler_state_round_trip_continues_the_sequence():
    ratios = {"a": 0.5, "b": 0.5}
    full = TaskSampler(ratios, seed=0)
    expected = [full.next() for _ in range(150)]
    first = TaskSampler(ratios, seed=0)
    head = [first.next() for _ in range(100)]
    state = first.state_dict()
    resumed = TaskSampler(ratios, seed=123)  # the seed is overwritten by the state
    resumed.load_state_dict(state)
    assert head + [resumed.next() for _ in range(50)] == expected
    assert resumed.draws == 150
    with pytest.raises(ValueError, match="differ"):
        TaskSampler({"a": 1.0}, seed=0).load_state_dict(state)


def test_size_cap_and_annealing_against_hand_computed_ratios():
    from pipeline.train.mixing import Mixture

    rows = {"big": 10_000, "small": 100}
    capped = sampling_ratios("temperature", rows, temperature=2.0, size_cap=400)  # T5: min(n, K)^(1/T)
    assert capped == pytest.approx({"big": 20 / 30, "small": 10 / 30})
    assert sampling_ratios("proportional", rows, size_cap=400) == pytest.approx({"big": 0.8, "small": 0.2})

    annealed = Mixture("annealed", rows, floor=0.2, total_steps=101)
    assert annealed.alpha(0) == 1.0 and annealed.alpha(50) == pytest.approx(0.6) and annealed.alpha(100) == pytest.approx(0.2)
    assert annealed.ratios(0) == pytest.approx({"big": 10_000 / 10_100, "small": 100 / 10_100})  # α=1: proportional
    end = 10_000 ** 0.2 / (10_000 ** 0.2 + 100 ** 0.2)  # 6.31 / (6.31 + 2.51)
    assert annealed.ratios(100)["big"] == pytest.approx(end) and annealed.ratios(500)["big"] == pytest.approx(end)
    sampler = TaskSampler(annealed, seed=0)
    draws = [sampler.next() for _ in range(101)]
    assert draws[:50].count("small") < draws[50:].count("small")  # the small task's share grows
    assert sampler.ratios()["big"] == pytest.approx(end)  # the latest draw's ratios (logged as ratio/<task>)
    # A fixed strategy draws exactly as fixed ratios do: temperature 2 on 1 and 9 rows is 1 : 3.
    temperature = TaskSampler(Mixture("temperature", {"a": 1, "b": 9}, temperature=2.0), seed=3)
    fixed = TaskSampler({"a": 0.25, "b": 0.75}, seed=3)
    assert [temperature.next() for _ in range(200)] == [fixed.next() for _ in range(200)]


def test_online_mixing_moves_toward_the_task_whose_loss_still_falls():
    from pipeline.train.mixing import Mixture

    m = Mixture("proportional", {"a": 100, "b": 100}, online=True, eta=0.5, explore=0.2)
    assert m.ratios(0) == pytest.approx({"a": 0.5, "b": 0.5})
    m.observe("a", 2.0)  # first loss of a task: sets its average, no reward
    assert m.score == {"a": 0.0, "b": 0.0} and m.average == {"a": 2.0}
    m.ratios(1)
    m.observe("a", 1.0)  # r = (2 − 1) / 2 = 0.5, drawn with p = 0.5: S_a = 0.9 · 0 + 0.5 / 0.5 = 1
    assert m.score == pytest.approx({"a": 1.0, "b": 0.0}) and m.average["a"] == pytest.approx(1.9)
    bandit_a = math.exp(0.5) / (math.exp(0.5) + 1)  # softmax(log 0.5 + 0.5 · S)
    assert m.ratios(2)["a"] == pytest.approx(0.8 * bandit_a + 0.2 * 0.5)
    m.observe("b", 3.0)
    m.ratios(3)
    m.observe("b", 3.3)  # b's loss rose: r = (3 − 3.3) / 3 = −0.1
    p_b = 0.8 / (math.exp(0.5 * 0.9) + 1) + 0.1  # b's ratio of that draw (S_a had decayed once: 0.9)
    assert m.score == pytest.approx({"a": 0.81, "b": -0.1 / p_b})
    gap = 0.5 * (0.81 + 0.1 / p_b)  # the logit gap a − b
    assert m.ratios(4)["a"] == pytest.approx(0.8 / (1 + math.exp(-gap)) + 0.1)
    for _ in range(200):  # however far the scores go, every task keeps γ · prior
        m.ratios(5)
        m.observe("a", 0.5 * m.average["a"])
    assert m.ratios(6)["b"] >= 0.2 * 0.5 - 1e-12

    state = m.state_dict()
    again = Mixture("proportional", {"a": 100, "b": 100}, online=True, eta=0.5, explore=0.2)
    again.load_state_dict(state)
    assert again.ratios(7) == m.ratios(7)


def test_sampler_with_online_mixing_resumes_the_same_draws():
    from pipeline.train.mixing import Mixture

    def run(sampler, steps, losses):
        out = []
        for _ in range(steps):
            task = sampler.next()
            sampler.mixture.observe(task, losses[task])
            losses[task] *= 0.9 if task == "a" else 1.0
            out.append(task)
        return out

    make = lambda: TaskSampler(Mixture("temperature", {"a": 50, "b": 200}, temperature=2.0, online=True), seed=1)  # noqa: E731
    losses = {"a": 1.0, "b": 1.0}
    expected = run(make(), 120, dict(losses))
    first = make()
    head = run(first, 70, losses)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert head + run(resumed, 50, losses) == expected
    assert expected[60:].count("a") > expected[:60].count("a")  # a's loss keeps falling: it gets more steps
