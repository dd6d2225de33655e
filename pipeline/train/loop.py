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
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.config import Config, TrainConfig
from pipeline.eval.predict import batch_plan, predict_batch
from pipeline.model.multitask import Head, build_model
from pipeline.model.refs import load_tokenizer
from pipeline.model.summarize import PromptFormat, Seq2SeqFormat, pad, summary_format
from pipeline.train.checkpoints import choose, dir_name, write_manifest
from pipeline.train.memory import model_state_bytes, peak_rss_bytes
from pipeline.runtime import keep_freed_memory, quiet_libraries
from pipeline.train.mixing import Mixture, TaskSampler
from pipeline.train.rundir import BEST_MODEL, CHECKPOINT_META, DS_TAG, FINAL_MODEL
from pipeline.tracking import MODEL_ARTIFACT_S, RunLogger
from pipeline.train.weighting import make_weighting
from pipeline.train.progress import send
from pipeline.train.window import Profiler, Window

LOADED = time.time()  # this module and its imports (torch, transformers, the project) loaded in this process



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


class TableShard:
    """One rank's training rows held in memory (an Arrow table from the object store), read like Ray Data's
    `DataIterator.iter_batches` by `batches_forever`: every epoch a fresh permutation of the whole shard,
    seeded by `local_shuffle_seed`, in full batches (the last partial one is dropped: every step, on every
    rank, sees `batch_size` rows)."""

    def __init__(self, table):
        self.table = table

    def iter_batches(self, batch_size: int, batch_format: str = "numpy", local_shuffle_buffer_size: int = 0,
                     local_shuffle_seed: int = 0, **_) -> Iterator[dict[str, np.ndarray]]:
        order = np.random.default_rng(local_shuffle_seed).permutation(self.table.num_rows)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            picked = self.table.take(order[start:start + batch_size])
            yield {name: column.to_numpy(zero_copy_only=False) for name, column in zip(picked.column_names, picked.columns)}


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
    import importlib
    # importlib, not `import deepspeed.comm.torch as ...`: the package's namespace holds `torch` (the real torch
    # module) under that name, so the `as` form would return torch itself.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


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


def sparse_embedding_grads(model, train: TrainConfig, world: int) -> bool:
    """`train.sparse_embedding_grads`: with ZeRO-0, fp32 and more than one rank, the backbone's word embedding
    gives torch's sparse gradient (the rows its batch used), which DeepSpeed's ZeRO-0 all-reduce gathers as
    rows instead of reducing the whole matrix. The optimizer needs it dense again: `densify_grads`.
    Not for an embedding tied to an output layer (its gradient is dense anyway) or a frozen one. True if on."""
    if not train.sparse_embedding_grads or world == 1 or train.zero_stage != 0 or train.precision != "fp32":
        return False
    embedding = model.backbone.get_input_embeddings()
    output = model.backbone.get_output_embeddings()
    if not isinstance(embedding, torch.nn.Embedding) or not embedding.weight.requires_grad:
        return False
    if output is not None and output.weight is embedding.weight:
        return False
    embedding.sparse = True
    return True


def densify_grads(module) -> None:
    """Sparse gradients (`sparse_embedding_grads`, after DeepSpeed's sparse all-reduce) as dense ones, which
    the optimizer, gradient clipping and loss weighting expect. Rows no batch used are zeros, as in a dense
    embedding gradient, so the update is the one the dense gradient gives. The dense gradient is one buffer
    per parameter, kept across steps: a fresh vocabulary-sized tensor every step is larger than glibc's
    largest reusable block (32 MiB), so it would be mapped, faulted in and zeroed page by page each time."""
    for p in module.parameters():
        grad = p.grad
        if grad is None or not grad.is_sparse:
            continue
        grad = grad.coalesce()  # the ranks' rows side by side: duplicates summed
        dense = getattr(p, "dense_grad", None)
        if dense is None:
            dense = p.dense_grad = torch.zeros_like(p)
        else:
            dense.zero_()
        dense.index_copy_(0, grad.indices()[0], grad.values().to(dense.dtype))
        p.grad = dense


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


def deepspeed_config(train: TrainConfig, world_size: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if train.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    zero.update(train.zero_options)
    config = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if train.profile:  # time inside DeepSpeed's collectives, read back per window (Profiler.comm_seconds)
        config["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    config["gradient_clipping"] = train.clip_grad  # always explicit: DeepSpeed's default is 1.0, not off
    if train.offload_optimizer:  # offload refuses a client optimizer: declare it here
        config["optimizer"] = {"type": "AdamW", "params": {"lr": train.lr, "weight_decay": train.weight_decay}}
    return config


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


def heads_input_gradient(model, world: int) -> torch.Tensor:
    """The step's gradient with respect to the heads' common input (MultiTaskModel.watch_heads_input),
    averaged over ranks like parameter gradients; resets it for the next step. Collective: every rank calls it."""
    import torch.distributed as dist
    grad = model.feature_grad
    model.feature_grad = None
    if grad is None:  # a rank whose rows gave no gradient (cannot happen with a loss on every row)
        grad = torch.zeros(model.backbone.config.hidden_size)
    if world > 1:
        dist.all_reduce(grad)
        grad /= world
    return grad


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


@dataclass(frozen=True)
class WorkerJob:
    """Everything the driver hands each worker, typed (the whole driver/worker contract)."""

    config: Config
    tasks: tuple[str, ...]
    weights: dict[str, float]  # normalised to sum to the number of tasks
    mixture: Mixture  # the sampling ratios at every step (fresh: every rank moves its copy identically)
    heads: tuple[Head, ...]
    run_id: str | None  # the MLflow run the driver owns; rank 0 logs into it
    tracking_uri: str
    run_dir: str
    dev: dict[str, Any]  # task -> object ref of its dev rows (every rank evaluates a share)
    meta: dict[str, Any]  # what every model folder records (pipeline.train.driver.model_metadata)
    progress: Any = None  # the driver's progress queue (pipeline/train/progress.py); None: rank 0 prints
    fit_started: float = 0.0  # wall clock when the driver started the worker group (start-up timings)
    shards: dict[str, list] = field(default_factory=dict)  # task -> per-rank object refs of Arrow tables (small splits;
    # the other tasks come as Ray Train dataset shards): pipeline.train.driver.train_inputs


@dataclass
class TrainState:
    """What a checkpoint restores besides the engine, sampler and weighting."""

    step: int = 0
    best_score: float = -math.inf
    run_id: str | None = None
    pending_eval: bool = False  # the step's evaluation failed: a resume evaluates it first
    taken: set[str] = field(default_factory=set)  # checkpoint folder names that exist (a restart redoes their steps)
    warnings: list[str] = field(default_factory=list)  # checkpoint fallbacks, shown on the MLflow run
    earlier_s: float = 0.0  # wall seconds earlier attempts' workers ran, up to the checkpoint this one resumed from
    began: float = field(default_factory=time.time)  # when this attempt's worker started


def build_engine(cfg: Config, job: WorkerJob, world: int):
    """Model -> loss weighting -> DeepSpeed engine. Same seed on every rank; DeepSpeed broadcasts rank 0's
    weights anyway. The weighting comes first: a bad train.shared_params prefix fails before the slow start."""
    import deepspeed
    train = cfg.train
    adapter = cfg.model.adapter.model_dump() if cfg.model.adapter is not None else None
    model = build_model(cfg.model.name, list(job.heads), dropout=train.dropout, adapter=adapter)
    if train.activation_checkpointing:
        model.enable_activation_checkpointing()
    weighting = make_weighting(train.weighting, list(job.tasks), job.weights, train.weighting_options)
    shared: list | None = []
    if weighting.needs_grads and train.shared_params is None and len(model.adapter_names) > 1:
        model.watch_heads_input()  # per-task adapters share no parameter: compare on the heads' input
        shared = None
    elif weighting.needs_grads:
        shared = [p for _, p in model.shared_parameters(train.shared_params)]
    sparse_embedding_grads(model, train, world)
    head_mult = {t: (cfg.tasks[t].head_lr_mult or train.head_lr_mult) for t in job.tasks}
    groups = model.param_groups(train.lr, train.weight_decay, head_mult)
    optimizer = None if train.offload_optimizer else adamw(groups, train)
    skip_inference_comm_op()
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
        config=deepspeed_config(train, world))
    skip_single_rank_allreduce(engine, world, train.zero_stage)
    if frozen_base(engine):
        exclude_every_frozen_name(engine)
    return model, engine, optimizer, weighting, shared


def adamw(groups: list[dict], train) -> torch.optim.AdamW:
    """The client optimizer: torch's AdamW, fused unless `train.fused_optimizer` is off (on CPU torch's
    default is a per-parameter loop, ~4.5x slower for a MiniLM-sized model). The plain-loop benchmark
    side builds its optimizer here too, so both sides step alike."""
    return torch.optim.AdamW(groups, lr=train.lr, fused=True if train.fused_optimizer else None)


def exclude_every_frozen_name(engine) -> None:
    """DeepSpeed's `exclude_frozen_parameters` drops frozen weights by their `named_parameters()` names, which
    list a tied weight once (an LM head sharing the embedding matrix): the tied name stayed in ZeRO 0-2
    checkpoints with the whole frozen matrix. Every name of a frozen parameter is dropped here."""
    original = engine.module_state_dict

    def module_state_dict(*args, exclude_frozen_parameters: bool = False, **kwargs):
        state = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters and state is not None:
            for name, p in engine.module.named_parameters(remove_duplicate=False):
                if not p.requires_grad:
                    state.pop(name, None)
        return state

    engine.module_state_dict = module_state_dict


def frozen_base(engine) -> bool:
    """The model trains adapters on a frozen backbone (model.adapter)."""
    return bool(getattr(engine.module, "adapter_names", None))


def restore(engine, sampler: TaskSampler, weighting, rank: int, run_id: str | None, progress=None) -> TrainState:
    """The loop's state from the latest checkpoint that passes verification (pipeline/train/checkpoints.py;
    a corrupt latest one falls back to the previous), or a fresh state."""
    import ray.train
    state = TrainState(run_id=run_id)
    latest = ray.train.get_checkpoint()
    if not latest:
        return state
    checkpoint, state.taken = choose(latest, rank, lambda w: (shout(w), state.warnings.append(w)))
    if checkpoint is None:
        raise RuntimeError(f"no checkpoint of this run passes verification (newest: {latest.path}; see the warnings "
                           "above): move the broken step_* folders away to restart from the last good one, or "
                           "start a new run")
    with checkpoint.as_directory() as folder:
        _, client = engine.load_checkpoint(folder, tag=DS_TAG, load_module_strict=not frozen_base(engine))
    sampler.load_state_dict(client["sampler"])
    if "weighting" in client:  # checkpoints from before dynamic weighting were static
        weighting.load_state_dict(client["weighting"])
    state.step, state.best_score = client["step"], client["best_score"]
    state.pending_eval = client.get("pending_eval", False)
    state.earlier_s = client.get("run_s", 0.0)  # checkpoints from before it was recorded: unknown, 0
    state.run_id = client["run_id"] or run_id  # keep logging into the same MLflow run
    torch.set_rng_state(client["torch_rng"])
    if rank == 0:
        send(progress, "line", f"resumed at step {state.step} (sampler draw {sampler.draws}, best score {state.best_score:.2f})")
    return state


def train_step(engine, batches: Iterator[dict], task: str, weighting, grad_accum: int,
               at_boundary=None) -> tuple[list[float], int, int]:
    """One optimizer step on `grad_accum` micro-batches of one task: (losses, tokens, samples).
    `at_boundary()` runs after the last backward, while the reduced gradients exist (before step() zeroes them)."""
    losses, tokens, samples = [], 0, 0
    for micro in range(grad_accum):
        batch = next(batches)
        _, loss = engine(task=task, **batch)
        engine.backward(weighting.weighted_loss(task, loss))
        if micro == grad_accum - 1:
            densify_grads(engine.module)
            if at_boundary is not None:
                at_boundary()
        engine.step()
        losses.append(loss.detach().item())
        tokens, samples = tokens + int(batch["attention_mask"].sum()), samples + len(batch["input_ids"])
    return losses, tokens, samples


class DevEvaluation:
    """Dev metrics at a step, the same numbers on every rank; a better score publishes `best_model/`.
    A metric that raises is MetricFailed on every rank alike (the predictions are gathered first)."""

    def __init__(self, cfg: Config, job: WorkerJob, engine, model, tokenizer, rank: int, world: int):
        self.cfg, self.job, self.engine, self.model, self.tokenizer = cfg, job, engine, model, tokenizer
        self.rank, self.world, self.specs = rank, world, cfg.task_specs()
        self.prompts = {t: summary_format(model.kind, tokenizer, self.specs[t].prompt) for t in job.tasks
                        if self.specs[t].kind == "summarization"}
        self.max_new = {t: cfg.max_new_tokens(self.specs[t]) for t in self.prompts}  # the declared summary length
        import ray
        self.rows = {t: ray.get(ref) for t, ref in job.dev.items()}
        self.last: dict[str, tuple[list, list]] = {}  # the latest predictions, kept with final_model/

    def __call__(self, state: TrainState) -> dict[str, float]:
        from pipeline.eval.metrics import multitask_score, task_metrics
        from pipeline.train.artifacts import publish_model
        train = self.cfg.train
        self.last = evaluate(self.engine, self.model, self.rows, train.eval_batch_size, self.tokenizer.pad_token_id,
                             self.rank, self.world, self.prompts, self.max_new, self.tokenizer,
                             synced=train.zero_stage == 3 and self.world > 1)
        per_task = {t: task_metrics(self.specs[t], p, r) for t, (p, r) in self.last.items()}
        score = multitask_score(per_task, self.specs)
        if self.rank == 0:
            send(self.job.progress, "line", f"eval step {state.step}: score {score:.2f} · " + " · ".join(
                f"{t} " + " ".join(f"{m} {v:.4f}" for m, v in ms.items()) for t, ms in per_task.items()))
        if score > state.best_score:
            state.best_score = score
            publish_model(self.engine, self.model, self.tokenizer, self.job.run_dir, BEST_MODEL, self.rank,
                          {"step": state.step, "score": score, "per_task": per_task, "run_id": state.run_id,
                           **self.job.meta})
        out = {f"dev/{t}/{m}": v for t, ms in per_task.items() for m, v in ms.items()}
        return {**out, "dev/score": score, "dev/best_score": state.best_score, "is_best": float(state.best_score == score)}


def progress_report(state: TrainState, sampler: TaskSampler, weighting, metrics: dict[str, float]) -> dict[str, float]:
    """What every `ray.train.report` carries (what Tune's schedulers decide on and the driver's result holds):
    the step, the best score, the seconds earlier attempts ran (a resumed run's wall time counts them), each
    task's steps, weight and ratio, and the dev metrics when there are any."""
    return {"step": state.step, "best_score": state.best_score, "time/reported_at": time.time(),
            "time/earlier_s": state.earlier_s,
            **{f"steps/{t}": c for t, c in sampler.counts.items()},
            **{f"weight/{t}": w for t, w in weighting.weights().items()},  # Tune's TensorBoard files show them too
            **{f"ratio/{t}": r for t, r in sampler.ratios().items()},
            **{k: v for k, v in metrics.items() if k.startswith("dev/")}}


def save_checkpoint(engine, state: TrainState, sampler: TaskSampler, weighting, metrics: dict[str, float],
                    rank: int, world: int, tracker) -> None:
    """Every rank saves its DeepSpeed shards plus the loop's state and a manifest of what it wrote; Ray
    Train merges them into one checkpoint `<run dir>/step_NNNNNNN/`."""
    from pathlib import Path

    import ray.train
    import torch.distributed as dist
    folder = tempfile.mkdtemp(prefix="mtl-ckpt-")
    client = {"step": state.step, "sampler": sampler.state_dict(), "best_score": state.best_score,
              "run_id": state.run_id, "torch_rng": torch.get_rng_state(), "weighting": weighting.state_dict(),
              "pending_eval": state.pending_eval, "run_s": state.earlier_s + time.time() - state.began}
    # With adapters the frozen base is not saved: the checkpoint holds what trains, the base is rebuilt
    # from its reference (model.name) on restore.
    engine.save_checkpoint(folder, tag=DS_TAG, client_state=client, exclude_frozen_parameters=frozen_base(engine))
    if rank == 0:
        with open(os.path.join(folder, CHECKPOINT_META), "w") as fh:
            json.dump({"step": state.step, "world": world, "run_id": state.run_id, "best_score": state.best_score,
                       "sampler": sampler.state_dict()}, fh)
    write_manifest(folder, rank)  # last: what this rank wrote, checked before any resume loads it
    written = [None] * world  # the checkpoint's size over all ranks (with adapters: no frozen base in it)
    dist.all_gather_object(written, sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()))
    if tracker is not None:
        tracker.log_metrics({"checkpoint/bytes": float(sum(written))}, state.step)
        tracker.flush_or_spool()
    name = dir_name(state.step, state.taken)
    ray.train.report(progress_report(state, sampler, weighting, metrics),
                     checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)
    state.taken.add(name)
    shutil.rmtree(folder, ignore_errors=True)


class Worker:
    """One rank's set-up (engine, data iterators, restored state, MLflow logger, dev evaluation) and the parts
    of a step the loop calls by name. Every method that holds a collective runs on every rank at the same step."""

    def __init__(self, job: WorkerJob):
        import ray.train
        began = time.time()
        keep_freed_memory()  # no page faults for the same activations at every step (pipeline/runtime.py)
        self.job, self.cfg, self.train = job, job.config, job.config.train
        train = self.train
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if train.use_gpu else "cpu")  # no detection warning per worker
        quiet_libraries()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.manual_seed(self.cfg.seed)
        stamps = [began]
        self.tokenizer = load_tokenizer(self.cfg.model.name)
        stamps.append(time.time())
        self.model, self.engine, self.optimizer, self.weighting, self.shared = build_engine(self.cfg, job, self.world)
        stamps.append(time.time())
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]  # per group: head multipliers stay applied
        self.schedule = lr_lambda(train.schedule, train.warmup_steps, train.steps)
        self.sampler = TaskSampler(job.mixture, self.cfg.seed)
        self.state = restore(self.engine, self.sampler, self.weighting, self.rank, job.run_id, job.progress)
        self.state.began = began
        stamps.append(time.time())
        self.tracker = RunLogger(job.tracking_uri, self.state.run_id, job.run_dir) if self.rank == 0 else None
        if self.tracker is not None and self.state.warnings:  # a checkpoint fallback stays visible on the run
            self.tracker.set_tag("mtl.resume_warning", " | ".join(self.state.warnings)[:5000])
        self.evaluation = DevEvaluation(self.cfg, job, self.engine, self.model, self.tokenizer, self.rank, self.world)
        self.iters = {t: batches_forever(TableShard(ray.get(job.shards[t][self.rank])) if t in job.shards
                                         else ray.train.get_dataset_shard(t), train.batch_size, self.tokenizer.pad_token_id,
                                         self.cfg.seed + self.rank, self.evaluation.prompts.get(t),
                                         skip=self.sampler.counts[t] * train.grad_accum) for t in job.tasks}
        self.profiler = Profiler(self.engine, self.iters) if train.profile else None
        self.deadline = time.monotonic() + 60 * train.max_minutes if train.max_minutes else None
        self.memory: dict[str, float] = {}  # what this rank holds (params, grads, optimizer), counted once
        self.window = Window(list(job.tasks), self.profiler)  # the log interval's losses and timings
        self.paused_s = 0.0  # training paused for evaluations and checkpoints, in the windows already closed
        self.checkpoint_s = 0.0  # of which checkpoints (rank 0's clock; the rest is evaluations)
        stamps.append(time.time())
        if self.tracker is not None:  # where a run's fixed start-up cost goes (rank 0's clock)
            self.tracker.log_metrics(startup_times(job.fit_started, stamps, process_started()), self.state.step)

    def step(self, task: str) -> bool:
        """One optimizer step of `task` at the scheduled lr; True when it was the last one."""
        train, state = self.train, self.state
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.schedule(state.step)
        if train.clip_grad > 0:  # clip the task's own gradient: a fixed threshold would cancel its weight
            set_clip(self.engine, self.optimizer, train.clip_grad * self.weighting.grad_scale(task))
        losses, tokens, samples = train_step(self.engine, self.iters[task], task, self.weighting, train.grad_accum,
                                             at_boundary=lambda: self.at_boundary(task))
        if train.zero_stage == 3:
            clear_stale_grads(self.optimizer)
        state.step += 1
        self.window.add(task, losses, tokens, samples)
        if self.weighting.needs_losses or self.sampler.mixture.needs_losses:
            loss = mean_over_ranks(losses, self.world)  # the same value on every rank: the same weights and ratios
            self.weighting.observe_loss(task, loss, state.step)
            self.sampler.mixture.observe(task, loss)
        return state.step == train.steps or out_of_time(self.deadline)

    def at_boundary(self, task: str) -> None:
        """After the step's last backward, while the reduced gradients exist."""
        if self.weighting.needs_grads:  # collective at ZeRO 1-3: every rank, same parameters, same order
            grad = heads_input_gradient(self.model, self.world) if self.shared is None else shared_gradient(self.shared)
            self.weighting.observe_grad(task, grad)
        if not self.memory and self.state.step >= min(2, self.train.steps - 1):
            with self.window.pause():
                self.memory.update({k: float(v) for k, v in model_state_bytes(self.model, self.optimizer).items()})

    def log(self) -> dict[str, float]:
        """The interval's training metrics (collective); rank 0 sends them to the progress view. Starts a new interval."""
        metrics = self.window.metrics(self.weighting, self.sampler, self.optimizer.param_groups[0]["lr"])
        self.paused_s += self.window.paused
        self.window = Window(list(self.job.tasks), self.profiler)
        if self.rank == 0:
            hidden = ("steps/", "weight/") if self.weighting.method == "static" else ("steps/",)
            send(self.job.progress, "step", {"step": self.state.step, "total": self.train.steps,
                                             "metrics": {k: v for k, v in metrics.items() if not k.startswith(hidden)}})
        return metrics

    def record(self, metrics: dict[str, float], checkpoint: bool) -> None:
        """Metrics to MLflow (rank 0), then the checkpoint (with its report) when one is due; an evaluation
        without a checkpoint is reported alone (a Tune trial's scheduler decides on every evaluation, whether
        or not a checkpoint comes with it)."""
        import ray.train
        if self.tracker is not None and metrics:
            self.tracker.log_metrics(metrics, self.state.step)
        if checkpoint:
            began = time.perf_counter()
            save_checkpoint(self.engine, self.state, self.sampler, self.weighting, metrics, self.rank, self.world,
                            self.tracker)
            self.checkpoint_s += time.perf_counter() - began
        elif "dev/score" in metrics:
            ray.train.report(progress_report(self.state, self.sampler, self.weighting, metrics))

    def failed(self, err) -> None:
        """A metric raised at an evaluation: every rank stops here alike; rank 0 tells the driver and MLflow."""
        from pipeline.train.failure import write_failure
        if self.rank == 0:
            step = self.state.step
            shout(f"evaluation at step {step} failed: {err}; the checkpoint of step {step} is kept")
            write_failure(self.job.run_dir, {"step": step, "task": err.task, "metric": err.metric, "error": err.error})
            if self.tracker is not None:
                self.tracker.flush_or_spool()

    def finish(self) -> None:
        """Memory report, then `final_model/` with the engine's own dev predictions of the last step (a reloaded
        copy is checked against them)."""
        from pipeline.train.artifacts import publish_model
        log_memory(self.model, self.memory, self.world, self.tracker, self.state.step)
        if self.tracker is not None:  # this attempt's evaluations and checkpoints, end to end (rank 0's clock)
            self.tracker.log_metrics({PAUSED_S: self.paused_s + self.window.paused, CHECKPOINTS_S: self.checkpoint_s},
                                     self.state.step)
        publish_model(self.engine, self.model, self.tokenizer, self.job.run_dir, FINAL_MODEL, self.rank,
                      {"step": self.state.step, "run_id": self.state.run_id, **self.job.meta},
                      files={"dev_predictions.json": {t: {"predictions": p, "references": r}
                                                      for t, (p, r) in self.evaluation.last.items()}})
        if self.tracker is not None:
            self.tracker.flush_or_spool()


PAUSED_S = "time/paused_total_s"  # a run's evaluations and checkpoints in all (this attempt), at its last step
CHECKPOINTS_S = "time/checkpoint_total_s"  # of which checkpoints (saving, persisting, reporting)
STARTUP_PHASES = ("tokenizer", "engine", "restore", "data_and_eval")
WORKER_GROUP_PARTS = ("startup/worker_process_s", "startup/imports_s", "startup/backend_s")  # within worker_group
# every fixed-cost metric a run logs, in order; the parts of the worker group are inside it, not beside it
FIXED_COSTS = ("startup/driver_s", "startup/worker_group_s", *(f"startup/{p}_s" for p in STARTUP_PHASES),
               "end/after_last_checkpoint_s", MODEL_ARTIFACT_S)


def process_started() -> float:
    """Wall clock when this worker's process started (0.0 when the OS cannot say)."""
    try:
        import psutil
        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a missing number, not a failed run
        return 0.0


def startup_times(fit_started: float, stamps: list[float], process: float = 0.0,
                  loaded: float | None = None) -> dict[str, float]:
    """`startup/*` seconds: `worker_group` from the driver starting the worker group to this worker's set-up
    (placement group, actor processes and their imports, process group), then each set-up phase: tokenizer,
    DeepSpeed engine (model built, optimizer, ZeRO partitioning), restore (checkpoint or fresh state),
    data_and_eval (dataset shards, dev evaluation set-up, MLflow logger). `worker_group` splits further when
    the worker's process start is known: `worker_process` (Ray Train's controller, the placement group and
    the actor scheduled until its process exists; 0 when Ray gave the actor a process started earlier), `imports`
    (from then to this module and its imports loaded; 0 when that process had loaded them already) and `backend`
    (the rest: Ray Train's worker set-up, the torch process group, the job handed over)."""
    loaded = LOADED if loaded is None else loaded
    times = {f"startup/{p}_s": b - a for p, a, b in zip(STARTUP_PHASES, stamps, stamps[1:])}
    if fit_started:
        times["startup/worker_group_s"] = stamps[0] - fit_started
        if process and loaded <= stamps[0]:
            # a process Ray started before the fit (a pooled worker) counts from the fit's start, and imports it had
            # already done (it ran other project code) cost this fit nothing
            start = min(max(process, fit_started), stamps[0])
            ready = max(loaded, start)
            times["startup/worker_process_s"] = start - fit_started
            times["startup/imports_s"] = ready - start
            times["startup/backend_s"] = stamps[0] - ready
    return times


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Set up, then a loop of step -> log -> evaluate -> checkpoint, then the final model."""
    from pipeline.eval.metrics import MetricFailed

    w = Worker(config["job"])
    state, train = w.state, w.train
    if state.pending_eval:  # the evaluation the checkpoint's step could not finish comes first, then a clean checkpoint
        try:
            metrics = w.evaluation(state)
        except MetricFailed as err:
            return w.failed(err)
        state.pending_eval = False
        w.record(metrics, checkpoint=True)

    w.engine.train()
    last, failure = state.step >= train.steps, None
    while not last and failure is None:
        last = w.step(w.sampler.next())
        metrics = w.log() if state.step % train.log_every == 0 or last else {}
        with w.window.pause():
            if state.step % train.eval_every == 0 or last:
                try:
                    metrics.update(w.evaluation(state))
                except MetricFailed as err:  # training is kept: this step is checkpointed, its evaluation pending
                    state.pending_eval, failure = True, err
            w.record(metrics, checkpoint=state.step % train.checkpoint_every == 0 or last or failure is not None)
    if failure is not None:
        return w.failed(failure)
    w.finish()


def log_memory(model, memory: dict[str, float], world: int, tracker, step: int) -> None:
    """What each rank held (model states, measured once) and its peak RSS, gathered and logged by rank 0."""
    import torch.distributed as dist
    held = [None] * world
    dist.all_gather_object(held, {**memory, "peak_rss": float(peak_rss_bytes())})
    if tracker is not None:
        psi = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        tracker.log_metrics({"memory/psi": float(psi), "memory/trainable_params": float(trainable), **{f"memory/rank{r}/{k}": v for r, m in enumerate(held)
                                                          for k, v in m.items()}}, step)


def mean_over_ranks(values: list[float], world: int) -> float:
    import torch.distributed as dist
    mean = torch.tensor([float(np.mean(values))], dtype=torch.float64)
    dist.all_reduce(mean)
    return mean.item() / world


def out_of_time(deadline: float | None) -> bool:
    """train.max_minutes: rank 0's clock decides, so every rank stops at the same step."""
    import torch.distributed as dist
    if deadline is None:
        return False
    over = torch.tensor([float(time.monotonic() > deadline)])
    dist.broadcast(over, src=0)
    return bool(over.item())
