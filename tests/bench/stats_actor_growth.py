"""Ray Data's cluster-wide `_StatsActor` over many dataset executions:
`.venv/bin/python tests/bench/stats_actor_growth.py [executions, default 3000]`.

A Ray Train dataset shard runs one Ray Data execution per pass over its data (`streaming_split`, here with
one split of an 800-row in-memory dataset, so an execution takes ~0.04 s). Every 50 executions the USS of the
`_StatsActor` and of this driver is sampled. Writes tests/bench/results/stats_actor.{json,md}. This is why
`train_driver` repeats small task splits inside one dataset (`PreparedTask.materialized(pass_bytes=...)`):
the actor keeps per-execution metrics for the life of the cluster (ray-project/ray#43924).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.benchmarks import RESULTS, header, machine  # noqa: E402
from pipeline.runtime import init_ray  # noqa: E402


def stats_actor_pid() -> int | None:
    import ray.util.state
    for actor in ray.util.state.list_actors(filters=[("state", "=", "ALIVE")]):
        if actor["class_name"] == "_StatsActor":
            return actor["pid"]
    return None


def main(executions: int) -> None:
    import ray.data

    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    split = ray.data.from_arrow(pa.table({"x": list(range(800))})).streaming_split(1, equal=True)[0]
    samples, pid, start = [], None, time.time()
    for n in range(executions + 1):
        for _ in split.iter_batches(batch_size=100):
            pass
        if n % 50 == 0:
            pid = pid or stats_actor_pid()
            if pid is None:
                continue
            samples.append((n, round(time.time() - start, 1), psutil.Process(pid).memory_full_info().uss / 2**20,
                            psutil.Process().memory_full_info().uss / 2**20))
            print(f"{n} executions: _StatsActor {samples[-1][2]:.0f} MiB, driver {samples[-1][3]:.0f} MiB", flush=True)
    e, actor = np.array([s[0] for s in samples]), np.array([s[2] for s in samples])
    late = e >= 1000
    result = {"benchmark": "stats_actor", "machine": machine(), "executions": executions,
              "mib_per_execution": float(np.polyfit(e, actor, 1)[0]),
              "mib_per_execution_after_1000": float(np.polyfit(e[late], actor[late], 1)[0]) if late.sum() > 2 else None,
              "samples_execution_s_actor_mib_driver_mib": samples}
    command = f"python tests/bench/stats_actor_growth.py {executions}"
    md = header("Ray Data `_StatsActor` memory over dataset executions", command, result["machine"]) + [
        f"{executions} executions of a one-split `streaming_split` (800 rows) in {samples[-1][1]:.0f} s.", "",
        "| executions | _StatsActor USS MiB | driver USS MiB |", "|---:|---:|---:|"]
    md += [f"| {s[0]} | {s[2]:.0f} | {s[3]:.0f} |" for s in samples if s[0] % 500 == 0]
    md += ["", f"Least-squares growth: **{result['mib_per_execution']:.2f} MiB per execution**"
           + (f"; after the first 1,000: {result['mib_per_execution_after_1000']:.2f}" if late.sum() > 2 else "")
           + " (Ray's `max_stats=1000` does not bound it).", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stats_actor.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "stats_actor.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)
