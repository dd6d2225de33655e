"""The training job's loop without Ray: the third side of the training benchmark.

`torchrun` starts one process per worker (gloo on CPU, NCCL on GPUs, as the job); each builds the job's own
DeepSpeed engine (`pipeline.train.loop.build_engine`), draws the job's task sequence (`TaskSampler` over the
same mixture and seed) and runs the job's `train_step` and `Window` (and, with `train.profile`, its
`Profiler`) on its 1/world share of the same cached rows, held in memory in the job's `TableShard` (as the
job's workers hold a small split, `train.ingest: auto`) and reshuffled every epoch with the job's seeds. No
Ray Train, no Ray Data, no MLflow, no evaluation or checkpoints: the job's tokens/s over this side's is Ray's
cost alone; this side over the plain single-process loop is DeepSpeed's and
data parallelism's.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m pipeline.benchmarks.torchrun_side IN.pkl OUT.json

`launch()` writes IN.pkl (the typed config, the prepared tasks' cache folders, the mixture) and runs that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def launch(cfg, prepared: dict, weights: dict[str, float], *, timeout: float = 3600) -> dict[str, Any]:
    """Run this side with cfg.train.num_workers processes; returns rank 0's measurements. The processes get
    the config and the cached tasks as JSON (no pickles between processes) and rebuild the mixture."""
    import socket

    from pipeline.config import config_to_dict
    from pipeline.runtime import malloc_env
    with tempfile.TemporaryDirectory(prefix="bench-torchrun-") as tmp:
        job = Path(tmp) / "in.json"
        out = Path(tmp) / "out.json"
        job.write_text(json.dumps({
            "config": config_to_dict(cfg), "weights": weights,
            "tasks": {n: {"path": str(p.path), "manifest": p.manifest, "cache_hit": p.cache_hit} for n, p in prepared.items()}}))
        with socket.socket() as s:  # a free port for the rendezvous, on 127.0.0.1 only
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, **malloc_env(), "OMP_NUM_THREADS": str(max(1, int(cfg.train.cpus_per_worker))),
               "DS_ACCELERATOR": "cuda" if cfg.train.use_gpu else "cpu"}
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.train.num_workers}",
               "--nnodes=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "-m", "pipeline.benchmarks.torchrun_side", str(job), str(out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=Path(__file__).resolve().parents[2])
        if done.returncode != 0:
            raise RuntimeError(f"torchrun side failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(out.read_text())


def main(job_path: str, out_path: str) -> None:
    import time

    import deepspeed
    import torch
    import torch.distributed as dist

    from pipeline.model.multitask import Head
    from pipeline.model.refs import load_tokenizer
    from pipeline.model.summarize import summary_format
    from pipeline.runtime import keep_freed_memory, quiet_libraries
    from pipeline.train.loop import (TableShard, WorkerJob, batches_forever, build_engine, clear_stale_grads, lr_lambda, mean_over_ranks,
                                     set_clip, skip_inference_comm_op, train_step)
    from pipeline.train.mixing import TaskSampler
    from pipeline.train.window import Profiler, Window

    from pipeline.config import Config
    from pipeline.data.preprocess import PreparedTask, rank_part
    from pipeline.train.driver import mixture, rows_used, train_split_args

    given = json.loads(Path(job_path).read_text())
    cfg = Config.model_validate(given["config"])
    train, specs = cfg.train, cfg.task_specs()
    prepared = {n: PreparedTask(n, specs[n], Path(t["path"]), t["manifest"], t["cache_hit"]) for n, t in given["tasks"].items()}
    quiet_libraries()
    keep_freed_memory()  # the job's worker does the same first thing
    skip_inference_comm_op()  # before init_distributed, which would build it (the job's process group comes from Ray Train)
    deepspeed.init_distributed(dist_backend="nccl" if train.use_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    job = WorkerJob(config=cfg, tasks=tuple(prepared), weights=given["weights"],
                    mixture=mixture(cfg, rows_used(cfg, prepared)),
                    heads=tuple(Head(t, s.kind, s.num_labels) for t, s in specs.items()), run_id=None,
                    tracking_uri="", run_dir="", dev={}, meta={})
    tokenizer = load_tokenizer(cfg.model.name)
    model, engine, optimizer, weighting, _ = build_engine(cfg, job, world)
    prompts = {t: summary_format(model.kind, tokenizer, s.prompt) for t, s in specs.items() if s.kind == "summarization"}
    tables = {t: p.table("train", **train_split_args(cfg, t, p)) for t, p in prepared.items()}
    # the rows the job's worker of this rank trains on (PreparedTask.worker_parts), in memory whatever their size
    shards = {t: TableShard(rank_part(table, rank, world)) for t, table in tables.items()}
    iters = {t: batches_forever(shards[t], train.batch_size, tokenizer.pad_token_id, cfg.seed + rank, prompts.get(t))
             for t in job.tasks}
    profiler = Profiler(engine, iters) if train.profile else None
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    schedule = lr_lambda(train.schedule, train.warmup_steps, train.steps)
    sampler = TaskSampler(job.mixture, cfg.seed)
    engine.train()
    start = time.perf_counter()
    window, windows = Window(list(job.tasks), profiler), []
    for step in range(1, train.steps + 1):  # the job's Worker.step, without its Ray-side bookkeeping
        task = sampler.next()
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * schedule(step - 1)
        if train.clip_grad > 0:
            set_clip(engine, optimizer, train.clip_grad * weighting.grad_scale(task))
        losses, tokens, samples = train_step(engine, iters[task], task, weighting, train.grad_accum)
        if train.zero_stage == 3:
            clear_stale_grads(optimizer)
        window.add(task, losses, tokens, samples)
        if weighting.needs_losses or sampler.mixture.needs_losses:
            loss = mean_over_ranks(losses, world)
            weighting.observe_loss(task, loss, step)
            sampler.mixture.observe(task, loss)
        if step % train.log_every == 0 or step == train.steps:
            windows.append(window.metrics(weighting, sampler, optimizer.param_groups[0]["lr"]))
            window = Window(list(job.tasks), profiler)
    if rank == 0:
        Path(out_path).write_text(json.dumps({"windows": windows, "wall_s": time.perf_counter() - start,
                                              "task_steps": dict(sampler.counts), "world": world}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
