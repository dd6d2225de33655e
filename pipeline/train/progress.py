"""Training progress on the driver's console. Rank 0 puts each logged step and each evaluation on a Ray
queue; the driver draws them as one tqdm bar (step, per-task loss, tokens/s, ETA) with the evaluations
as compact lines above it, or — when its output is not a terminal (`ray job logs`, CI, a file) — as plain
lines. Without a queue (tests, Tune trials) rank 0 prints the same lines itself.

    view = ProgressView(total=cfg.train.steps, bar=sys.stderr.isatty())   # driver
    job = WorkerJob(..., progress=view.queue)
    trainer.fit()
    view.close()                                                            # drains what is left
    # rank 0: send(job.progress, "step", {...}) / send(job.progress, "line", "eval step 60: ...")
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any


def send(queue, kind: str, payload: Any) -> None:
    """Rank 0's side: to the driver's view, or straight to stdout when there is none."""
    if queue is not None:
        queue.put((kind, payload))
    else:
        sys.stdout.write((payload if kind == "line" else step_line(payload)) + "\n")
        sys.stdout.flush()


def step_line(m: dict[str, Any], eta_s: float | None = None) -> str:
    """`step 60/120 · loss 2.49 (rotten_tomatoes 0.49, xsum 6.87) · 438 tok/s · ETA 3:12`"""
    tasks = ", ".join(f"{k.split('/', 1)[1]} {v:.3g}" for k, v in m["metrics"].items()
                      if k.startswith("loss/") and k != "loss/total")
    weights = ", ".join(f"{k.split('/', 1)[1]} {v:.3g}" for k, v in m["metrics"].items() if k.startswith("weight/"))
    parts = [f"step {m['step']}/{m['total']}", f"loss {m['metrics'].get('loss/total', float('nan')):.3g} ({tasks})"]
    parts += [f"weights ({weights})"] if weights else []
    parts += [f"{m['metrics'].get('tokens_per_s', 0):,.0f} tok/s"]
    if eta_s is not None:
        parts.append(f"ETA {int(eta_s // 60)}:{int(eta_s % 60):02d}")
    return " · ".join(parts)


class ProgressView:
    """The driver's side: a queue (a zero-CPU Ray actor on the driver's node: a queue on a worker node that dies
    would fail every restarted worker group at its first progress line) and a thread that draws what arrives."""

    def __init__(self, total: int, bar: bool):
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.total, self.queue = total, Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.started: tuple[float, int] | None = None  # (time, step) of the first step seen: the ETA's base
        self.bar = None
        if bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr, leave=True)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="mtl-progress")
        self.thread.start()

    def _run(self) -> None:
        from ray.util.queue import Empty
        while not self.stop.is_set():
            try:
                self._draw(*self.queue.get(timeout=0.5))
            except Empty:
                continue
            except Exception:  # the queue's actor is gone (the cluster went away): nothing more to draw
                return

    def _draw(self, kind: str, payload: Any) -> None:
        if kind == "line":
            self.bar.write(payload, file=sys.stderr) if self.bar is not None else print(payload, flush=True)
            return
        now, step = time.monotonic(), payload["step"]
        if self.started is None:
            self.started = (now, step)
        t0, s0 = self.started
        eta = (now - t0) / (step - s0) * (self.total - step) if step > s0 else None
        if self.bar is None:
            print(step_line(payload, eta), flush=True)
            return
        self.bar.n = step  # tqdm draws step/total, rate and ETA itself; the loss and tokens/s follow
        self.bar.set_postfix_str(step_line(payload).split(" · ", 1)[1], refresh=True)

    def close(self) -> None:
        """Draw what is still queued, then end the bar and the queue's actor (call before the summary)."""
        self.stop.set()
        self.thread.join(timeout=5)
        try:
            while not self.queue.empty():
                self._draw(*self.queue.get_nowait())
        except Exception:  # noqa: BLE001 - the actor is gone: nothing left to draw
            pass
        if self.bar is not None:
            self.bar.close()
        try:
            self.queue.shutdown()
        except Exception:  # noqa: BLE001
            pass
