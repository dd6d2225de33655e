"""What a training window measures between two log lines, kept out of the loop's way.

`Window` counts tokens, samples and per-task losses of the steps in it, and the time spent paused
(evaluation, checkpoints), so throughput counts training time only. `Profiler` (`train.profile`) wraps
the engine's forward, backward and step and the batch iterators with timers — the loop itself carries no
timestamps — and reads DeepSpeed's comms logger; its phases and "other" add up to the window.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Iterator

import numpy as np
import torch

PHASES = ("data", "forward", "backward", "step")


def cpu_seconds() -> float:
    """CPU time (user + system, all threads) this process has used: next to the wall clock it shows
    whether training got the cores it was given or shared them with other processes."""
    t = os.times()
    return t.user + t.system


class Window:
    def __init__(self, tasks: list[str], profiler: "Profiler | None" = None):
        self.profiler = profiler
        self.start, self.cpu = time.perf_counter(), cpu_seconds()
        self.paused = self.paused_cpu = 0.0
        self.tokens = self.samples = 0
        self.losses: dict[str, list[float]] = {t: [] for t in tasks}

    def add(self, task: str, losses: list[float], tokens: int, samples: int) -> None:
        self.losses[task] += losses
        self.tokens += tokens
        self.samples += samples

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Time inside is not training time (evaluation, checkpoints, one-off measurements)."""
        wall, cpu = time.perf_counter(), cpu_seconds()
        if self.profiler is not None:
            self.profiler.counting = False  # evaluation forwards are not training phases
        try:
            yield
        finally:
            if self.profiler is not None:
                self.profiler.counting = True
            self.paused += time.perf_counter() - wall
            self.paused_cpu += cpu_seconds() - cpu

    def metrics(self, weighting, sampler, lr: float) -> dict[str, float]:
        """Loss per task and total, weights, steps drawn, lr and the group's throughput (collective: every
        rank calls it at the same step)."""
        import torch.distributed as dist
        counts = torch.tensor([self.tokens, self.samples], dtype=torch.float64)
        dist.all_reduce(counts)  # throughput of the whole group, not one rank
        seconds = time.perf_counter() - self.start - self.paused
        losses = {t: float(np.mean(v)) for t, v in self.losses.items() if v}
        out = {f"loss/{t}": v for t, v in losses.items()}
        out["loss/total"] = float(np.mean([weighting.weight(t) * v for t, v in losses.items()]))
        out.update({f"weight/{t}": w for t, w in weighting.weights().items()})
        out.update({f"steps/{t}": float(c) for t, c in sampler.counts.items()})  # steps drawn so far
        out.update({f"ratio/{t}": r for t, r in sampler.ratios().items()})  # the latest draw's ratios
        out.update({"lr": lr, "tokens_per_s": counts[0].item() / seconds, "samples_per_s": counts[1].item() / seconds})
        profiler = self.profiler
        if profiler is not None:  # rank 0's view; the phases and "other" add up to the window
            phases = profiler.take()
            out.update({f"time/{k}": v for k, v in phases.items()})
            out.update({"time/window": seconds, "time/paused": self.paused,
                        "time/other": max(0.0, seconds - sum(phases.values())), "time/comm": profiler.comm_seconds(),
                        "time/cpu": cpu_seconds() - self.cpu - self.paused_cpu})
        return out


class Profiler:
    """Per-phase wall time of the training steps, by wrapping what the loop calls."""

    def __init__(self, engine, iters: dict[str, Iterator]):
        self.phases = dict.fromkeys(PHASES, 0.0)
        self.counting = True
        self._comm_seen: dict[str, float] = {}
        self._sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        engine.forward = self._timed(engine.forward, "forward")
        engine.backward = self._timed(engine.backward, "backward")
        engine.step = self._timed(engine.step, "step")
        for task, it in iters.items():
            iters[task] = self._timed_iter(it)
        self.comm_seconds()  # start counting now, not at engine start-up

    def _timed(self, fn: Callable, phase: str) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.counting:
                self._sync()
                self.phases[phase] += time.perf_counter() - start
            return out
        return timed

    def _timed_iter(self, it: Iterator) -> Iterator:
        while True:
            start = time.perf_counter()
            batch = next(it)
            self.phases["data"] += time.perf_counter() - start
            yield batch

    def take(self) -> dict[str, float]:
        out, self.phases = self.phases, dict.fromkeys(PHASES, 0.0)
        return out

    def comm_seconds(self) -> float:
        """Seconds in DeepSpeed's collectives since the last call (its comms logger records each op's
        running total — its timers are never reset — so a window's time is the growth of each total)."""
        from deepspeed.comm import comms_logger
        if not comms_logger.enabled:
            return 0.0
        total = 0.0
        for name, sizes in comms_logger.get_raw_data().items():
            running = max(max(entry[1]) for entry in sizes.values())
            total += running - self._comm_seen.get(name, 0.0)
            self._comm_seen[name] = running
        comms_logger.reset_data()  # bounded memory; the timers keep the running totals
        return total / 1000.0  # milliseconds
