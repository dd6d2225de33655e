"""Quality over seeds: a mean with its 95% confidence interval (Student t), and paired differences.

    interval([85.1, 86.0, 84.7])            # Interval(mean=85.27, half=1.66, n=3)  -> "85.3 ± 1.7"
    paired([85.1, 86.0, 84.7], [83.0, 84.2, 84.9])   # the difference per seed, then its interval
    paired(...).holds                        # True when the interval excludes 0 (a claim that holds)

With one value there is no interval (half is NaN, `holds` is False): one seed never supports a claim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from scipy import stats

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    half: float  # half-width of the 95% interval; NaN with fewer than two values
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    @property
    def holds(self) -> bool:
        """The interval excludes 0 (for a difference: the sign is supported by the seeds)."""
        return self.n > 1 and not math.isnan(self.half) and (self.low > 0 or self.high < 0)

    def text(self, scale: float = 1.0, digits: int = 1) -> str:
        if math.isnan(self.mean):
            return "n/a"
        if self.n < 2 or math.isnan(self.half):
            return f"{scale * self.mean:.{digits}f}"
        return f"{scale * self.mean:.{digits}f} ± {scale * self.half:.{digits}f}"


def interval(values: Sequence[float]) -> Interval:
    """Mean ± t_{0.975, n-1} · s / √n over the values (NaN values are an error of the caller: none here)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, 0)
    mean = sum(xs) / n
    if n < 2:
        return Interval(mean, math.nan, n)
    sem = stats.sem(xs)
    half = 0.0 if sem == 0 else float(stats.t.ppf(0.5 + LEVEL / 2, n - 1) * sem)
    return Interval(mean, half, n)


def paired(a: Sequence[float], b: Sequence[float]) -> Interval:
    """The interval of a − b paired by position (by seed): the seeds' shared noise cancels."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same seeds on both sides ({len(a)} vs {len(b)} values)")
    return interval([x - y for x, y in zip(a, b)])
