"""The paper's comparison: the multi-task model against single-task models and classic baselines on
the same tasks, as one table.

Budget semantics (the paper's same-data comparison): each single-task model trains on its task for
exactly as many optimizer steps (of the same batch size) as the multi-task run's sampler drew for that
task; the Bi-LSTM baselines get the same number of steps. Dev metrics everywhere come from the same
dev rows (the config's `max_rows.validation`, seeded order).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config, load_config, config_to_dict
from pipeline.tasks.spec import TaskSpec

ROUGE_COLUMNS = ("rouge1", "rouge2", "rougeL")


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
               tracking: tuple[Any, str] | None = None) -> Row:
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
        client, experiment_id = tracking
        from mlflow.entities import Metric, Param
        run = client.create_run(experiment_id, run_name=f"bilstm-{task}", tags={"mtl.kind": "baseline-bilstm", "mtl.task": task})
        now = int(time.time() * 1000)
        client.log_batch(run.info.run_id,
                         metrics=[Metric(f"loss/{task}", v, now, s) for s, v in result.losses] +
                                 [Metric(f"dev/{task}/{m}", v, now, steps) for m, v in metrics.items()],
                         params=[Param("task", task), Param("steps", str(steps)), Param("batch_size", str(cfg.train.batch_size)),
                                 Param("model", "bilstm-attention"), Param("vocab", cfg.model.name)])
        client.set_terminated(run.info.run_id)
        run_ids.append(run.info.run_id)
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


def loss_figure(client, run_id: str, title: str):
    """Training-loss curves (one per task) from a run's MLflow metric history."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run = client.get_run(run_id)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in sorted(k for k in run.data.metrics if k.startswith("loss/") and k != "loss/total"):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        ax.plot([m.step for m in history], [m.value for m in history], label=key.removeprefix("loss/"))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig
