"""Task loss weights, sampling ratios and the seeded per-step task sampler.

Weights are normalised to sum to the number of tasks T (equal weighting = 1.0 each); ratios to sum
to 1. Every rank builds the same sampler from the same seed, so every rank trains the same task at
every step (ranks drawing different tasks would deadlock the collectives).
"""

from __future__ import annotations

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
                    temperature: float = 1.0) -> dict[str, float]:
    """explicit: as given; proportional: by train rows; temperature: p ∝ n^(1/T). Sums to 1."""
    if strategy == "explicit":
        raw = {t: float((explicit or {})[t]) for t in train_rows}
    elif strategy == "proportional":
        raw = {t: float(n) for t, n in train_rows.items()}
    elif strategy == "temperature":
        raw = {t: float(n) ** (1.0 / temperature) for t, n in train_rows.items()}
    else:
        raise ValueError(f"unknown sampling strategy {strategy!r}")
    return normalise_ratios(raw)


class TaskSampler:
    """Draws the task of each optimizer step. Its state (a step count and the generator's state)
    goes into checkpoints, so a resumed run continues the exact same sequence."""

    def __init__(self, ratios: Mapping[str, float], seed: int):
        self.tasks = list(ratios)
        self.probs = np.array([ratios[t] for t in self.tasks], dtype=np.float64)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.draws = 0
        self.counts = {t: 0 for t in self.tasks}  # steps drawn per task (single-task baselines get as many)

    def next(self) -> str:
        self.draws += 1
        task = self.tasks[int(self.rng.choice(len(self.tasks), p=self.probs))]
        self.counts[task] += 1
        return task

    def state_dict(self) -> dict:
        return {"draws": self.draws, "rng": self.rng.bit_generator.state, "tasks": self.tasks, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        if state["tasks"] != self.tasks:
            raise ValueError(f"checkpoint sampler tasks {state['tasks']} differ from the config's {self.tasks}")
        self.draws = state["draws"]
        self.rng.bit_generator.state = state["rng"]
        self.counts = dict(state["counts"])
