"""Training data hand-over: what `train_driver` does per task before Ray Train starts — the cached train split,
seeded order, the training columns, into the object store as a Ray Dataset for `TorchTrainer(datasets=...)`.

Two sides on the same prepared cache, alternating, `repeats` times each, with Ray already running:
- `PreparedTask.materialized`: a split of at most SMALL_SPLIT_BYTES of Parquet is read and ordered in the driver
  (pyarrow) and handed over with `ray.data.from_arrow`; a larger one goes through Ray Data;
- `PreparedTask.dataset(...).materialize()`: always Ray Data (read_parquet → order key → sort → materialize),
  what the driver did before.
Both must give the same rows in the same order (checked on every repetition).
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.benchmarks import header, machine, median


def run(cfg, command: str, *, repeats: int = 3) -> tuple[dict[str, Any], str]:
    from pipeline.data.preprocess import SMALL_SPLIT_BYTES, prepare_tasks
    from pipeline.runtime import init_ray
    from pipeline.train.driver import TRAIN_COLUMNS

    init_ray()
    prepared = prepare_tasks(cfg, log=lambda _: None)
    args = {t: dict(limit=cfg.tasks[t].max_rows.get("train"), shuffle_seed=cfg.seed,
                    columns=[c for c in TRAIN_COLUMNS if c in p.columns("train")]) for t, p in prepared.items()}

    def timed(t: str, fast: bool) -> tuple[float, list]:
        p = prepared[t]
        start = time.perf_counter()
        ds = p.materialized("train", **args[t]) if fast else p.dataset("train", **args[t]).materialize()
        seconds = time.perf_counter() - start
        return seconds, ds.take_all()

    for t in prepared:  # warm-up of both sides: Ray Data's worker processes, imports
        timed(t, True), timed(t, False)
    rows: dict[str, dict[str, Any]] = {}
    for t, p in prepared.items():
        a, b = [], []
        for i in range(repeats):
            sa, ra = timed(t, True)
            sb, rb = timed(t, False)
            if ra != rb:
                raise AssertionError(f"task {t}: the two paths gave different rows or order")
            a.append(sa), b.append(sb)
            print(f"{t} {i + 1}/{repeats}: materialized {sa:.2f} s, Ray Data sort {sb:.2f} s", flush=True)
        rows[t] = {"rows": len(ra), "parquet_bytes": p.nbytes("train"),
                   "path": "in-driver" if p.nbytes("train") <= SMALL_SPLIT_BYTES else "ray-data",
                   "materialized_s": a, "ray_data_sort_s": b, "ratio": median(b) / median(a)}
    total_a = sum(median(r["materialized_s"]) for r in rows.values())
    total_b = sum(median(r["ray_data_sort_s"]) for r in rows.values())
    result = {"benchmark": "train_data", "command": command, "machine": machine(), "repeats": repeats,
              "small_split_bytes": SMALL_SPLIT_BYTES, "tasks": rows,
              "total_materialized_s": total_a, "total_ray_data_sort_s": total_b, "ratio": total_b / total_a}
    md = header("training data hand-over (per task, before Ray Train starts)", command, result["machine"]) + [
        f"Median of {repeats} alternating repetitions after a warm-up of each side; Ray already running; the same "
        "rows in the same order checked on every repetition. *in-driver*: the split is at most "
        f"{SMALL_SPLIT_BYTES // 2**20} MiB of Parquet, ordered with pyarrow and handed over with `from_arrow`.", "",
        "| task | rows | Parquet KiB | `materialized` path | `materialized` s | Ray Data sort s | speed-up |",
        "|---|---:|---:|---|---:|---:|---:|"]
    md += [f"| {t} | {r['rows']:,} | {r['parquet_bytes'] / 1024:,.0f} | {r['path']} | {median(r['materialized_s']):.2f} | "
           f"{median(r['ray_data_sort_s']):.2f} | {r['ratio']:.1f}× |" for t, r in rows.items()]
    md += [f"| **all** | | | | {total_a:.2f} | {total_b:.2f} | **{result['ratio']:.1f}×** |", ""]
    return result, "\n".join(md)
