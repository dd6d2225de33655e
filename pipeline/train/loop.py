"""The training loop that runs on every Ray Train worker: one function, top to bottom.

    shard -> model -> deepspeed.initialize -> (resume) -> loop: sample task, step, log, eval, checkpoint

Every rank draws the same task at every step (same seeded sampler), so collectives line up. Each
step is one task's batch (task-homogeneous); gradient accumulation accumulates micro-batches of that
task. Loss = weight of the task × the task's loss, so over many steps the objective is
Σ_t w_t · p_t · L_t with p_t the sampling ratio. The weights are static or move during training
(`train.weighting`, pipeline/train/weighting.py); the loop feeds them identical numbers on every rank:
the step's loss averaged over ranks, and the shared group's reduced gradient. Only rank 0 talks to MLflow.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.eval.predict import batch_plan, predict_batch
from pipeline.model.multitask import Head, build_model
from pipeline.model.refs import load_tokenizer
from pipeline.model.summarize import PromptFormat, Seq2SeqFormat, pad, summary_format
from pipeline.train.checkpoints import choose, dir_name, write_manifest
from pipeline.train.memory import model_state_bytes, peak_rss_bytes
from pipeline.train.mixing import TaskSampler
from pipeline.train.tracking import RunLogger
from pipeline.train.weighting import make_weighting

DS_TAG = "ds"


def say(line: str) -> None:
    """Progress line from rank 0. Written directly: Ray Train's patched print() would emit it twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def shout(line: str) -> None:
    """A warning that must not scroll by unnoticed (stderr, set apart)."""
    sys.stderr.write(f"\n!!! {line}\n\n")
    sys.stderr.flush()


def collate(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of variable-length token lists (dynamic padding)."""
    input_ids, attention_mask = pad([list(x) for x in batch["input_ids"]], pad_id)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "token_type_ids" in batch:
        out["token_type_ids"], _ = pad([list(x) for x in batch["token_type_ids"]], 0)
    if "label" in batch:
        out["labels"] = torch.as_tensor(np.asarray(batch["label"], dtype=np.float32))
    return out


def make_batch(batch: dict[str, np.ndarray], pad_id: int, prompt: PromptFormat | Seq2SeqFormat | None) -> dict[str, torch.Tensor]:
    """Classification/regression: padded token ids and labels. Summarization: prompt + summary, with
    labels on the summary tokens only."""
    if prompt is None:
        return collate(batch, pad_id)
    return prompt.training_batch([list(x) for x in batch["input_ids"]], [list(x) for x in batch["target_ids"]])


def batches_forever(shard, batch_size: int, pad_id: int, seed: int,
                    prompt: PromptFormat | Seq2SeqFormat | None = None, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless task-homogeneous batches from this worker's shard; reshuffled every epoch. `skip`
    batches are passed over first: a resumed run continues at the checkpoint's place in the data
    instead of seeing the epoch's first batches again."""
    for epoch in range(1 << 30):
        empty = True
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                        local_shuffle_buffer_size=max(256, 4 * batch_size),
                                        local_shuffle_seed=seed + epoch):
            empty = False
            if skip:
                skip -= 1
                continue
            yield make_batch(batch, pad_id, prompt)
        if empty:
            raise RuntimeError("a task's training shard is empty on this worker: use fewer workers or more rows")


def skip_inference_comm_op() -> None:
    """DeepSpeed builds its CPU shared-memory all-reduce op whenever a CPU engine starts (a JIT compile of
    about 73 s on a fresh machine). Only DeepSpeed-Inference's tensor-parallel `inference_all_reduce` uses
    it; training collectives go through torch.distributed (gloo) either way. Not built."""
    import deepspeed.comm.torch as ds_torch
    ds_torch.build_shm_op = lambda: None


def set_clip(engine, optimizer, value: float) -> None:
    """Set the gradient-clipping threshold DeepSpeed applies at the next step (stage 0 reads the
    engine's config; the ZeRO, bf16 and fp16 optimizers keep their own copy)."""
    engine._config.gradient_clipping = value
    if hasattr(optimizer, "clip_grad"):
        optimizer.clip_grad = value


def skip_single_rank_allreduce(engine, world: int, stage: int) -> None:
    """With one rank, ZeRO-0's gradient "all-reduce" still flattens every gradient into one buffer,
    reduces it with itself and copies it back — a full pass over the gradients for an identical result
    (measured on MiniLM, one process, side by side: backward 12% slower than plain PyTorch's with it,
    1% without). Skipped; ZeRO 1-3 move gradients into their partitions on the same path, so they keep it."""
    if world == 1 and stage == 0:
        engine.enable_backward_allreduce = False


def clear_stale_grads(optimizer) -> None:
    """ZeRO-3 keeps each parameter's reduced gradient in a flat partition buffer that `zero_grad`
    does not clear, and a backward only overwrites the slices of parameters it reached. A step trains
    one task, so without this the other tasks' heads and decoders would be updated again with their
    last (stale) gradient at every step. Zeroing the buffer after the step leaves them untouched."""
    buffer = getattr(optimizer, "grad_partitions_flat_buffer", None)
    if buffer is not None:
        buffer.zero_()


def lr_lambda(schedule: str, warmup: int, total: int):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1.0 - progress) if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return fn


def deepspeed_config(train: dict[str, Any], world_size: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": train["zero_stage"]}
    if train["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if train["zero_stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {
        "train_micro_batch_size_per_gpu": train["batch_size"],
        "gradient_accumulation_steps": train["grad_accum"],
        "train_batch_size": train["batch_size"] * train["grad_accum"] * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": train["precision"] == "bf16"},
        "fp16": {"enabled": train["precision"] == "fp16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if train.get("profile"):  # time inside DeepSpeed's collectives, read back per window (comm_seconds)
        config["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    config["gradient_clipping"] = train["clip_grad"]  # always explicit: DeepSpeed's default is 1.0, not off
    if train["offload_optimizer"]:  # offload refuses a client optimizer: declare it here
        config["optimizer"] = {"type": "AdamW", "params": {"lr": train["lr"], "weight_decay": train["weight_decay"]}}
    return config


_COMM_SEEN: dict[str, float] = {}


def cpu_seconds() -> float:
    """CPU time (user + system, all threads) this process has used: next to the wall clock it shows
    whether training got the cores it was given or shared them with other processes."""
    t = os.times()
    return t.user + t.system


def comm_seconds() -> float:
    """Seconds spent in DeepSpeed's collectives since the last call (its comms logger, `train.profile`).
    The logger records each op's *running total* (its timers are never reset), so the time of a window
    is the growth of each op's latest total."""
    from deepspeed.comm import comms_logger
    if not comms_logger.enabled:
        return 0.0
    total = 0.0
    for name, sizes in comms_logger.get_raw_data().items():
        running = max(max(entry[1]) for entry in sizes.values())
        total += running - _COMM_SEEN.get(name, 0.0)
        _COMM_SEEN[name] = running
    comms_logger.reset_data()  # bounded memory; the timers keep the running totals
    return total / 1000.0  # milliseconds


def shared_gradient(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The shared group's gradient, reduced over ranks and flattened (fp32). Call it after
    engine.backward() of the accumulation boundary's micro-batch and before engine.step(), which
    zeroes gradients: only then are they reduced (ZeRO 1/2 keep them as partitions in between). It is
    collective at ZeRO 1-3, so every rank calls it for the same parameters in the same order."""
    from deepspeed.utils import safe_get_full_grad  # param.grad at stage 0, gathered partitions above
    grads = []
    for p in params:
        grad = safe_get_full_grad(p)
        grads.append(torch.zeros(getattr(p, "ds_numel", p.numel())) if grad is None else grad.detach().float().flatten())
    return torch.cat(grads)


def evaluate(engine, model, dev: dict[str, dict[str, list]], batch_size: int, pad_id: int, rank: int,
             world: int, prompts: dict[str, PromptFormat | Seq2SeqFormat], max_new_tokens: dict[str, int], tokenizer=None,
             synced: bool = False) -> dict[str, tuple[list, list]]:
    """Every rank predicts a strided share of each dev set with the same number of batches (ZeRO-3
    forwards are collective), then predictions are gathered: identical results on every rank.
    Summarization predictions are greedy generations decoded to text, scored against the targets."""
    import torch.distributed as dist
    engine.eval()
    out = {}
    for task, rows in dev.items():
        n = len(rows["input_ids"])
        preds: list[tuple[int, Any]] = []
        for idx in batch_plan(n, batch_size, world, rank):
            values = predict_batch(model, task, rows, idx, pad_id=pad_id, fmt=prompts.get(task), tokenizer=tokenizer,
                                   max_new_tokens=max_new_tokens.get(task), synced=synced, forward=engine)
            preds += list(zip(idx, values))
        gathered = [None] * world
        dist.all_gather_object(gathered, preds)
        merged = dict(p for part in gathered for p in part)
        out[task] = ([merged[i] for i in range(n)], list(rows["target"] if task in prompts else rows["label"]))
    engine.train()
    return out


def train_fn_per_worker(config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from pipeline.config import Config
    from pipeline.eval.metrics import MetricFailed, multitask_score, task_metrics
    from pipeline.train.artifacts import publish_model
    from pipeline.train.failure import write_failure

    cfg = Config.model_validate(config["config"])
    train = cfg.train.model_dump()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tasks, weights, heads = config["tasks"], config["weights"], [Head(**h) for h in config["heads"]]
    specs = cfg.task_specs()
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model.name)
    pad_id = tokenizer.pad_token_id

    # Model and engine. Same seed on every rank; DeepSpeed broadcasts rank 0's weights anyway.
    model = build_model(cfg.model.name, heads, dropout=train["dropout"])
    if train["activation_checkpointing"]:
        model.enable_activation_checkpointing()
    # Loss weighting before the (slow) engine start: a bad train.shared_params prefix fails at once.
    weighting = make_weighting(train["weighting"], tasks, weights, train["weighting_options"])
    shared = [p for _, p in model.shared_parameters(train["shared_params"])] if weighting.needs_grads else []
    head_mult = {t: (cfg.tasks[t].head_lr_mult or train["head_lr_mult"]) for t in tasks}
    groups = model.param_groups(train["lr"], train["weight_decay"], head_mult)
    schedule = lr_lambda(train["schedule"], train["warmup_steps"], train["steps"])
    optimizer = None if train["offload_optimizer"] else torch.optim.AdamW(groups, lr=train["lr"])
    skip_inference_comm_op()
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
        config=deepspeed_config(train, world))
    skip_single_rank_allreduce(engine, world, train["zero_stage"])
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # per group: head multipliers stay applied

    # State, restored from the latest checkpoint when the run is resumed or restarted.
    sampler = TaskSampler(config["ratios"], cfg.seed)
    step, best_score, run_id, pending_eval = 0, -math.inf, config["run_id"], False
    resume_warnings: list[str] = []
    taken: set[str] = set()  # checkpoint folder names that exist already (a restart redoes their steps)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # verified first; a corrupt latest one falls back to the previous (pipeline/train/checkpoints.py)
        latest = checkpoint
        checkpoint, taken = choose(latest, rank, lambda w: (shout(w), resume_warnings.append(w)))
        if checkpoint is None:
            raise RuntimeError(f"no checkpoint of this run passes verification (newest: {latest.path}; see the warnings "
                               "above): move the broken step_* folders away to restart from the last good one, or "
                               "start a new run")
        with checkpoint.as_directory() as folder:
            _, client = engine.load_checkpoint(folder, tag=DS_TAG)
        sampler.load_state_dict(client["sampler"])
        if "weighting" in client:  # checkpoints from before dynamic weighting were static
            weighting.load_state_dict(client["weighting"])
        step, best_score = client["step"], client["best_score"]
        pending_eval = client.get("pending_eval", False)  # saved when this step's evaluation failed
        run_id = client["run_id"] or run_id  # keep logging into the same MLflow run
        torch.set_rng_state(client["torch_rng"])
        if rank == 0:
            say(f"resumed at step {step} (sampler draw {sampler.draws}, best score {best_score:.2f})")
    tracker = RunLogger(config["tracking_uri"], run_id, config["run_dir"]) if rank == 0 else None
    if tracker is not None and resume_warnings:  # the fallback stays visible on the run, not only in a log
        tracker.set_tag("mtl.resume_warning", " | ".join(resume_warnings)[:5000])

    prompts = {t: summary_format(model.kind, tokenizer, specs[t].prompt) for t in tasks
               if specs[t].kind == "summarization"}
    max_new = {t: cfg.max_new_tokens(specs[t]) for t in prompts}  # the task's declared summary length
    synced = train["zero_stage"] == 3 and world > 1
    iters = {t: batches_forever(ray.train.get_dataset_shard(t), train["batch_size"], pad_id, cfg.seed + rank,
                                prompts.get(t), skip=sampler.counts[t] * train["grad_accum"]) for t in tasks}
    dev = {t: ray.get(ref) for t, ref in config["dev"].items()}

    def new_window() -> dict:  # throughput counts training time only: evaluation and checkpoints are paused
        return {"start": time.perf_counter(), "paused": 0.0, "tokens": 0, "samples": 0, "losses": {t: [] for t in tasks},
                "cpu": cpu_seconds(), "paused_cpu": 0.0,
                "phases": dict.fromkeys(("data", "forward", "backward", "step"), 0.0)}

    gpu_sync = torch.cuda.synchronize if train["profile"] and torch.cuda.is_available() else (lambda: None)
    memory_step = min(2, train["steps"] - 1)  # measured once, after a backward, when optimizer state exists
    memory: dict[str, float] = {}
    if train["profile"]:
        comm_seconds()  # start counting now (not engine start-up)

    last_results: dict[str, tuple[list, list]] = {}

    def dev_evaluation(step: int) -> dict[str, float]:
        """Dev metrics at `step` (every rank gets the same numbers); a better score publishes best_model/.
        A metric that raises is MetricFailed on every rank alike (the predictions are gathered first)."""
        nonlocal best_score, last_results
        results = last_results = evaluate(engine, model, dev, train["eval_batch_size"], pad_id, rank, world, prompts,
                                          max_new, tokenizer, synced)
        per_task = {t: task_metrics(specs[t], p, r) for t, (p, r) in results.items()}
        score = multitask_score(per_task, specs)
        out = {f"dev/{t}/{m}": v for t, ms in per_task.items() for m, v in ms.items()}
        out["dev/score"] = score
        if rank == 0:
            say(f"eval step {step}: score {score:.2f} " + " ".join(
                f"{t}:{m}={v:.4f}" for t, ms in per_task.items() for m, v in ms.items()))
        if score > best_score:
            best_score = score
            publish_model(engine, model, tokenizer, config["run_dir"], "best_model", rank,
                          {"step": step, "score": score, "per_task": per_task, "run_id": run_id, **config["meta"]})
        out["dev/best_score"] = best_score
        out["is_best"] = float(best_score == score)
        return out

    def failed(err: MetricFailed, step: int) -> None:
        """Every rank stops here alike; rank 0 records what failed for the driver and MLflow."""
        if rank == 0:
            shout(f"evaluation at step {step} failed: {err}; the checkpoint of step {step} is kept")
            write_failure(config["run_dir"], {"step": step, "task": err.task, "metric": err.metric, "error": err.error})
            if tracker is not None:
                tracker.flush_or_spool()

    def save_checkpoint(step: int, metrics: dict[str, float], pending_eval: bool = False) -> None:
        """Every rank saves its DeepSpeed shards plus the loop's state, then reports them as one checkpoint."""
        folder = tempfile.mkdtemp(prefix="mtl-ckpt-")
        client = {"step": step, "sampler": sampler.state_dict(), "best_score": best_score, "run_id": run_id,
                  "torch_rng": torch.get_rng_state(), "weighting": weighting.state_dict(), "pending_eval": pending_eval}
        engine.save_checkpoint(folder, tag=DS_TAG, client_state=client)
        if rank == 0:
            with open(os.path.join(folder, "meta.json"), "w") as fh:
                json.dump({"step": step, "world": world, "run_id": run_id, "best_score": best_score,
                           "sampler": sampler.state_dict()}, fh)
        write_manifest(folder, rank)  # last: what this rank wrote, checked before any resume loads it
        report = {"step": step, "best_score": best_score, **{f"steps/{t}": c for t, c in sampler.counts.items()},
                  **{k: v for k, v in metrics.items() if k.startswith("dev/")}}
        if tracker is not None:
            tracker.flush_or_spool()
        name = dir_name(step, taken)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)
        taken.add(name)
        shutil.rmtree(folder, ignore_errors=True)

    if pending_eval:  # the evaluation this checkpoint's step could not finish comes first, then a clean checkpoint
        try:
            evaluated = dev_evaluation(step)
        except MetricFailed as err:
            return failed(err, step)
        if tracker is not None:
            tracker.log_metrics(evaluated, step)
        save_checkpoint(step, evaluated)

    window = new_window()
    deadline = time.monotonic() + 60 * train["max_minutes"] if train["max_minutes"] else None
    engine.train()
    last = step >= train["steps"]
    failure: MetricFailed | None = None
    while not last and failure is None:
        task = sampler.next()
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * schedule(step)
        if train["clip_grad"] > 0:
            # DeepSpeed clips the gradient of the *weighted* loss. A step trains one task, so a fixed
            # threshold would cancel the task's weight whenever its gradient norm exceeds it (most
            # steps of a fine-tune): scaling the threshold with the weight clips the task's own gradient.
            set_clip(engine, optimizer, train["clip_grad"] * weighting.grad_scale(task))
        step_losses = []
        phases = window["phases"]
        for micro in range(train["grad_accum"]):
            t0 = time.perf_counter()
            batch = next(iters[task])
            t1 = time.perf_counter()
            _, loss = engine(task=task, **batch)
            gpu_sync()
            t2 = time.perf_counter()
            engine.backward(weighting.weighted_loss(task, loss))
            if weighting.needs_grads and micro == train["grad_accum"] - 1:
                weighting.observe_grad(task, shared_gradient(shared))
            gpu_sync()
            t3 = time.perf_counter()
            if step == memory_step and micro == train["grad_accum"] - 1 and not memory:
                memory = {k: float(v) for k, v in model_state_bytes(model, optimizer).items()}
            t3b = time.perf_counter()  # (the one-off memory count is not part of any phase)
            engine.step()
            gpu_sync()
            t4 = time.perf_counter()
            phases["data"] += t1 - t0
            phases["forward"] += t2 - t1
            phases["backward"] += t3 - t2
            phases["step"] += t4 - t3b
            window["paused"] += t3b - t3
            window["tokens"] += int(batch["attention_mask"].sum())
            window["samples"] += len(batch["input_ids"])
            step_losses.append(loss.detach().item())
        if train["zero_stage"] == 3:
            clear_stale_grads(optimizer)
        window["losses"][task] += step_losses
        step += 1
        if weighting.needs_losses:  # the same value on every rank, so every rank computes the same weights
            mean_loss = torch.tensor([float(np.mean(step_losses))], dtype=torch.float64)
            dist.all_reduce(mean_loss)
            weighting.observe_loss(task, mean_loss.item() / world, step)
        last = step == train["steps"]
        if deadline is not None and not last:  # every rank stops at the same step: rank 0's clock decides
            over = torch.tensor([float(time.monotonic() > deadline)])
            dist.broadcast(over, src=0)
            last = bool(over.item())

        metrics: dict[str, float] = {}
        if step % train["log_every"] == 0 or last:
            counts = torch.tensor([window["tokens"], window["samples"]], dtype=torch.float64)
            dist.all_reduce(counts)  # throughput of the whole group, not one rank
            seconds = time.perf_counter() - window["start"] - window["paused"]
            losses = {t: float(np.mean(v)) for t, v in window["losses"].items() if v}
            metrics.update({f"loss/{t}": v for t, v in losses.items()})
            metrics["loss/total"] = float(np.mean([weighting.weight(t) * v for t, v in losses.items()]))
            metrics.update({f"weight/{t}": w for t, w in weighting.weights().items()})
            metrics.update({f"steps/{t}": float(c) for t, c in sampler.counts.items()})  # steps drawn so far
            metrics["lr"] = optimizer.param_groups[0]["lr"]
            metrics["tokens_per_s"] = counts[0].item() / seconds
            metrics["samples_per_s"] = counts[1].item() / seconds
            if train["profile"]:  # rank 0's view; the phases and "other" add up to the window
                busy = sum(window["phases"].values())
                metrics.update({f"time/{k}": v for k, v in window["phases"].items()})
                metrics.update({"time/window": seconds, "time/paused": window["paused"],
                                "time/other": max(0.0, seconds - busy), "time/comm": comm_seconds(),
                                "time/cpu": cpu_seconds() - window["cpu"] - window["paused_cpu"]})
            window = new_window()
            if rank == 0:
                hidden = ("steps/", "weight/") if weighting.method == "static" else ("steps/",)
                say(f"step {step}/{train['steps']} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                               if not k.startswith(hidden)))

        paused, paused_cpu = time.perf_counter(), cpu_seconds()
        if step % train["eval_every"] == 0 or last:
            try:
                metrics.update(dev_evaluation(step))
            except MetricFailed as err:  # training is kept: this step is checkpointed below, evaluation pending
                failure = err

        if tracker is not None and metrics:
            tracker.log_metrics(metrics, step)

        if step % train["checkpoint_every"] == 0 or last or failure is not None:
            save_checkpoint(step, metrics, pending_eval=failure is not None)
        window["paused"] += time.perf_counter() - paused
        window["paused_cpu"] += cpu_seconds() - paused_cpu

    if failure is not None:
        return failed(failure, step)

    # What each rank held (model states, measured once) and its peak RSS, logged by rank 0.
    held = [None] * world
    dist.all_gather_object(held, {**memory, "peak_rss": float(peak_rss_bytes())})
    if tracker is not None:
        psi = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        tracker.log_metrics({"memory/psi": float(psi), **{f"memory/rank{r}/{k}": v for r, m in enumerate(held)
                                                          for k, v in m.items()}}, step)

    # The engine's own predictions on the dev rows at the last step travel with the model, so a
    # reloaded copy can be checked against them.
    publish_model(engine, model, tokenizer, config["run_dir"], "final_model", rank,
                  {"step": step, "run_id": run_id, **config["meta"]},
                  files={"dev_predictions.json": {t: {"predictions": p, "references": r}
                                                  for t, (p, r) in last_results.items()}})
    if tracker is not None:
        tracker.flush_or_spool()
