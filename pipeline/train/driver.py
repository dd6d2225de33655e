"""The driver side of training: data, MLflow run, resources, then `TorchTrainer(...).fit()`.

    result = train_driver(cfg)                       # a new run
    result = train_driver(cfg, resume=True)          # continue the latest run of cfg.name
    result = train_driver(cfg, resume="mtl-1a2b3c")  # continue that run

Runs live in `<train.storage_path>/<run name>/`: Ray Train's checkpoints (`step_*`), `run.json`
(MLflow run id, config), `best_model/` and `final_model/` (reloadable folders). The driver owns the
MLflow run: it creates it (or reopens it on resume), logs params, inputs and artifacts, and passes
the run id to the workers, where rank 0 logs metrics.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline import storage
from pipeline.config import Config, config_to_dict
from pipeline.data.preprocess import PreparedTask, prepare_tasks
from pipeline.errors import PipelineError, Problem
from pipeline.runtime import KEEP_FREED_MEMORY, VERBOSE, malloc_env
from pipeline.train.failure import (RunFailed, clear_failure, last_checkpoint_step, log_failure, resume_command,
                                    take_failure, what_died)
from pipeline.train.mixing import Mixture, normalise_weights
from pipeline.train.rundir import RUN_RECORD, RunDir
from pipeline.tracking import TrainingRun, redact, tracking_uri

TRAIN_COLUMNS = ["input_ids", "token_type_ids", "label", "target_ids"]
PASS_BYTES = 64 * 2**20  # a small task split is repeated to about this size per Ray Data execution (see materialized)



def train_split_args(cfg: Config, task: str, prepared: PreparedTask) -> dict:
    """What a task's training rows are: its train split, limited by `max_rows`, in the seeded order, the training columns."""
    return {"limit": cfg.tasks[task].max_rows.get("train"), "shuffle_seed": cfg.seed,
            "columns": [c for c in TRAIN_COLUMNS if c in prepared.columns("train")]}


@dataclass
class TrainResult:
    run_name: str
    run_dir: str
    run_id: str | None
    steps: int
    best_score: float
    dev_metrics: dict[str, dict[str, float]]
    wall_seconds: float  # this attempt's, plus what earlier attempts ran up to the checkpoint it resumed from
    tracking_uri: str
    task_steps: dict[str, int] = field(default_factory=dict)  # optimizer steps the sampler gave each task
    extra: dict[str, Any] = field(default_factory=dict)


def check_resources(cfg: Config, log: Callable[[str], None] = print) -> None:
    """Fail fast when the cluster can never hold the worker group, autoscaler maximum included
    (pipeline/capacity.py), instead of waiting forever on a placement group."""
    from pipeline.capacity import cluster_capacity
    capacity, source = cluster_capacity()
    if capacity is None:
        log(f"resources: not checked ({source})")
        return
    need_cpu = cfg.train.num_workers * cfg.train.cpus_per_worker
    problems = []
    if need_cpu > capacity.get("CPU", 0):
        problems.append(Problem("train.num_workers", f"{cfg.train.num_workers} workers × {cfg.train.cpus_per_worker:g} CPU "
                                f"= {need_cpu:g} CPUs, but {source} {capacity.get('CPU', 0):g}",
                                "use fewer workers or a smaller train.cpus_per_worker"))
    if cfg.train.use_gpu and cfg.train.num_workers > capacity.get("GPU", 0):
        problems.append(Problem("train.use_gpu", f"{cfg.train.num_workers} workers need {cfg.train.num_workers} GPUs, "
                                f"but {source} {capacity.get('GPU', 0):g}", "use fewer workers, or train.use_gpu=false"))
    if problems:
        raise PipelineError(problems)


def _run_dir(cfg: Config, resume: bool | str, run_name: str | None = None) -> tuple[str, str, dict | None]:
    """(run name, run dir, run.json of the run being resumed). The run dir is a local folder or a URI."""
    base = storage.resolve(cfg.train.storage_path)

    def recorded(folder: str) -> dict | None:
        return RunDir(folder).read_record()

    if run_name is not None:  # a caller-chosen name (a Tune trial): resumed when it exists
        folder = storage.join(base, run_name)
        return run_name, folder, recorded(folder)
    if not resume:
        name = f"{cfg.name}-{uuid.uuid4().hex[:8]}"
        return name, storage.join(base, name), None
    if resume is True:
        runs = [(storage.mtime(storage.join(base, n, RUN_RECORD)), n) for n, _ in storage.subdirs(base, f"{cfg.name}-")
                if RunDir(storage.join(base, n)).exists()]
        if not runs:
            raise PipelineError.one("--resume", f"no run of {cfg.name!r} under {base}",
                                    "start a new run without --resume, or set train.storage_path to where the run lives")
        name = max(runs)[1]
    else:
        name = resume
        if recorded(storage.join(base, name)) is None:
            raise PipelineError.one("--resume", f"no run {resume!r} under {base}",
                                    f"name one of: {', '.join(sorted(n for n, _ in storage.subdirs(base))) or 'none yet'}")
    folder = storage.join(base, name)
    return name, folder, recorded(folder)


def dev_rows(task: PreparedTask, limit: int | None, seed: int) -> dict[str, list]:
    rows = task.table("validation", limit=limit, shuffle_seed=seed).to_pylist()
    if task.spec.kind == "summarization":  # generation is scored against the reference text
        return {"input_ids": [list(r["input_ids"]) for r in rows], "target": [r["target"] for r in rows]}
    cols = [c for c in ("input_ids", "token_type_ids", "label") if c in rows[0]]
    return {c: [r[c] if c == "label" else list(r[c]) for r in rows] for c in cols}


def model_metadata(cfg: Config, run_name: str) -> dict[str, Any]:
    """What every model folder of a run records in `mtl_model.json` besides its weights: how to
    tokenize, what each task predicts, and how the run's dev predictions were made (so a reloaded
    model can reproduce them exactly)."""
    specs = cfg.task_specs()
    return {"model": cfg.model.name, "max_length": cfg.model.max_length, "run_name": run_name,
            "max_target_length": cfg.model.max_target_length,
            "tasks": {t: _task_meta(cfg, s) for t, s in specs.items()},
            "evaluation": {"world": cfg.train.num_workers, "batch_size": cfg.train.eval_batch_size, "seed": cfg.seed,
                           "max_rows": {t: cfg.tasks[t].max_rows.get("validation") for t in specs}}}


def _task_meta(cfg: Config, spec) -> dict[str, Any]:
    meta = {"kind": spec.kind, "label_names": spec.label_names, "metrics": spec.metrics,
            "primary_metric": spec.primary_metric}
    if spec.kind == "summarization":
        meta.update(prompt=spec.prompt, max_new_tokens=cfg.max_new_tokens(spec))
    if spec.kind == "regression":
        meta["label_range"] = spec.label_range
    return meta


def _worker_env() -> dict:
    """Variables of this process the training workers need too: --verbose, $MTL_KEEP_FREED_MEMORY, and fault
    injection (tests); and glibc's malloc with one arena (`malloc_env`: Ray Train runs the loop on a thread)."""
    from pipeline.eval.metrics import FAULT_METRIC
    env = {k: os.environ[k] for k in (FAULT_METRIC, VERBOSE, KEEP_FREED_MEMORY) if k in os.environ}
    return {"env_vars": {**env, **malloc_env()}}


def _worker_job(cfg: Config, prepared: dict[str, PreparedTask], weights: dict[str, float], train_rows: dict[str, int],
                run_id: str | None, uri: str, run_dir: str, run_name: str, shards: dict):
    """What every worker gets (pipeline.train.loop.WorkerJob), the dev rows in Ray's object store; `shards`:
    the training rows handed over in memory (`train_inputs`)."""
    import ray

    from pipeline.model.multitask import Head
    from pipeline.train.loop import WorkerJob
    dev = {t: ray.put(dev_rows(p, cfg.tasks[t].max_rows.get("validation"), cfg.data.dev_seed)) for t, p in prepared.items()}
    return WorkerJob(config=cfg, tasks=tuple(prepared), weights=weights, mixture=mixture(cfg, train_rows),
                     heads=tuple(Head(t, s.kind, s.num_labels) for t, s in cfg.task_specs().items()), run_id=run_id,
                     tracking_uri=uri, run_dir=run_dir, dev=dev, meta=model_metadata(cfg, run_name), shards=shards)


def train_inputs(cfg: Config, prepared: dict[str, PreparedTask]) -> tuple[dict, dict]:
    """Each task's training rows for the workers: (Ray Datasets Ray Train streams to them, per-task lists of
    object refs, one Arrow table per worker rank). With `train.ingest: auto` a split of at most
    SMALL_SPLIT_BYTES goes to the workers through Ray's object store, so no Ray Data execution runs beside
    training; a larger split, or any with `ingest: streaming`, is a Ray Dataset. Same rows per rank either way."""
    import ray

    datasets, shards = {}, {}
    workers = cfg.train.num_workers
    for t, p in prepared.items():
        args = train_split_args(cfg, t, p)
        parts = p.worker_parts("train", **args, workers=workers) if cfg.train.ingest == "auto" else None
        if parts is None:
            datasets[t] = p.materialized("train", **args, workers=workers, pass_bytes=PASS_BYTES)
        else:
            shards[t] = [ray.put(part) for part in parts]
    return datasets, shards


def rows_used(cfg: Config, prepared: dict) -> dict[str, int]:
    """Each task's train rows the run draws from (`max_rows.train` caps the cached split)."""
    return {t: min(p.rows("train"), cfg.tasks[t].max_rows.get("train", p.rows("train"))) for t, p in prepared.items()}


def mixture(cfg: Config, train_rows: dict[str, int]) -> Mixture:
    """The sampling ratios of every step, from `sampling` and the tasks' train rows (a fresh state)."""
    return Mixture.from_config(cfg.sampling, train_rows, {t: cfg.tasks[t].ratio for t in train_rows}, cfg.train.steps)


def _trainer(cfg: Config, job, run_name: str, datasets: dict, callbacks: list | None):
    """The Ray Train TorchTrainer of one run: the workers, their checkpoints, restarts and log level."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.loop import train_fn_per_worker
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker={"CPU": cfg.train.cpus_per_worker},
                                               placement_strategy=cfg.train.placement),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage.resolve(cfg.train.storage_path),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env=_worker_env(), callbacks=list(callbacks or []),
            logging_config=ray.train.LoggingConfig(log_level="INFO" if os.environ.get(VERBOSE) == "1" else "WARNING")),
        datasets=datasets,
    )


def _fit(trainer, cfg: Config, mlrun: TrainingRun, run_dir: str, run_name: str, resume_with: str):
    """`trainer.fit()`; a run that stops early stays resumable and says so in one line (PipelineError for a
    failing evaluation metric, RunFailed for any other fault), MLflow marked FAILED or KILLED with that line."""
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        mlrun.fail("KILLED", f"interrupted; continue with: {resume_with}")
        raise
    except Exception as err:  # the run stays resumable; one line says what died and how to continue
        logged = log_failure(run_dir, err)
        step = last_checkpoint_step(run_dir)
        line = (f"run {run_name} failed: {what_died(err)}; "
                + (f"last checkpoint: step {step}" if step is not None else "no checkpoint yet (it restarts from step 0)")
                + f"; continue with: {resume_with} (traceback: {logged})")
        mlrun.fail("FAILED", line)
        raise RunFailed(line) from err
    failed = take_failure(run_dir)
    if failed is not None:  # an evaluation metric raised: the step is checkpointed, its evaluation pending
        task, metric = failed["task"], failed["metric"]
        where = (f"tasks.{task}.define.metrics" if cfg.tasks[task].define is not None else f"tasks.{task}")
        what = f"metric {metric!r} failed at the evaluation of step {failed['step']} ({failed['error']})"
        fix = (f"fix the task's metrics, then continue from the checkpoint of step {failed['step']} (its evaluation "
               f"runs first): {resume_with}")
        mlrun.fail("FAILED", f"{where}: {what} — {fix}")
        raise PipelineError.one(where, what, fix)
    return result


def _reported(metrics: dict) -> tuple[int, float, dict[str, dict[str, float]], dict[str, int]]:
    """(steps, best score, dev metrics by task, steps drawn per task) from the last report of rank 0."""
    dev_metrics: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith("dev/") and key.count("/") == 2:
            _, task, metric = key.split("/")
            dev_metrics.setdefault(task, {})[metric] = value
    task_steps = {k.split("/", 1)[1]: int(v) for k, v in metrics.items() if k.startswith("steps/")}
    return int(metrics.get("step", 0)), float(metrics.get("best_score", float("nan"))), dev_metrics, task_steps


def _preflight(cfg: Config, resume: bool | str, run_name: str | None, log: Callable[[str], None]):
    """Checks that need no data, before anything starts: the cluster can hold the workers, adapter targets
    exist in the model, and a resumed run is resumed with the config it was made from. Returns
    (run name, run folder, the run's previous record or None)."""
    check_resources(cfg, log)
    if cfg.model.adapter is not None:
        from pipeline.model.adapters import check_targets
        check_targets(cfg.model.name, cfg.model.adapter.target_modules)
    run_name, run_dir, previous = _run_dir(cfg, resume, run_name)
    if previous is not None and previous.get("config", {}).get("name") not in (None, cfg.name):
        raise PipelineError.one("--resume", f"run {run_name!r} was made from the config named "
                                f"{previous['config']['name']!r}, not {cfg.name!r}",
                                f"resume it with the config it was made from (name: {previous['config']['name']}), "
                                "or start a new run without --resume")
    return run_name, run_dir, previous


def train_driver(cfg: Config, *, resume: bool | str = False, config_path: str | None = None,
                 log: Callable[[str], None] = print, run_name: str | None = None,
                 parent_run_id: str | None = None, callbacks: list | None = None,
                 overrides: list[str] | None = None, progress: bool = False) -> TrainResult:
    """Train `cfg` to the end. `run_name` fixes the run's name (a Tune trial passes one derived from
    its trial id, and a restored trial with that name continues its run); `parent_run_id` nests the
    MLflow run; `callbacks` go to Ray Train's RunConfig (e.g. Tune's TuneReportCallback); `overrides`
    (the command line's key=value) only shape the `--resume` command printed when the run fails;
    `progress`: draw training on this process's console (a bar on a terminal, lines otherwise) instead of
    leaving rank 0's lines to Ray's log forwarding.

    A run that stops early stays resumable: a failing evaluation metric raises PipelineError (after
    its step was checkpointed), any other fault RunFailed — each one line naming the fix and the
    `--resume` command, the traceback in `<run dir>/failure.log`."""
    start = time.monotonic()
    run_name, run_dir, previous = _preflight(cfg, resume, run_name, log)
    done = (previous or {}).get("result")
    if done and done["steps"] >= cfg.train.steps:  # a finished run: only what MLflow may still lack
        uri = tracking_uri(cfg.tracking.uri)
        mlrun = TrainingRun.open(cfg, run_name, previous, uri, parent_run_id)
        log(f"run {run_name} already finished at step {done['steps']}: nothing to train")
        mlrun.finish(run_dir, log)
        return TrainResult(run_name, run_dir, mlrun.run_id, done["steps"], done["best_score"], done["dev_metrics"],
                           time.monotonic() - start, uri, task_steps=done["task_steps"])
    prepared = prepare_tasks(cfg, log=log, bar=progress and sys.stderr.isatty())

    train_rows = rows_used(cfg, prepared)
    weights = normalise_weights({t: cfg.tasks[t].weight for t in prepared})
    ratios = mixture(cfg, train_rows).ratios(0)  # at the first step (annealed and online ratios move from there)
    log("tasks: " + ", ".join(f"{t} (rows {train_rows[t]:,}, weight {weights[t]:.3g}, ratio {ratios[t]:.3f})"
                              for t in prepared))

    uri = tracking_uri(cfg.tracking.uri)
    mlrun = TrainingRun.open(cfg, run_name, previous, uri, parent_run_id)
    run_id = mlrun.run_id
    storage.make_dirs(run_dir)
    if previous is None:
        RunDir(run_dir).write_record({"run_name": run_name, "run_id": run_id, "tracking_uri": uri,
                                      "config": redact(config_to_dict(cfg))})
        mlrun.describe(cfg, prepared, weights, ratios, config_path, run_dir)
    log(f"run {run_name} in {run_dir}" + (f"; MLflow run {run_id} at {uri}" if run_id else "; no MLflow tracking"))
    clear_failure(run_dir)

    from ray.data import DataContext
    DataContext.get_current().enable_progress_bars = False  # per-worker split bars would drown the step lines

    datasets, shards = train_inputs(cfg, prepared)
    job = _worker_job(cfg, prepared, weights, train_rows, run_id, uri, run_dir, run_name, shards)
    view = None
    if progress:
        from pipeline.train.progress import ProgressView
        view = ProgressView(cfg.train.steps, bar=sys.stderr.isatty())
        job = dataclasses.replace(job, progress=view.queue)
    driver_s = time.monotonic() - start
    job = dataclasses.replace(job, fit_started=time.time())
    trainer = _trainer(cfg, job, run_name, datasets, callbacks)
    try:
        result = _fit(trainer, cfg, mlrun, run_dir, run_name, resume_command(config_path, run_name, overrides))
    finally:
        if view is not None:
            view.close()
    steps, best, dev_metrics, task_steps = _reported(result.metrics or {})
    reported_at = (result.metrics or {}).get("time/reported_at")
    # the fixed costs around the steps: the driver's own set-up (cache check, MLflow run, data), and from the
    # last step's checkpoint to the worker group's end (final model, shutdown); the workers log startup/*
    mlrun.log_metrics({"startup/driver_s": driver_s,
                       **({"end/after_last_checkpoint_s": time.time() - reported_at} if reported_at else {})}, steps)
    record = RunDir(run_dir).read_record()
    record["result"] = {"steps": steps, "best_score": best, "dev_metrics": dev_metrics, "task_steps": task_steps}
    RunDir(run_dir).write_record(record)
    mlrun.finish(run_dir, log, step=steps)
    earlier = (result.metrics or {}).get("time/earlier_s", 0.0)
    return TrainResult(run_name, run_dir, run_id, steps, best, dev_metrics, time.monotonic() - start + earlier, uri,
                       task_steps=task_steps)
