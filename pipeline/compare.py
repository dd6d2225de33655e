"""The paper's comparison: the multi-task model against single-task models and classic baselines on
the same tasks, as one table.

Budget semantics (the paper's same-data comparison): each single-task model trains on its task for
exactly as many optimizer steps (of the same batch size) as the multi-task run's sampler drew for that
task; the Bi-LSTM baselines get the same number of steps. Dev metrics everywhere come from the same
dev rows (the config's `max_rows.validation`, seeded order).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.config import Config, load_config, config_to_dict
from pipeline.tasks.spec import TaskSpec
from pipeline.tracking import ComparisonTracking, tracking_uri

ROUGE_COLUMNS = ("rouge1", "rouge2", "rougeL")
GPT_NOTE = ("GPT-3 / GPT-4 rows of the paper are not reproduced: they need hosted models (no network "
            "here, and their outputs are not open); compare against the paper's published numbers instead.")


@dataclass
class Row:
    model: str
    metrics: dict[str, dict[str, float]]        # task -> metric -> value
    steps: int
    wall_seconds: float
    run_ids: list[str] = field(default_factory=list)
    note: str = ""


def single_task_config(cfg: Config, task: str, steps: int) -> Config:
    """The multi-task config reduced to one task and `steps` steps; warm-up, evaluation and
    checkpoint cadence scale with the run length."""
    raw = config_to_dict(cfg)
    total = cfg.train.steps
    raw["name"] = f"{cfg.name}-single-{task}"
    raw["tasks"] = {task: {**raw["tasks"][task], "weight": 1.0, "ratio": None}}
    raw["sampling"] = {"strategy": "proportional", "temperature": cfg.sampling.temperature}
    raw["train"].update(steps=steps, warmup_steps=min(steps - 1, round(cfg.train.warmup_steps * steps / total)),
                        eval_every=steps, checkpoint_every=steps, log_every=max(1, min(cfg.train.log_every, steps // 5)))
    return Config.model_validate(raw)


def tuned_config(cfg: Config, tuned_path: str) -> Config:
    """The multi-task config with a tuned file's task weights, ratios and train knobs applied (the
    best-config YAML a search writes: tasks.<t>.weight / ratio, sampling, train.lr ...)."""
    tuned = load_config(tuned_path)
    raw = config_to_dict(cfg)
    raw["name"] = f"{cfg.name}-tuned"
    for task, tcfg in tuned.tasks.items():
        if task in raw["tasks"]:
            raw["tasks"][task].update(weight=tcfg.weight, ratio=tcfg.ratio)
    raw["sampling"] = tuned.sampling.model_dump()
    for key in ("lr", "head_lr_mult", "warmup_steps", "weight_decay", "weighting", "weighting_options", "shared_params"):
        raw["train"][key] = getattr(tuned.train, key)
    return Config.model_validate(raw)


def run_bilstm(cfg: Config, prepared: dict, task: str, steps: int, dev_rows: dict[str, list],
               tracking: ComparisonTracking | None = None) -> Row:
    """Train and score the Bi-LSTM + attention baseline on one classification/regression task."""
    from pipeline.baselines.bilstm import predict_bilstm, train_bilstm
    from pipeline.eval.metrics import task_metrics
    from pipeline.model.refs import load_tokenizer

    spec = cfg.task_specs()[task]
    tok = load_tokenizer(cfg.model.name)
    table = prepared[task].table("train", limit=cfg.tasks[task].max_rows.get("train"), shuffle_seed=cfg.seed,
                                 columns=["input_ids", "label"])
    rows = {"input_ids": table["input_ids"].to_pylist(), "label": table["label"].to_pylist()}
    num_outputs = spec.num_labels if spec.kind == "classification" else 1
    start = time.monotonic()
    result = train_bilstm(rows, spec.kind, num_outputs, len(tok), tok.pad_token_id, steps=steps,
                          batch_size=cfg.train.batch_size, seed=cfg.seed, log_every=cfg.train.log_every)
    preds = predict_bilstm(result.model, dev_rows["input_ids"], spec.kind)
    metrics = task_metrics(spec, preds, dev_rows["label"])
    wall = time.monotonic() - start
    run_ids = []
    if tracking is not None:
        run_ids.append(tracking.baseline(task, steps, result.losses, metrics, {
            "task": task, "steps": str(steps), "batch_size": str(cfg.train.batch_size), "model": "bilstm-attention",
            "vocab": cfg.model.name}))
    return Row(f"Bi-LSTM + attention ({task})", {task: metrics}, steps, wall, run_ids)


def merge_rows(name: str, rows: list[Row], note: str = "") -> Row:
    """Per-task models shown as one row (one column group per task)."""
    metrics: dict[str, dict[str, float]] = {}
    for r in rows:
        metrics.update(r.metrics)
    return Row(name, metrics, sum(r.steps for r in rows), sum(r.wall_seconds for r in rows),
               [i for r in rows for i in r.run_ids], note)


def score(metrics: dict[str, dict[str, float]], specs: dict[str, TaskSpec], kinds=("classification", "regression")) -> float:
    """Mean primary metric × 100 over the row's tasks of the given kinds (GLUE-style average); NaN
    unless the row has every such task, so rows are only ever compared on the same tasks."""
    tasks = [t for t, s in specs.items() if s.kind in kinds]
    if not tasks or any(t not in metrics for t in tasks):
        return math.nan
    return sum(100 * metrics[t][specs[t].primary_metric] for t in tasks) / len(tasks)


def table_markdown(rows: list[Row], specs: dict[str, TaskSpec], notes: list[str]) -> str:
    head, sub = ["model"], []
    for task, spec in specs.items():
        if spec.kind == "summarization":
            head += [f"{task} {m.replace('rouge', 'R-')}" for m in ROUGE_COLUMNS]
        else:
            head.append(f"{task} {spec.primary_metric}")
    head += ["GLUE-style avg", "all-task score", "train steps", "train wall", "MLflow runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.model]
        for task, spec in specs.items():
            keys = ROUGE_COLUMNS if spec.kind == "summarization" else (spec.primary_metric,)
            for k in keys:
                value = r.metrics.get(task, {}).get(k)
                cells.append("n/a" if value is None else f"{100 * value:.1f}")
        glue, everything = score(r.metrics, specs), score(r.metrics, specs, ("classification", "regression", "summarization"))
        cells += ["n/a" if glue != glue else f"{glue:.1f}", "n/a" if everything != everything else f"{everything:.1f}",
                  str(r.steps), f"{r.wall_seconds / 60:.1f} min",
                  ", ".join(i[:8] for i in r.run_ids) or "—"]
        lines.append("| " + " | ".join(cells) + " |")
    sub = [f"- {n}" for n in notes]
    return "\n".join(lines + [""] + sub) + "\n"


def loss_figure(curves: dict[str, list[tuple[int, float]]], title: str):
    """Training-loss curves, one per task: (step, value) pairs by task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for task, history in curves.items():
        ax.plot([s for s, _ in history], [v for _, v in history], label=task)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def run_comparison(cfg: Config, config_path: str, out: Path, command: str, *, tuned: str | None = None,
                   skip_single_task: bool = False, say: Callable[[str], None] = print) -> Path:
    """Train and score every row on the same tasks and dev rows; write comparison.md / .json to `out`, log a
    loss plot to every model's run and the table to a comparison run. The multi-task run trains first: its
    sampler's per-task step counts are the single-task and Bi-LSTM budgets. Returns the Markdown report's path."""
    from pipeline.data.preprocess import prepare_tasks
    from pipeline.train.driver import dev_rows, train_driver

    specs = cfg.task_specs()
    prepared = prepare_tasks(cfg)  # fail on data problems before any training starts
    out.mkdir(parents=True, exist_ok=True)

    def trained(name: str, c: Config) -> tuple[Row, Any]:
        say(f"\n=== {name}: {', '.join(c.tasks)} for {c.train.steps} steps ===")
        r = train_driver(c, config_path=config_path, progress=True)
        return Row(name, r.dev_metrics, r.steps, r.wall_seconds, [r.run_id] if r.run_id else []), r

    mtl_row, mtl = trained("multi-task (equal weights)", cfg)
    rows, steps = [mtl_row], mtl.task_steps
    say(f"steps the multi-task sampler drew per task: {steps}")
    if tuned:
        rows.append(trained("multi-task (tuned)", tuned_config(cfg, tuned))[0])
    if not skip_single_task:
        singles = [trained(f"single-task {t}", single_task_config(cfg, t, steps[t]))[0] for t in cfg.tasks if steps.get(t)]
        rows.append(merge_rows(f"single-task ({cfg.model.name}, one model per task)", singles))

    tracking = ComparisonTracking.open(tracking_uri(cfg.tracking.uri), cfg.tracking.required,
                                       cfg.tracking.experiment or cfg.name)
    bilstm = []
    for t, spec in specs.items():
        if spec.kind != "summarization" and steps.get(t):
            say(f"\n=== Bi-LSTM + attention: {t} for {steps[t]} steps ===")
            dev = dev_rows(prepared[t], cfg.tasks[t].max_rows.get("validation"), cfg.seed)
            bilstm.append(run_bilstm(cfg, prepared, t, steps[t], dev, tracking))
    if bilstm:
        rows.append(merge_rows("Bi-LSTM + attention (from scratch, one per task)", bilstm))

    report = f"# Comparison: {cfg.name}\n\nCommand: `{command}`\n\n" + table_markdown(rows, specs, notes(cfg, steps))
    (out / "comparison.md").write_text(report)
    (out / "comparison.json").write_text(json.dumps(
        {"command": command, "config": config_path, "rows": [r.__dict__ for r in rows], "task_steps": steps}, indent=1))
    say("\n" + report)
    if tracking is not None:
        for row in rows:
            for run_id in row.run_ids:
                tracking.log_figure(run_id, loss_figure(tracking.loss_curves(run_id), row.model), "training_loss.png")
        run_id = tracking.comparison(cfg.name, [out / "comparison.md", out / "comparison.json"])
        say(f"MLflow comparison run: {run_id} ({tracking.uri})")
    return out / "comparison.md"


def notes(cfg: Config, steps: dict[str, int]) -> list[str]:
    """What the table's numbers are, under it."""
    summarization = [t for t, s in cfg.task_specs().items() if s.kind == "summarization"]
    lines = [
        f"Dev splits; the multi-task run trained {cfg.train.steps} steps of batch {cfg.train.batch_size} (per worker) × "
        f"{cfg.train.num_workers} workers; the sampler drew {', '.join(f'{t} {n}' for t, n in steps.items())} steps.",
        "Single-task models and Bi-LSTMs get exactly those per-task step counts (same data seen); their train "
        "steps/wall are sums over the per-task models. Wall time includes start-up and evaluation.",
        "Values are ×100: classification accuracy (or the task's primary metric), STS-B Pearson, ROUGE F1. "
        "`GLUE-style avg` averages the classification/regression primary metrics; `all-task score` adds "
        "ROUGE-1 for summarization (the training runs' multi-task score).",
    ]
    if summarization:
        lines.append(f"Bi-LSTM rows have no summarization model ({', '.join(summarization)}: n/a); the paper's "
                     "LSTM encoder-decoder baseline is not implemented.")
    return lines + [GPT_NOTE]
