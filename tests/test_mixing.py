"""Loss weights, sampling ratios, and the seeded task sampler."""

from __future__ import annotations

import collections

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
