"""Training data hand-over: what `train_driver` does per task before Ray Train starts — the cached train split,
seeded order, the training columns, into the object store as a Ray Dataset for `TorchTrainer(datasets=...)`.

Two sides on the same prepared cache, alternating, `repeats` times each, with Ray already running:
- the driver's call, `PreparedTask.materialized(..., workers=, pass_bytes=PASS_BYTES)`: a split of at most
  SMALL_SPLIT_BYTES of Parquet is read and ordered in the driver (pyarrow), repeated up to PASS_BYTES (each
  worker's part several times, so one Ray Data execution covers several epochs) and handed over with
  `ray.data.from_arrow`; a larger one goes through Ray Data;
- `PreparedTask.dataset(...).materialize()`: always Ray Data (read_parquet → order key → sort → materialize),
  one copy, what the driver did before.
Both must hold the same rows in the same order, each worker's part repeated on the first side (checked on every
repetition).
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.benchmarks import header, machine, median


def run(cfg, command: str, *, repeats: int = 3) -> tuple[dict[str, Any], str]:
    from pipeline.data.preprocess import SMALL_SPLIT_BYTES, prepare_tasks
    from pipeline.runtime import init_ray
    from pipeline.train.driver import PASS_BYTES, train_split_args

    init_ray()
    prepared = prepare_tasks(cfg, log=lambda _: None)
    args = {t: train_split_args(cfg, t, p) for t, p in prepared.items()}
    workers = cfg.train.num_workers

    def timed(t: str, fast: bool) -> tuple[float, list]:
        p = prepared[t]
        start = time.perf_counter()
        ds = (p.materialized("train", **args[t], workers=workers, pass_bytes=PASS_BYTES) if fast
              else p.dataset("train", **args[t]).materialize())
        seconds = time.perf_counter() - start
        return seconds, ds.take_all()

    def layout(rows: list, copies: int) -> list:  # the driver's layout: each worker's part, `copies` times
        part = len(rows) // workers
        return [r for i in range(workers) for _ in range(copies) for r in rows[i * part:(i + 1) * part]]

    for t in prepared:  # warm-up of both sides: Ray Data's worker processes, imports
        timed(t, True), timed(t, False)
    rows: dict[str, dict[str, Any]] = {}
    for t, p in prepared.items():
        a, b = [], []
        for i in range(repeats):
            sa, ra = timed(t, True)
            sb, rb = timed(t, False)
            copies = max(1, len(ra) // max(len(rb) // workers * workers, 1))
            if ra != (layout(rb, copies) if copies > 1 else rb):
                raise AssertionError(f"task {t}: the two paths gave different rows or order")
            a.append(sa), b.append(sb)
            print(f"{t} {i + 1}/{repeats}: materialized {sa:.2f} s, Ray Data sort {sb:.2f} s", flush=True)
        nbytes = p.nbytes("train")
        rows[t] = {"rows": len(rb), "copies": copies, "parquet_bytes": nbytes,
                   "path": "in-driver" if nbytes <= SMALL_SPLIT_BYTES else "ray-data",
                   "materialized_s": a, "ray_data_sort_s": b, "ratio": median(b) / median(a)}
    total_a = sum(median(r["materialized_s"]) for r in rows.values())
    total_b = sum(median(r["ray_data_sort_s"]) for r in rows.values())
    result = {"benchmark": "train_data", "command": command, "machine": machine(), "repeats": repeats,
              "small_split_bytes": SMALL_SPLIT_BYTES, "pass_bytes": PASS_BYTES, "workers": workers, "tasks": rows,
              "total_materialized_s": total_a, "total_ray_data_sort_s": total_b, "ratio": total_b / total_a}
    md = header("training data hand-over (per task, before Ray Train starts)", command, result["machine"]) + [
        f"Median of {repeats} alternating repetitions after a warm-up of each side; Ray already running; the same "
        "rows in the same order checked on every repetition. *in-driver*: the split is at most "
        f"{SMALL_SPLIT_BYTES // 2**20} MiB of Parquet, ordered with pyarrow, each of the {workers} workers' parts "
        f"repeated up to {PASS_BYTES // 2**20} MiB (*copies*: epochs per Ray Data execution) and handed over with "
        "`from_arrow`; the Ray Data side holds one copy.", "",
        "| task | rows | Parquet KiB | `materialized` path | copies | `materialized` s | Ray Data sort s | speed-up |",
        "|---|---:|---:|---|---:|---:|---:|---:|"]
    md += [f"| {t} | {r['rows']:,} | {r['parquet_bytes'] / 1024:,.0f} | {r['path']} | {r['copies']} | "
           f"{median(r['materialized_s']):.2f} | {median(r['ray_data_sort_s']):.2f} | {r['ratio']:.1f}× |"
           for t, r in rows.items()]
    md += [f"| **all** | | | | | {total_a:.2f} | {total_b:.2f} | **{result['ratio']:.1f}×** |", ""]
    return result, "\n".join(md)
