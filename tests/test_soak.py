"""Soak, opt-in (`pytest -m slow tests/test_soak.py`, about 35 minutes): a training run of MTL_SOAK_MINUTES
(default 30) on two classification tasks and XSum, 2 workers under ZeRO-2, evaluating and checkpointing
every 100 steps, while the memory of every process of the run — this driver, Ray Train's controller and
workers, Ray Data's split coordinators — is sampled every 10 s.

Two numbers per process and sample: RSS, and USS (the pages that belong to the process alone). RSS also counts
the object-store pages a process has mapped: a worker reading its batches zero-copy from Ray's shared-memory
store carries whichever blocks it touched last, so its RSS swings by 100+ MiB between samples with no change in
its own memory. A leak is growth of the process's own memory, so the assertion is on USS; RSS is reported.

No growth trend: after a warm-up of the first quarter, the least-squares slope of the USS of each of the run's
processes, extended over the analysed window, stays within 5% of its median (Ray's cluster-wide helper actors
are reported, not asserted on). Results: tests/bench/results/soak.{json,md}, raw series included.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.train.driver import train_driver

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tests" / "bench" / "results"
TASKS = ("{rotten_tomatoes: {max_rows: {validation: 64}}, bbc_news: {max_rows: {validation: 64}}, "
         "xsum: {max_rows: {train: 2000, validation: 8}}}")
GROWTH_LIMIT = 0.05  # of the median RSS, over the analysed window
# The run's own processes, held to the limit. Ray's cluster-wide helpers (its Data stats actor, placement-group
# cleaner, autoscaling coordinator, ...) are sampled and reported too, not asserted on.
RUN_PROCESSES = ("driver", "TrainController", "RayTrainWorker", "SplitCoordinator")
WARM_UP = 0.25  # share of the run left out of the trend (allocator pools, caches, first checkpoint)


def _sample(stop: threading.Event, samples: list, every_s: float = 10.0) -> None:
    import psutil
    import ray.util.state

    start = time.monotonic()
    while not stop.is_set():
        procs = {f"driver#{os.getpid()}": os.getpid()}
        try:
            for actor in ray.util.state.list_actors(filters=[("state", "=", "ALIVE")]):
                if actor.get("pid"):
                    procs[f"{actor['class_name']}#{actor['pid']}"] = actor["pid"]
        except Exception:  # the state API can be briefly busy; the next sample covers it
            pass
        now = time.monotonic() - start
        for name, pid in procs.items():
            try:
                mem = psutil.Process(pid).memory_full_info()  # reads /proc/<pid>/smaps: a few ms
                samples.append((now, name, mem.rss, mem.uss))
            except psutil.Error:
                pass
        stop.wait(every_s)


def _trend(points: list[tuple[float, int]], duration: float) -> dict:
    t = np.array([p[0] for p in points if p[0] >= WARM_UP * duration])
    mem = np.array([p[1] for p in points if p[0] >= WARM_UP * duration], dtype=float)
    slope = float(np.polyfit(t, mem, 1)[0]) if len(t) >= 3 else 0.0  # bytes per second
    median = float(np.median(mem))
    growth = slope * (t[-1] - t[0]) if len(t) >= 2 else 0.0
    return {"samples": len(points), "first_mib": points[0][1] / 2**20, "last_mib": points[-1][1] / 2**20,
            "median_mib": median / 2**20, "max_mib": max(p[1] for p in points) / 2**20,
            "slope_mib_per_10min": slope * 600 / 2**20, "growth_mib": growth / 2**20,
            "growth_share": growth / median, "seconds": points[-1][0] - points[0][0]}


def _table(title: str, trends: dict) -> list[str]:
    lines = [f"## {title}", "", "| process | samples | first MiB | median MiB | max MiB | last MiB | slope MiB/10 min "
             "| trend growth MiB | share of median |", "|---|---|---|---|---|---|---|---|---|"]
    return lines + [f"| {n} | {r['samples']} | {r['first_mib']:.0f} | {r['median_mib']:.0f} | {r['max_mib']:.0f} | "
                    f"{r['last_mib']:.0f} | {r['slope_mib_per_10min']:+.2f} | {r['growth_mib']:+.1f} | "
                    f"{r['growth_share']:+.2%} |" for n, r in sorted(trends.items())] + [""]


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)
def test_long_run_memory_has_no_growth_trend(tmp_path, cache_dir, ray_session):
    minutes = float(os.environ.get("MTL_SOAK_MINUTES", "30"))
    cfg = load_config(None, [
        "name=soak", "model.name=tiny-bert", "model.max_target_length=16", f"tasks={TASKS}", "train.num_workers=2",
        "train.cpus_per_worker=0.5", "train.zero_stage=2", "train.steps=1000000", f"train.max_minutes={minutes}",
        "train.batch_size=16", "train.log_every=20", "train.eval_every=100", "train.checkpoint_every=100",
        "train.keep_checkpoints=2", "train.eval_batch_size=16", f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"data.cache_dir={cache_dir}"])
    samples: list = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(stop, samples), daemon=True)
    sampler.start()
    start = time.monotonic()
    try:
        result = train_driver(cfg, log=lambda _: None)
    finally:
        stop.set()
        sampler.join()
    duration = time.monotonic() - start

    from mlflow.tracking import MlflowClient
    client = MlflowClient(cfg.tracking.uri)
    evaluations = len(client.get_metric_history(result.run_id, "dev/score"))
    by_process: dict[str, list] = {}
    for t, name, rss, uss in samples:
        by_process.setdefault(name, []).append((t, rss, uss))
    # Processes that lived through most of the run (short-lived ones, e.g. the data preparation, have no trend).
    lived = {n: p for n, p in by_process.items() if p[-1][0] - p[0][0] >= 0.8 * duration - 60}
    uss = {n: _trend([(t, u) for t, _, u in p], duration) for n, p in lived.items()}
    rss = {n: _trend([(t, r) for t, r, _ in p], duration) for n, p in lived.items()}
    report = {"minutes": minutes, "wall_s": round(duration, 1), "steps": result.steps, "evaluations": evaluations,
              "checkpoint_every": 100, "growth_limit_share": GROWTH_LIMIT, "warm_up_share": WARM_UP,
              "asserted_on": "uss", "uss": uss, "rss": rss,
              "samples": {n: [(round(t, 1), r, u) for t, r, u in p] for n, p in by_process.items()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(report, indent=2))
    lines = [f"# Soak: {minutes:g} min of training, {result.steps} steps, {evaluations} evaluations, a checkpoint "
             "every 100 steps", "", "Trend = least-squares slope after the first quarter, extended over the window; "
             f"limit {GROWTH_LIMIT:.0%} of the median for the run's own processes ({', '.join(RUN_PROCESSES)}).", ""]
    lines += _table("USS (the process's own memory; asserted)", uss)
    lines += _table("RSS (includes mapped object-store pages; reported)", rss)
    (RESULTS / "soak.md").write_text("\n".join(lines))
    print("\n" + "\n".join(lines))

    assert result.steps >= 200 and evaluations >= 2
    assert {n.split("#")[0] for n in uss} >= set(RUN_PROCESSES), sorted(uss)
    for name, r in uss.items():
        if name.split("#")[0] in RUN_PROCESSES:
            assert r["growth_share"] <= GROWTH_LIMIT, (name, r)
