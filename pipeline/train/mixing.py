"""Task loss weights, sampling ratios (fixed, annealed or online) and the seeded per-step task sampler.

Weights are normalised to sum to the number of tasks T (equal weighting = 1.0 each); ratios to sum
to 1. Every rank builds the same sampler from the same seed, so every rank trains the same task at
every step (ranks drawing different tasks would deadlock the collectives).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np


def normalise_weights(weights: Mapping[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    if total <= 0 or any(w < 0 for w in weights.values()):
        raise ValueError(f"task weights must be non-negative with a positive sum, got {dict(weights)}")
    return {t: len(weights) * w / total for t, w in weights.items()}


def normalise_ratios(ratios: Mapping[str, float]) -> dict[str, float]:
    total = sum(ratios.values())
    if total <= 0 or any(v < 0 for v in ratios.values()):
        raise ValueError(f"sampling ratios must be non-negative with a positive sum, got {dict(ratios)}")
    return {t: v / total for t, v in ratios.items()}


def sampling_ratios(strategy: str, train_rows: Mapping[str, int], explicit: Mapping[str, float] | None = None,
                    temperature: float = 1.0, size_cap: int | None = None, alpha: float = 1.0) -> dict[str, float]:
    """explicit: as given; proportional: by train rows; temperature: p ∝ n^(1/T); annealed: p ∝ n^α.
    `size_cap` (T5's K) counts at most K rows per task. Sums to 1."""
    rows = {t: float(min(n, size_cap) if size_cap else n) for t, n in train_rows.items()}
    if strategy == "explicit":
        raw = {t: float((explicit or {})[t]) for t in train_rows}
    elif strategy == "proportional":
        raw = rows
    elif strategy == "temperature":
        raw = {t: n ** (1.0 / temperature) for t, n in rows.items()}
    elif strategy == "annealed":
        raw = {t: n ** alpha for t, n in rows.items()}
    else:
        raise ValueError(f"unknown sampling strategy {strategy!r}")
    return normalise_ratios(raw)


class Mixture:
    """The sampling ratios at every step: fixed (explicit, proportional, temperature), annealed (α falls
    linearly from 1 at step 0 to `floor` at the last step), and optionally moved online by a bandit.

    Online (EXP3 with the strategy's ratios q as prior, after Albalak et al. 2023): each task keeps a score
    S_t. When a step of task t ends with rank-averaged loss L, its progress is r = (L̄_t − L) / L̄_t, clipped to
    [−1, 1], against L̄_t, the task's moving average (β = 0.9; the first loss only sets L̄_t, r = 0). All scores
    decay (S ← 0.9 · S), then S_t += r / p_t (the importance-weighted reward of the arm drawn with p_t). The
    ratios are p = (1 − γ) · softmax(log q + η · S) + γ · q (η = `online_eta`, γ = `online_explore`):
    tasks whose loss still falls get more steps, and none falls below γ · q_t."""

    DISCOUNT, BETA = 0.9, 0.9

    def __init__(self, strategy: str, train_rows: Mapping[str, int], explicit: Mapping[str, float] | None = None,
                 temperature: float = 2.0, size_cap: int | None = None, floor: float = 0.2, total_steps: int = 1,
                 online: bool = False, eta: float = 0.1, explore: float = 0.2):
        self.strategy, self.rows, self.explicit = strategy, dict(train_rows), dict(explicit or {})
        self.temperature, self.size_cap, self.floor, self.total = temperature, size_cap, floor, total_steps
        self.online, self.eta, self.explore = online, eta, explore
        self.tasks = list(train_rows)
        self.score = {t: 0.0 for t in self.tasks}
        self.average: dict[str, float] = {}
        self.fixed = None
        self.fixed = None if strategy == "annealed" else self._prior(0)  # the same ratios at every step
        self.last: dict[str, float] = {}

    @classmethod
    def from_config(cls, sampling, train_rows: Mapping[str, int], explicit: Mapping[str, float | None],
                    total_steps: int) -> "Mixture":
        return cls(sampling.strategy, train_rows, explicit if sampling.strategy == "explicit" else None,
                   sampling.temperature, sampling.size_cap, sampling.anneal_floor, total_steps, sampling.online,
                   sampling.online_eta, sampling.online_explore)

    @property
    def needs_losses(self) -> bool:
        return self.online

    def alpha(self, step: int) -> float:
        return 1.0 - (1.0 - self.floor) * min(step, self.total - 1) / max(1, self.total - 1)

    def _prior(self, step: int) -> dict[str, float]:
        if self.fixed is not None:
            return self.fixed
        return sampling_ratios(self.strategy, self.rows, self.explicit, self.temperature, self.size_cap,
                               self.alpha(step) if self.strategy == "annealed" else 1.0)

    def ratios(self, step: int) -> dict[str, float]:
        """The ratios of the draw at `step` (0-based)."""
        prior = self._prior(step)
        if not self.online:
            self.last = prior
            return prior
        logits = np.array([math.log(prior[t]) + self.eta * self.score[t] if prior[t] > 0 else -np.inf
                           for t in self.tasks])
        bandit = np.exp(logits - logits.max())
        bandit /= bandit.sum()
        self.last = {t: float((1 - self.explore) * b + self.explore * prior[t]) for t, b in zip(self.tasks, bandit)}
        return self.last

    def observe(self, task: str, loss: float) -> None:
        """The rank-averaged loss of the step that trained `task` (drawn with ratio `self.last[task]`)."""
        if not self.online:
            return
        previous = self.average.get(task)
        reward = 0.0 if previous is None or previous <= 0 else max(-1.0, min(1.0, (previous - loss) / previous))
        self.average[task] = loss if previous is None else self.BETA * previous + (1 - self.BETA) * loss
        for t in self.tasks:
            self.score[t] *= self.DISCOUNT
        self.score[task] += reward / max(self.last.get(task, 1.0), 1e-12)

    def state_dict(self) -> dict:
        return {"score": dict(self.score), "average": dict(self.average), "last": dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        self.score, self.average, self.last = dict(state["score"]), dict(state["average"]), dict(state["last"])


class TaskSampler:
    """Draws the task of each optimizer step from the mixture's ratios at that step. Its state (the draw
    count, the generator's state and the mixture's) goes into checkpoints, so a resumed run continues the
    exact same sequence."""

    def __init__(self, mixture: "Mixture | Mapping[str, float]", seed: int):
        self.mixture = mixture if isinstance(mixture, Mixture) else Mixture("explicit", {t: 1 for t in mixture}, mixture)
        self.tasks = list(self.mixture.tasks)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.draws = 0
        self.counts = {t: 0 for t in self.tasks}  # steps drawn per task (single-task baselines get as many)

    def next(self) -> str:
        ratios = self.mixture.ratios(self.draws)
        probs = np.array([ratios[t] for t in self.tasks], dtype=np.float64)
        self.draws += 1
        task = self.tasks[int(self.rng.choice(len(self.tasks), p=probs))]
        self.counts[task] += 1
        return task

    def ratios(self) -> dict[str, float]:
        """The ratios of the latest draw (the next one's before any draw): logged as ratio/<task>."""
        return dict(self.mixture.last or self.mixture.ratios(self.draws))

    def state_dict(self) -> dict:
        return {"draws": self.draws, "rng": self.rng.bit_generator.state, "tasks": self.tasks, "counts": dict(self.counts),
                "mixture": self.mixture.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["tasks"] != self.tasks:
            raise ValueError(f"checkpoint sampler tasks {state['tasks']} differ from the config's {self.tasks}")
        self.draws = state["draws"]
        self.rng.bit_generator.state = state["rng"]
        self.counts = dict(state["counts"])
        if "mixture" in state:  # checkpoints from before online mixing had fixed ratios only
            self.mixture.load_state_dict(state["mixture"])
