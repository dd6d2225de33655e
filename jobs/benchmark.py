"""ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/benchmark.py train --config jobs/configs/default.yaml

Benchmarks that run both sides in one invocation on the same machine and write JSON + Markdown to
tests/bench/results/<name>.{json,md}. They never assert on a number; they report.

    train   tokens/s of the training job (Ray Train + DeepSpeed, as configured) next to a plain
            single-process PyTorch loop over the same model, data, task sequence, global batch and
            steps, with the same total CPU threads. Also the job's wall time.

Run locally: python jobs/benchmark.py train --config jobs/configs/default.yaml [key=value ...]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a working dir without install

from pipeline.config import load_config  # noqa: E402
from pipeline.errors import exits_on_bad_input  # noqa: E402
from pipeline.runtime import init_ray, job_parser  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "tests" / "bench" / "results"


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import torch
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def plain_loop(cfg, prepared, ratios, weights) -> dict:
    """The baseline a user would write: one process, no Ray, no DeepSpeed, same everything else."""
    import numpy as np
    import torch

    from pipeline.model.multitask import Head, build_model
    from pipeline.model.refs import load_tokenizer
    from pipeline.model.summarize import summary_format
    from pipeline.train.loop import lr_lambda, make_batch
    from pipeline.train.mixing import TaskSampler

    torch.set_num_threads(int(cfg.train.num_workers * cfg.train.cpus_per_worker))  # the job's total cores
    torch.manual_seed(cfg.seed)
    specs = cfg.task_specs()
    tokenizer = load_tokenizer(cfg.model.name)
    pad = tokenizer.pad_token_id
    rows = {t: p.dataset("train", limit=cfg.tasks[t].max_rows.get("train"), shuffle_seed=cfg.seed).take_all()
            for t, p in prepared.items()}
    model = build_model(cfg.model.name, [Head(t, s.kind, s.num_labels) for t, s in specs.items()], cfg.train.dropout)
    prompts = {t: summary_format(model.kind, tokenizer, s.prompt) for t, s in specs.items() if s.kind == "summarization"}
    mult = {t: cfg.tasks[t].head_lr_mult or cfg.train.head_lr_mult for t in specs}
    optimizer = torch.optim.AdamW(model.param_groups(cfg.train.lr, cfg.train.weight_decay, mult), lr=cfg.train.lr)
    base = [g["lr"] for g in optimizer.param_groups]
    schedule = lr_lambda(cfg.train.schedule, cfg.train.warmup_steps, cfg.train.steps)
    sampler = TaskSampler(ratios, cfg.seed)
    batch = cfg.train.batch_size * cfg.train.num_workers  # the job's global batch per step
    cursor = {t: 0 for t in rows}
    model.train()
    tokens, warm_tokens, start, warm_start = 0, 0, time.perf_counter(), None
    for step in range(cfg.train.steps):
        if step == 10:
            warm_start, warm_tokens = time.perf_counter(), tokens
        task = sampler.next()
        picked = [rows[task][(cursor[task] + i) % len(rows[task])] for i in range(batch)]
        cursor[task] += batch
        b = make_batch({k: np.array([r[k] for r in picked], dtype=object if k != "label" else None)
                        for k in ("input_ids", "token_type_ids", "label", "target_ids") if picked[0].get(k) is not None},
                       pad, prompts.get(task))
        for g, lr in zip(optimizer.param_groups, base):
            g["lr"] = lr * schedule(step)
        _, loss = model(task, b["input_ids"], b["attention_mask"], b.get("token_type_ids"), labels=b["labels"])
        (weights[task] * loss).backward()
        if cfg.train.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum())
    end = time.perf_counter()
    return {"tokens_per_s": (tokens - warm_tokens) / (end - warm_start), "wall_s": end - start,
            "steps": cfg.train.steps, "global_batch": batch, "threads": torch.get_num_threads()}


def bench_train(cfg, command: str) -> dict:
    import torch  # noqa: F401

    from pipeline.data.preprocess import prepare_tasks
    from pipeline.train.mixing import normalise_weights, sampling_ratios

    prepared = prepare_tasks(cfg, log=lambda _: None)
    rows = {t: min(p.rows("train"), cfg.tasks[t].max_rows.get("train", p.rows("train"))) for t, p in prepared.items()}
    ratios = sampling_ratios(cfg.sampling.strategy, rows, {t: cfg.tasks[t].ratio for t in rows}, cfg.sampling.temperature)
    weights = normalise_weights({t: cfg.tasks[t].weight for t in rows})
    print("plain single-process PyTorch loop ...", flush=True)
    plain = plain_loop(cfg, prepared, ratios, weights)
    print(f"  {plain['tokens_per_s']:.0f} tokens/s", flush=True)

    print("training job (Ray Train + DeepSpeed) ...", flush=True)
    init_ray()
    from mlflow.tracking import MlflowClient

    from pipeline.train.driver import train_driver
    result = train_driver(cfg, log=lambda _: None)
    history = MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "tokens_per_s")
    windows = [m.value for m in sorted(history, key=lambda m: m.step)][1:]  # the first window holds start-up
    job = {"tokens_per_s": statistics.median(windows), "tokens_per_s_windows": windows,
           "wall_s": result.wall_seconds, "steps": result.steps, "run_id": result.run_id,
           "workers": cfg.train.num_workers, "zero_stage": cfg.train.zero_stage,
           "dev_metrics": result.dev_metrics, "best_score": result.best_score}
    return {"benchmark": "train", "command": command, "machine": machine(), "model": cfg.model.name,
            "tasks": list(prepared), "plain": plain, "job": job,
            "ratio_job_over_plain": job["tokens_per_s"] / plain["tokens_per_s"]}


def markdown(r: dict) -> str:
    p, j = r["plain"], r["job"]
    return "\n".join([
        f"# Benchmark: {r['benchmark']}", "", f"Command: `{r['command']}`", "",
        f"Machine: {r['machine']['cpus']} CPUs ({r['machine']['cpu']}), {r['machine']['memory_gb']} GiB, "
        f"torch {r['machine']['torch']}.", f"Model `{r['model']}`, tasks {', '.join(r['tasks'])}.", "",
        "| side | tokens/s (median window) | wall time | steps | notes |", "|---|---:|---:|---:|---|",
        f"| plain PyTorch, 1 process, {p['threads']} threads | {p['tokens_per_s']:,.0f} | {p['wall_s']:.0f} s | "
        f"{p['steps']} | global batch {p['global_batch']}, no evaluation |",
        f"| training job, {j['workers']} Ray workers, ZeRO-{j['zero_stage']} | {j['tokens_per_s']:,.0f} | "
        f"{j['wall_s']:.0f} s | {j['steps']} | wall time includes start-up, preprocessing cache, evaluation, "
        f"checkpoints; tokens/s excludes evaluation and checkpoints |",
        "", f"Ratio job / plain: **{r['ratio_job_over_plain']:.2f}×**", ""])


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, command=["train"])
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: %(default)s)")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    command = "python jobs/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = bench_train(cfg, command)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
