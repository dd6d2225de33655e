"""Intervals over seeds, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest

from pipeline.eval.stats import interval, paired


def test_interval_is_student_t_over_seeds():
    iv = interval([1.0, 2.0, 3.0])
    # s = 1, sem = 1/√3, t(0.975, df=2) = 4.302653
    assert iv.mean == 2.0 and iv.n == 3
    assert iv.half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert iv.low == pytest.approx(2 - 2.484138, rel=1e-6) and not iv.holds
    assert interval([5.0, 6.0, 7.0, 6.0]).holds  # every value far above 0
    assert interval([0.3, 0.3]).half == 0.0 and interval([0.3, 0.3]).holds
    assert iv.text(1, 2) == "2.00 ± 2.48"


def test_one_seed_has_no_interval_and_never_holds():
    iv = interval([0.85])
    assert iv.mean == 0.85 and math.isnan(iv.half) and not iv.holds and iv.text(100) == "85.0"
    assert interval([]).n == 0 and interval([]).text() == "n/a"


def test_paired_difference_cancels_the_shared_seed_noise():
    a, b = [80.0, 85.0, 90.0], [79.0, 84.1, 89.0]  # seeds move both by ±5; a leads by about 1 every time
    assert not interval(a).low > interval(b).high  # unpaired, the intervals overlap
    d = paired(a, b)
    assert d.mean == pytest.approx(0.9667, abs=1e-4) and d.holds and d.low > 0
    assert not paired([1.0, 2.0, 3.0], [2.0, 1.0, 3.0]).holds
    with pytest.raises(ValueError, match="same seeds"):
        paired([1.0, 2.0], [1.0])
