"""Training throughput: the training job (Ray Train + DeepSpeed) at 1 and 2 workers and ZeRO 0–3, next
to a plain single-process PyTorch loop over the same model, data, task sequence, global batch and steps,
with the same total cores (the job's workers × CPUs per worker = the plain loop's threads).

Tokens/s is the median over the measurement windows (`train.log_every` steps each; the first window,
which holds warm-up, is dropped). Evaluation and checkpoints are excluded from tokens/s on the job side
(the loop pauses its clock) and absent on the plain side; start-up (worker group, engine, data) is
reported separately. The job runs with `train.profile=true`: per-window time in data wait, forward,
backward, optimizer step, communication (DeepSpeed's comms logger) and the rest (logging, reporting).
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.benchmarks import WORKER_GROUP_TEXT, cost_label, header, machine, median

PHASES = ("data", "forward", "backward", "step", "other")  # add up to the window; comm is inside backward/step


def plain_loop(cfg, prepared, ratios, weights) -> dict[str, Any]:
    """The baseline a user would write: one process, no Ray, no DeepSpeed, same everything else."""
    import numpy as np
    import torch

    from pipeline.model.multitask import Head, build_model
    from pipeline.model.refs import load_tokenizer
    from pipeline.model.summarize import summary_format
    from pipeline.train.loop import adamw, lr_lambda, make_batch
    from pipeline.train.window import cpu_seconds
    from pipeline.train.mixing import TaskSampler

    threads = max(1, int(cfg.train.num_workers * cfg.train.cpus_per_worker))
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    specs = cfg.task_specs()
    tokenizer = load_tokenizer(cfg.model.name)
    rows = {t: p.table("train", limit=cfg.tasks[t].max_rows.get("train"), shuffle_seed=cfg.seed).to_pylist()
            for t, p in prepared.items()}
    model = build_model(cfg.model.name, [Head(t, s.kind, s.num_labels) for t, s in specs.items()], cfg.train.dropout)
    prompts = {t: summary_format(model.kind, tokenizer, s.prompt) for t, s in specs.items() if s.kind == "summarization"}
    mult = {t: cfg.tasks[t].head_lr_mult or cfg.train.head_lr_mult for t in specs}
    optimizer = adamw(model.param_groups(cfg.train.lr, cfg.train.weight_decay, mult), cfg.train)
    base = [g["lr"] for g in optimizer.param_groups]
    schedule = lr_lambda(cfg.train.schedule, cfg.train.warmup_steps, cfg.train.steps)
    sampler = TaskSampler(ratios, cfg.seed)
    batch = cfg.train.batch_size * cfg.train.num_workers  # the job's global batch per step
    cursor = {t: 0 for t in rows}
    model.train()
    every = cfg.train.log_every
    start = time.perf_counter()
    marks = [(start, cpu_seconds(), 0)]  # (wall, CPU, tokens so far) at each window's end, the start first
    phases = dict.fromkeys(PHASES[:-1], 0.0)  # over the windows after the first, as on the job side
    tokens = 0
    for step in range(cfg.train.steps):
        ta = time.perf_counter()
        task = sampler.next()
        picked = [rows[task][(cursor[task] + i) % len(rows[task])] for i in range(batch)]
        cursor[task] += batch
        b = make_batch({k: np.array([r[k] for r in picked], dtype=object if k != "label" else None)
                        for k in ("input_ids", "token_type_ids", "label", "target_ids") if picked[0].get(k) is not None},
                       tokenizer.pad_token_id, prompts.get(task))
        for g, lr in zip(optimizer.param_groups, base):
            g["lr"] = lr * schedule(step)
        tb = time.perf_counter()
        _, loss = model(task, b["input_ids"], b["attention_mask"], b.get("token_type_ids"), labels=b["labels"])
        tc = time.perf_counter()
        (weights[task] * loss).backward()
        td = time.perf_counter()
        if cfg.train.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad * weights[task])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        te = time.perf_counter()
        tokens += int(b["attention_mask"].sum())
        if step >= every:
            for phase, seconds in zip(PHASES, (tb - ta, tc - tb, td - tc, te - td)):
                phases[phase] += seconds
        if (step + 1) % every == 0:
            marks.append((time.perf_counter(), cpu_seconds(), tokens))
    kept = [(t1 - t0) / (w1 - w0) for (w0, _, t0), (w1, _, t1) in zip(marks[1:], marks[2:])]
    (wall0, cpu0, tokens0), (wall1, cpu1, tokens1) = marks[1], marks[-1]  # the kept windows, end to end
    config = model.backbone.config
    embedding = model.backbone.get_input_embeddings().weight.numel()
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    seq = sum(len(r["input_ids"]) for rs in rows.values() for r in rs) / sum(len(rs) for rs in rows.values())
    flops_token = 6.0 * non_embedding + 12.0 * config.num_hidden_layers * config.hidden_size * seq
    return {"tokens_per_s": median(kept), "windows": kept, "wall_s": time.perf_counter() - start,
            "phases_s": phases, "measured_tokens": tokens1 - tokens0, "cpu_use": (cpu1 - cpu0) / ((wall1 - wall0) * threads),
            "threads": threads, "global_batch": batch, "flops_per_token": flops_token, "mean_tokens_per_row": seq}


def torchrun_side(cfg, prepared, weights) -> dict[str, Any]:
    """The job's loop launched by torchrun, without Ray (pipeline/benchmarks/torchrun_side.py)."""
    from pipeline.benchmarks.torchrun_side import launch
    out = launch(cfg, prepared, weights)
    windows = out["windows"][1:]  # the first window holds warm-up, as on the job side
    rates = [w["tokens_per_s"] for w in windows]
    phases = {p: sum(w.get(f"time/{p}", 0.0) for w in windows) for p in PHASES + ("comm",)}
    measured = sum(w.get("time/window", 0.0) for w in windows)
    tokens = sum(w["tokens_per_s"] * w.get("time/window", 0.0) for w in windows)
    cpu = sum(w.get("time/cpu", 0.0) for w in windows)
    return {"tokens_per_s": median(rates), "windows": rates, "wall_s": out["wall_s"], "phases_s": phases,
            "measured_s": measured, "measured_tokens": tokens, "task_steps": out["task_steps"],
            "cpu_use": cpu / (measured * cfg.train.cpus_per_worker) if measured else None}


def job_side(cfg) -> dict[str, Any]:
    """One run of the job; its run folder (checkpoint, best and final model: hundreds of MB) is removed once
    its numbers are read, so repeated benchmark runs do not fill `train.storage_path`."""
    from pipeline import storage
    from pipeline.train.driver import train_driver
    result = train_driver(cfg, log=lambda _: None)
    try:
        return _job_numbers(cfg, result)
    finally:
        storage.remove_dir(result.run_dir)


def _job_numbers(cfg, result) -> dict[str, Any]:
    from pipeline.tracking import metric_history, run_metrics

    def series(key: str) -> list[float]:
        return [v for _, v in metric_history(result.tracking_uri, result.run_id, key)]

    rates = series("tokens_per_s")[1:]  # the first window holds warm-up
    phases = {p: sum(series(f"time/{p}")[1:]) for p in PHASES + ("comm",)}
    windows = series("time/window")
    train_s = sum(windows[1:])
    tokens = sum(r * w for r, w in zip(rates, windows[1:]))  # the group's tokens in the kept windows
    cpu = sum(series("time/cpu")[1:])  # rank 0's process, over the same windows
    startup = result.wall_seconds - sum(windows) - sum(series("time/paused"))
    metrics = run_metrics(result.tracking_uri, result.run_id)
    memory = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("memory/")}
    phases_startup = {k: v for k, v in metrics.items() if k.startswith(("startup/", "end/"))}
    return {"tokens_per_s": median(rates), "windows": rates, "wall_s": result.wall_seconds, "run": result.run_name,
            "task_steps": result.task_steps,
            "startup_s": startup, "startup_phases_s": phases_startup, "first_window_s": windows[0] if windows else None,
            "phases_s": phases, "measured_s": train_s, "measured_tokens": tokens, "memory": memory,
            "cpu_use": cpu / (train_s * cfg.train.cpus_per_worker) if train_s else None}


def _mfu(flops_token: float, tokens_per_s: float, gpus: int) -> float | None:
    """Model FLOPs utilisation on the GPU this runs on (None when its peak is unknown)."""
    import torch

    from pipeline.benchmarks.gpu_plan import mfu
    return mfu(flops_token, tokens_per_s, torch.cuda.get_device_name(0), gpus)


RATIOS = ("ratio", "ray_ratio", "deepspeed_ratio")


def ms_per_k_tokens(side: dict) -> dict[str, float]:
    """A side's phase times (`phases_s`, over its measured windows) as wall-clock ms per 1,000 tokens."""
    return {p: 1000 * 1000 * side["phases_s"].get(p, 0.0) / side["measured_tokens"] for p in PHASES + ("comm",)}


def workload(cfg) -> tuple[dict, dict[str, float], dict[str, float]]:
    """What every side trains on, as the job computes it: (prepared tasks, sampling ratios, loss weights)."""
    from pipeline.data.preprocess import prepare_tasks
    from pipeline.train.driver import rows_used
    from pipeline.train.mixing import normalise_weights, sampling_ratios

    prepared = prepare_tasks(cfg, log=lambda _: None)
    rows = rows_used(cfg, prepared)
    ratios = sampling_ratios(cfg.sampling.strategy, rows, {t: cfg.tasks[t].ratio for t in rows}, cfg.sampling.temperature)
    return prepared, ratios, normalise_weights({t: cfg.tasks[t].weight for t in rows})


def per_process(cfg, processes: int, total_cpus: float = 2.0):
    """`cfg` for `processes` workers sharing `total_cpus` cores: the config's global batch (batch_size ×
    num_workers) split evenly over them, profiling on — the same work at every world size."""
    global_batch = cfg.train.batch_size * cfg.train.num_workers
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "num_workers": processes, "cpus_per_worker": total_cpus / processes, "batch_size": global_batch // processes,
        "profile": True})})


def run(cfg, command: str, *, stages=(0, 1, 2, 3), workers=(1, 2), total_cpus: float = 2.0,
        repeats: int = 1) -> tuple[dict, str]:
    """Every (workers, stage) row: plain loop, torchrun side, job, back to back, `repeats` times. A row's ratios
    are the median over its repeats (each repeat's job against the plain and torchrun runs right before it),
    with their range; its sides' numbers and phases are those of the repeat with the median Ray share."""
    from pipeline.runtime import init_ray

    import ray

    init_ray()
    nodes = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]]  # the job side's cluster
    prepared, ratios, weights = workload(cfg)
    global_batch = cfg.train.batch_size * cfg.train.num_workers
    sides = []
    for n in workers:
        per_worker = per_process(cfg, n, total_cpus)
        for stage in stages:
            c = per_worker.model_copy(update={"train": per_worker.train.model_copy(update={"zero_stage": stage})})
            reps = []
            for rep in range(repeats):
                of = f" (repeat {rep + 1}/{repeats})" if repeats > 1 else ""
                # The plain loop runs right before each job side, so drift on a shared machine hits both alike.
                print(f"plain PyTorch loop, {int(total_cpus)} threads, global batch {global_batch}{of} ...", flush=True)
                plain = plain_loop(per_worker, prepared, ratios, weights)
                print(f"torchrun + DeepSpeed: {n} process(es) × {total_cpus / n:g} CPU, ZeRO-{stage}{of} ...", flush=True)
                native = torchrun_side(c, prepared, weights)
                print(f"training job: {n} worker(s) × {total_cpus / n:g} CPU, ZeRO-{stage}{of} ...", flush=True)
                job = job_side(c)
                print(f"  {job['tokens_per_s']:,.0f} tokens/s (torchrun {native['tokens_per_s']:,.0f}, "
                      f"plain {plain['tokens_per_s']:,.0f})", flush=True)
                reps.append({"job": job, "plain": plain, "torchrun": native,
                             "ratio": job["tokens_per_s"] / plain["tokens_per_s"],
                             "ray_ratio": job["tokens_per_s"] / native["tokens_per_s"],
                             "deepspeed_ratio": native["tokens_per_s"] / plain["tokens_per_s"]})
            shown = sorted(reps, key=lambda r: r["ray_ratio"])[(len(reps) - 1) // 2]  # the median repeat's sides
            flops = shown["plain"]["flops_per_token"] * shown["job"]["tokens_per_s"]
            sides.append({"workers": n, "zero_stage": stage, **{k: shown[k] for k in ("job", "plain", "torchrun")},
                          **{k: median([r[k] for r in reps]) for k in RATIOS},
                          "range": {k: [min(r[k] for r in reps), max(r[k] for r in reps)] for k in RATIOS},
                          "repeats": [{k: r[k] for k in RATIOS} | {f"{side}_tokens_per_s": r[side]["tokens_per_s"]
                                                                    for side in ("job", "plain", "torchrun")} for r in reps],
                          "model_tflops": flops / 1e12,
                          "mfu": _mfu(shown["plain"]["flops_per_token"], shown["job"]["tokens_per_s"], n) if c.train.use_gpu else None})
    result = {"benchmark": "train", "command": command, "machine": machine(), "model": cfg.model.name,
              "tasks": list(prepared), "steps": cfg.train.steps, "log_every": cfg.train.log_every,
              "global_batch": global_batch, "total_cpus": total_cpus, "repeats": repeats, "ray_nodes_cpus": nodes,
              "placement": cfg.train.placement, "runs": sides}
    return result, markdown(result)


def _cluster(r: dict) -> str:
    """' The job side's Ray cluster: …' when it is not one node with the workers packed."""
    nodes, placement = r.get("ray_nodes_cpus", []), r.get("placement", "PACK")
    if len(nodes) <= 1 and placement == "PACK":
        return ""
    cpus = " + ".join(f"{c:g}" for c in nodes)
    return (f" The job side's Ray cluster: {len(nodes)} node(s) ({cpus} CPUs; on one machine they share its cores), "
            f"workers placed {placement}; the torchrun and plain sides run on the driver's machine as always.")


def _spread(row: dict, key: str) -> str:
    """ ' (min–max)' of a ratio over the row's repeats; nothing for one run."""
    low, high = row.get("range", {}).get(key, (None, None))
    return f" ({low:.2f}–{high:.2f})" if len(row.get("repeats", ())) > 1 else ""


def markdown(r: dict) -> str:
    plain = r["runs"][0]["plain"]
    plains = ([x["plain_tokens_per_s"] for s in r["runs"] for x in s.get("repeats", [])]  # every repeat's plain run
              or [s["plain"]["tokens_per_s"] for s in r["runs"]])
    md = header("training throughput", r["command"], r["machine"]) + [
        f"Model `{r['model']}`, tasks {', '.join(r['tasks'])}; {r['steps']} steps, global batch {r['global_batch']}, "
        f"{r['total_cpus']:g} cores on each side.{_cluster(r)} Tokens/s: median of the {r['log_every']}-step windows after the first. "
        f"The plain PyTorch loop (1 process, {plain['threads']} threads, same model/data/task order/batch/steps) runs "
        f"right before each job side and each ratio is to that run: {len(plains)} runs, median "
        f"**{median(plains):,.0f} tokens/s** (range {min(plains):,.0f}–{max(plains):,.0f}: the machine's noise).", "",
        f"Model FLOPs per token (6 × non-embedding parameters + attention, PaLM's MFU definition): "
        f"{plain['flops_per_token']:.3g} at {plain['mean_tokens_per_row']:.0f} tokens per row; MFU is reported when "
        "the job trains on GPUs (on CPU the achieved model TFLOP/s is shown).", "",
        "Three sides per row, run back to back: the job (Ray Train + Ray Data + DeepSpeed), the same loop launched by "
        "`torchrun` with the same DeepSpeed engine, world size, batch, task sequence and rows but no Ray "
        "(pipeline/benchmarks/torchrun_side.py), and the plain single-process loop. job / torchrun is Ray's cost "
        "(Ray's own claim for Ray Train: within 2.5% of native, i.e. ≥ 0.975); torchrun / plain is DeepSpeed's and "
        "data parallelism's; their product is job / plain." + (
            f" Each row ran {r['repeats']} times back to back: the ratios are medians over the repeats, (min–max) "
            "their range; tokens/s and the phase tables are the repeat with the median Ray share."
            if r.get("repeats", 1) > 1 else " One run per row: a ratio's noise is at least the plain runs' range above."), "",
        "| workers | ZeRO | tokens/s | torchrun tokens/s | plain tokens/s | job / torchrun (Ray) | torchrun / plain "
        "(DeepSpeed + DP) | job / plain | model TFLOP/s | MFU | start-up + end s | data | forward | backward "
        "| step | other | comm (within backward + step) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in r["runs"]:
        j = s["job"]
        total = j["measured_s"] or 1.0
        pct = " | ".join(f"{100 * j['phases_s'].get(p, 0) / total:.0f}%" for p in PHASES + ("comm",))
        startup = f"{j['startup_s']:.0f}" if j.get("startup_s") is not None else "—"
        mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "n/a (CPU)"
        native = s.get("torchrun")
        three = (f"{native['tokens_per_s']:,.0f} | {s['plain']['tokens_per_s']:,.0f} | **{s['ray_ratio']:.2f}×**{_spread(s, 'ray_ratio')} | "
                 f"{s['deepspeed_ratio']:.2f}×{_spread(s, 'deepspeed_ratio')} | " if native else f"— | {s['plain']['tokens_per_s']:,.0f} | — | — | ")
        md.append(f"| {s['workers']} | {s['zero_stage']} | {j['tokens_per_s']:,.0f} | {three}"
                  f"**{s['ratio']:.2f}×**{_spread(s, 'ratio')} | "
                  f"{s['model_tflops']:.4f} | {mfu} | {startup} | {pct} |")
    md += ["", "Where the time goes, in wall-clock ms per 1,000 tokens of the global batch (rank 0's clock on the job "
           "side; the plain loop's optimizer step includes gradient clipping and zero_grad, as the job's does):", "",
           "| side | data | forward | backward | step | other | comm | total | CPU use |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    use = lambda side: f"{100 * side['cpu_use']:.0f}%" if side.get("cpu_use") else "—"  # noqa: E731
    per_k = lambda seconds, tokens: f"{1000 * 1000 * seconds / tokens:.0f}" if tokens else "—"  # noqa: E731
    for s in r["runs"]:
        j, p = s["job"], s["plain"]
        if p.get("measured_tokens"):
            ph = p["phases_s"]
            md.append(f"| plain PyTorch (run before the next row) | "
                      f"{' | '.join(per_k(ph.get(k, 0.0), p['measured_tokens']) for k in PHASES[:-1])} "
                      f"| — | — | {per_k(sum(ph.values()), p['measured_tokens'])} | {use(p)} |")
        t = s.get("torchrun")
        if t and t.get("measured_tokens"):
            cells = " | ".join(per_k(t["phases_s"].get(k, 0.0), t["measured_tokens"]) for k in PHASES + ("comm",))
            md.append(f"| torchrun + DeepSpeed, {s['workers']} process(es), ZeRO-{s['zero_stage']} | {cells} | "
                      f"{per_k(t['measured_s'], t['measured_tokens'])} | {use(t)} |")
        if j.get("measured_tokens"):
            cells = " | ".join(per_k(j["phases_s"].get(k, 0.0), j["measured_tokens"]) for k in PHASES + ("comm",))
            md.append(f"| job, {s['workers']} worker(s), ZeRO-{s['zero_stage']} | {cells} | "
                      f"{per_k(j['measured_s'], j['measured_tokens'])} | {use(j)} |")
    from pipeline.train.loop import FIXED_COSTS, WORKER_GROUP_PARTS
    keys = (FIXED_COSTS[0], *WORKER_GROUP_PARTS, *FIXED_COSTS[2:])  # the worker group shown by its parts
    if any(s["job"].get("startup_phases_s") for s in r["runs"]):
        md += ["", f"The job's fixed cost by phase, seconds (rank 0's clock; the worker group = worker process + imports "
               f"+ backend — {WORKER_GROUP_TEXT}):", "",
               "| workers | ZeRO | " + " | ".join(cost_label(k) for k in keys) + " |", "|---:|---:|" + "---:|" * len(keys)]
        for s in r["runs"]:
            ph = s["job"].get("startup_phases_s") or {}
            md.append(f"| {s['workers']} | {s['zero_stage']} | "
                      + " | ".join(f"{ph[k]:.1f}" if k in ph else "—" for k in keys) + " |")
    md += ["", "CPU use: CPU time of the training process (rank 0 on the job side) over wall time × the cores it was "
           "given, in the same windows — below 100% when other processes (Ray's daemons and Ray Train's helper actors "
           "on the job side, Ray's daemons on both) take a share of the machine.", "",
           "Phase shares are of the measured training time (windows after the first): data = waiting for the "
           "next batch; other = logging, loss bookkeeping, reporting and (with sparse embedding gradients) making them "
           "dense again; comm = time inside DeepSpeed's collectives "
           "(comms logger), already part of backward and step. Start-up + end = the job's wall time minus training "
           "windows and evaluation/checkpoint pauses: driver data prep, worker group and engine start, final model.", ""]
    return "\n".join(md)
