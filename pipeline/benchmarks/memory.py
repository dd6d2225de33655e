"""Memory per worker: 2 workers, a ~135M-parameter model (SmolLM2-135M), ZeRO 0/1/2/3 and ZeRO-2 with the
optimizer offloaded. For each: (a) the model-state bytes each rank actually holds — parameters, gradients
and optimizer state summed from the tensors the engine keeps (pipeline/train/memory.py), measured after
the backward of the third step, when gradients and optimizer state both exist — next to the ZeRO paper's
formula for the same precision; (b) each worker's peak RSS (everything: Python, libraries, activations).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.benchmarks import header, machine

VARIANTS = [  # (label, zero stage, optimizer offload)
    ("ZeRO-0", 0, False), ("ZeRO-1", 1, False), ("ZeRO-2", 2, False), ("ZeRO-3", 3, False),
    ("ZeRO-2 + optimizer offload", 2, True),
]
GB = 2**30


def run(command: str, *, model: str = "smollm2-135m", precision: str = "fp32", steps: int = 4,
        variants=VARIANTS) -> tuple[dict[str, Any], str]:
    from pipeline.config import load_config
    from pipeline.runtime import init_ray
    from pipeline.tracking import run_metrics
    from pipeline.train.driver import train_driver
    from pipeline.train.memory import zero_formula

    init_ray()
    rows = []
    for label, stage, offload in variants:
        tmp = Path(tempfile.mkdtemp(prefix="bench-mem-"))
        try:
            cfg = load_config(None, [
                "name=bench-memory", f"model.name={model}", "model.max_length=32",
                "tasks={rotten_tomatoes: {max_rows: {train: 64, validation: 8}}}",
                "train.num_workers=2", "train.cpus_per_worker=1", "train.batch_size=2", f"train.steps={steps}",
                f"train.log_every={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
                "train.warmup_steps=0", f"train.zero_stage={stage}", f"train.offload_optimizer={str(offload).lower()}",
                f"train.precision={precision}", f"train.storage_path={tmp / 'runs'}",
                f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"])
            print(f"{label}: training {steps} steps of {model} on 2 workers ...", flush=True)
            result = train_driver(cfg, log=lambda _: None)
            metrics = run_metrics(result.tracking_uri, result.run_id)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        psi = int(metrics["memory/psi"])
        ranks = [{k: metrics[f"memory/rank{r}/{k}"] for k in ("parameters", "gradients", "optimizer", "total", "peak_rss")}
                 for r in range(2)]
        formula = zero_formula(psi, 2, stage, precision)
        rows.append({"variant": label, "zero_stage": stage, "offload": offload, "psi": psi, "ranks": ranks,
                     "formula": formula})
        print(f"  rank 0 model states {ranks[0]['total'] / GB:.2f} GiB (formula {formula['total'] / GB:.2f}), "
              f"peak RSS {ranks[0]['peak_rss'] / GB:.2f} GiB", flush=True)
    base = rows[0]["ranks"][0]["total"]
    result = {"benchmark": "memory", "command": command, "machine": machine(), "model": model, "precision": precision,
              "world": 2, "rows": rows,
              "zero3_over_zero0": next(r for r in rows if r["variant"] == "ZeRO-3")["ranks"][0]["total"] / base}
    return result, markdown(result)


def markdown(r: dict) -> str:
    psi = r["rows"][0]["psi"]
    per = "2Ψ + 2Ψ + 12Ψ" if r["precision"] in ("bf16", "fp16") else "4Ψ + 4Ψ + 8Ψ"
    md = header("memory per worker", r["command"], r["machine"]) + [
        f"`{r['model']}` (Ψ = {psi:,} parameters), {r['precision']}, Adam, 2 workers. Model states = bytes of the "
        f"tensors each rank holds, counted once per storage, after the third step's backward. Formula: ZeRO paper "
        f"({per} = parameters + gradients + optimizer at ZeRO-0; stage 1 divides the optimizer state by N, stage 2 "
        "also gradients, stage 3 also parameters). GiB = 2^30 bytes.", "",
        "| variant | rank | parameters | gradients | optimizer | model states | formula | measured / formula | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        f = row["formula"]
        for i, rk in enumerate(row["ranks"]):
            md.append(f"| {row['variant']} | {i} | {rk['parameters'] / GB:.3f} | {rk['gradients'] / GB:.3f} | "
                      f"{rk['optimizer'] / GB:.3f} | **{rk['total'] / GB:.3f}** | {f['total'] / GB:.3f} | "
                      f"{rk['total'] / f['total']:.2f} | {rk['peak_rss'] / GB:.2f} |")
    md += ["", f"ZeRO-3 / ZeRO-0 model states (rank 0): **{r['zero3_over_zero0']:.2f}×**", ""]
    return "\n".join(md)
