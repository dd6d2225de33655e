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
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.config import Config, apply_overrides, config_to_dict, load_config
from pipeline.errors import PipelineError
from pipeline.eval.stats import Interval, interval, paired
from pipeline.tasks.spec import TaskSpec
from pipeline.tracking import ComparisonTracking, tracking_uri

ROUGE_COLUMNS = ("rouge1", "rouge2", "rougeL")
GPT_NOTE = ("GPT-3 / GPT-4 rows of the paper are not reproduced: they need hosted models (no network "
            "here, and their outputs are not open); compare against the paper's published numbers instead.")

# Published fine-tuning results of the CPU backbone's architecture: MiniLM-L6xH384's GLUE dev scores and XSum
# ROUGE-1 in microsoft/unilm, minilm/README.md (the README does not name MRPC's metric: it is checked against
# accuracy, the stricter of accuracy and F1). The packaged all-MiniLM-L6-v2 is that model further trained for
# sentence embeddings, so these are a reference, not the same checkpoint.
PUBLISHED = {"minilm-l6": {
    "source": "MiniLM-L6xH384, microsoft/unilm minilm/README.md (GLUE dev; XSum test, 108k steps at 464 source tokens)",
    "tasks": {"sst2": ("accuracy", 91.5), "mrpc": ("accuracy", 88.9), "rte": ("accuracy", 68.8),
              "cola": ("matthews", 47.5), "xsum": ("rouge1", 38.79)}}}
# The paper budget's targets (×100): 95% of the published score on SST-2, MRPC and RTE; CoLA MCC >= 40.
TARGETS = {**{t: 0.95 * PUBLISHED["minilm-l6"]["tasks"][t][1] for t in ("sst2", "mrpc", "rte")}, "cola": 40.0}


@dataclass
class Row:
    model: str
    metrics: dict[str, dict[str, float]]        # task -> metric -> value (the mean over seeds)
    steps: int                                  # train steps of one seed
    wall_seconds: float                         # over all seeds
    run_ids: list[str] = field(default_factory=list)
    note: str = ""
    per_seed: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)  # seed -> task -> metric -> value

    def values(self, task: str, metric: str) -> list[float]:
        """The metric over seeds (seed order); the mean alone when the row has no per-seed record."""
        if not self.per_seed:
            return [self.metrics[task][metric]] if metric in self.metrics.get(task, {}) else []
        return [m[task][metric] for _, m in sorted(self.per_seed.items()) if metric in m.get(task, {})]

    def scores(self, specs: dict[str, TaskSpec], kinds=("classification", "regression")) -> list[float]:
        """The row's average (`score`) per seed."""
        seeds = [m for _, m in sorted(self.per_seed.items())] or [self.metrics]
        return [v for v in (score(m, specs, kinds) for m in seeds) if v == v]


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


ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "prof", "gen", "gov", "sen", "rep", "rev", "jr", "sr", "no", "vs",
                 "etc", "u.s", "u.k", "e.g", "i.e", "jan", "feb", "aug", "sept", "oct", "nov", "dec", "inc", "ltd", "co"}


def lead_sentence(document: str) -> str:
    """The document's first sentence: the summarization literature's 'lead' baseline (XSum's paper, Narayan et
    al. 2018, reports LEAD at ROUGE-1/2/L 16.30/1.60/11.95 on its test set). A sentence ends at . ! or ?
    (with any closing quotes) before a space and a capital, a digit or a quote, unless the word is a common
    abbreviation (nltk's punkt would do this better, but its model is a download and this runs offline)."""
    text = " ".join(document.split())
    for match in re.finditer(r"[.!?][\"')\]]*(?= [A-Z0-9\"'])", text):
        word = text[:match.start()].rsplit(" ", 1)[-1].lower().strip("\"'(")
        if text[match.start()] == "." and (word in ABBREVIATIONS or len(word) == 1):
            continue
        return text[:match.end()]
    return text


def floor_row(cfg: Config, prepared: dict, specs: dict[str, TaskSpec]) -> Row:
    """What every model must beat, on the same dev rows: the training split's majority class for
    classification and the document's first sentence for summarization. Regression has none (a constant has
    no correlation): n/a. No training, no seeds."""
    from collections import Counter

    from pipeline.eval.metrics import task_metrics

    metrics: dict[str, dict[str, float]] = {}
    for t, spec in specs.items():
        dev = prepared[t].table("validation", limit=cfg.tasks[t].max_rows.get("validation"), shuffle_seed=cfg.data.dev_seed)
        if spec.kind == "classification":
            train = prepared[t].table("train", limit=cfg.tasks[t].max_rows.get("train"), shuffle_seed=cfg.seed,
                                      columns=["label"])
            majority = Counter(int(v) for v in train["label"].to_pylist()).most_common(1)[0][0]
            with warnings.catch_warnings():  # F1 of a one-class prediction: sklearn warns, the value (0 or low) stands
                warnings.simplefilter("ignore")
                metrics[t] = task_metrics(spec, [majority] * dev.num_rows, dev["label"].to_pylist())
        elif spec.kind == "summarization":
            metrics[t] = task_metrics(spec, [lead_sentence(d) for d in dev["text"].to_pylist()], dev["target"].to_pylist())
    return Row(FLOOR, metrics, 0, 0.0, note="no training")


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
                values = r.values(task, k)
                cells.append(interval(values).text(100) if values else "n/a")
        glue, everything = r.scores(specs), r.scores(specs, ("classification", "regression", "summarization"))
        cells += [interval(glue).text() if glue else "n/a", interval(everything).text() if everything else "n/a",
                  *((str(r.steps), f"{r.wall_seconds / 60:.1f} min") if r.steps else ("—", "—")),
                  ", ".join(i[:8] for i in r.run_ids) or "—"]
        lines.append("| " + " | ".join(cells) + " |")
    sub = [f"- {n}" for n in notes]
    return "\n".join(lines + [""] + sub) + "\n"


def published_markdown(model: str, rows: list[Row], specs: dict[str, TaskSpec], names: dict[str, str]) -> str:
    """The rows `names` maps (row name -> column title) beside the backbone's published scores and the paper
    budget's targets; empty when the backbone has no published record or no task of it is in the table."""
    record = PUBLISHED.get(model)
    tasks = [t for t in specs if record and t in record["tasks"]]
    if not tasks:
        return ""
    by_name = {r.model: r for r in rows}
    cols = [n for n in names if n in by_name]
    head = ["task", "metric", "published", "target", *(names[n] for n in cols)]
    lines = [f"Published reference: {record['source']}.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tasks:
        metric, published = record["tasks"][t]
        target = TARGETS.get(t)
        cells = [t, metric, f"{published:.1f}", "—" if target is None else f"≥ {target:.1f}"]
        for n in cols:
            values = by_name[n].values(t, metric)
            if not values:
                cells.append("n/a")
                continue
            mean = 100 * sum(values) / len(values)
            verdict = "" if target is None else (" (reached)" if mean >= target else f" (missed by {target - mean:.1f})")
            cells.append(f"{mean:.1f} = {mean / published:.0%} of published{verdict}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def learning_curves(tracking, units: "Units", seed: int, specs: dict[str, TaskSpec]) -> dict[str, dict[str, dict]]:
    """Per task, from one seed's MLflow runs: the multi-task model's and the single-task model's training loss
    and primary dev metric against the share of their run's steps (at the same share both have seen about as
    many of the task's rows: the sampler's ratios are fixed). task -> row -> {"loss": [(x, v)], "dev": [(x, v)]}."""
    def share(run: dict, key: str, scale: float = 1.0) -> list[tuple[float, float]]:
        return [(s / run["steps"], scale * v) for s, v in tracking.history(run["run_ids"][0], key)] if run else []
    out = {}
    mtl = units.get(MTL, seed)
    for task, spec in specs.items():
        single = units.get(SINGLE, seed, task)
        dev = f"dev/{task}/{spec.primary_metric}"
        out[task] = {row: {"loss": share(run, f"loss/{task}"), "dev": share(run, dev, 100.0)}
                     for row, run in ((MTL, mtl), (SINGLE, single)) if run and run["run_ids"]}
    return out


def curves_markdown(curves: dict[str, dict[str, dict]], specs: dict[str, TaskSpec], seed: int) -> str:
    """The learning curves as text: each evaluation's dev score, and the training loss in the first and last
    tenth of the run (still falling at the end = more steps would help)."""
    lines = [f"## Learning curves (seed {seed})", "",
             "Dev score (×100) at each evaluation, at its share of the run's steps; training loss averaged over the "
             "first and the last tenth of the run. Plot: learning_curves.png.", "",
             "| task | model | dev score by share of steps | loss, first tenth | loss, last tenth |", "|---|---|---|---:|---:|"]
    for task, rows in curves.items():
        for row, c in rows.items():
            dev = ", ".join(f"{x:.0%}: {v:.1f}" for x, v in c["dev"]) or "n/a"
            early, late = ([v for x, v in c["loss"] if keep(x)] for keep in (lambda x: x <= 0.1, lambda x: x > 0.9))
            lines.append(f"| {task} {specs[task].primary_metric} | {row} | {dev} | {_mean_text(early)} | {_mean_text(late)} |")
    return "\n".join(lines) + "\n"


def _mean_text(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f}" if values else "n/a"


def curves_figure(curves: dict[str, dict[str, dict]], specs: dict[str, TaskSpec]):
    """One panel per task: training loss (solid) and dev score (dots, right axis) against the share of steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, max(1, len(curves)), figsize=(3.2 * max(1, len(curves)), 3.2), squeeze=False)
    for ax, (task, rows) in zip(axes[0], curves.items()):
        right = ax.twinx()
        for i, (row, c) in enumerate(rows.items()):
            color = f"C{i}"
            ax.plot([x for x, _ in c["loss"]], [v for _, v in c["loss"]], color=color, lw=1, label=row.split(" (")[0])
            right.plot([x for x, _ in c["dev"]], [v for _, v in c["dev"]], "o--", color=color, ms=4)
        ax.set_title(task)
        ax.set_xlabel("share of the run's steps")
        ax.set_ylabel("training loss")
        right.set_ylabel(f"dev {specs[task].primary_metric} ×100")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


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


MTL = "multi-task (equal weights)"
SINGLE = "single-task"
BILSTM = "Bi-LSTM + attention"
FLOOR = "floor: majority class / lead sentence"
UNITS = "comparison.units.jsonl"


def variant_config(cfg: Config, name: str, overrides: list[str]) -> Config:
    """The multi-task config with a variant's overrides (`--variant annealed=sampling.strategy=annealed`);
    the same tasks, rows and budget."""
    raw = config_to_dict(cfg)
    apply_overrides(raw, overrides)
    raw["name"] = f"{cfg.name}-{slug(name)}"
    try:
        return Config.model_validate(raw)
    except Exception as err:  # noqa: BLE001 - the message names the variant and what did not validate
        raise PipelineError.one(f"--variant {name}", f"its overrides {overrides} do not make a valid config ({err})",
                                "fix the override (see docs/configuration.md)") from None


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


class Units:
    """What the comparison has finished: one JSON line per trained model (row, seed, task), appended the
    moment it ends. A rerun into the same folder skips them, and its training runs have fixed names, so an
    interrupted training run continues from its last checkpoint."""

    def __init__(self, folder: Path):
        self.path = folder / UNITS
        self.done: dict[tuple[str, int, str], dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    u = json.loads(line)
                    self.done[(u["row"], u["seed"], u["task"])] = u
        state = folder / "comparison.state.json"
        if not state.exists():
            import uuid
            state.write_text(json.dumps({"id": uuid.uuid4().hex[:6]}))
        self.id = json.loads(state.read_text())["id"]

    def get(self, row: str, seed: int, task: str = "*") -> dict | None:
        return self.done.get((row, seed, task))

    def add(self, row: str, seed: int, task: str, unit: Row, **extra) -> dict:
        record = {"row": row, "seed": seed, "task": task, "metrics": unit.metrics, "steps": unit.steps,
                  "wall_seconds": unit.wall_seconds, "run_ids": unit.run_ids, **extra}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.done[(row, seed, task)] = record
        return record

    def row(self, name: str, seeds: list[int]) -> Row | None:
        """The row's per-seed results merged over its per-task units; None when it has none."""
        units = [u for (r, s, _), u in self.done.items() if r == name and s in seeds]
        if not units:
            return None
        per_seed: dict[int, dict[str, dict[str, float]]] = {}
        for u in units:
            per_seed.setdefault(u["seed"], {}).update(u["metrics"])
        every = set.union(*(set(m) for m in per_seed.values()))
        complete = {s: m for s, m in per_seed.items() if set(m) == every}  # a seed still running is left out
        if not complete:
            return None
        tasks = {t for m in complete.values() for t in m}
        means = {t: {k: sum(m[t][k] for m in complete.values()) / len(complete) for k in next(iter(complete.values()))[t]}
                 for t in tasks}
        steps = sum(u["steps"] for u in units if u["seed"] == min(complete))
        return Row(name, means, steps, sum(u["wall_seconds"] for u in units), [i for u in units for i in u["run_ids"]],
                   per_seed=complete)


def run_comparison(cfg: Config, config_path: str, out: Path, command: str, *, seeds: int = 1,
                   variants: dict[str, list[str]] | None = None, tuned: str | None = None,
                   skip_single_task: bool = False, base_label: str | None = None,
                   say: Callable[[str], None] = print) -> Path:
    """Train and score every row with `seeds` seeds (cfg.seed, cfg.seed + 1, ...) on the same tasks and dev
    rows; write comparison.md / .json / .png to `out`, log a loss plot to every model's run and the table to a
    comparison run. Per seed the multi-task run trains first: its sampler's per-task step counts are that
    seed's single-task and Bi-LSTM budgets. Finished models are recorded in `out/comparison.units.jsonl`;
    rerunning the same command continues where it stopped. `base_label` renames the config's own multi-task
    row in the report (default: "equal weights"). Returns the Markdown report's path."""
    from pipeline.data.preprocess import prepare_tasks
    from pipeline.train.driver import dev_rows, train_driver

    specs = cfg.task_specs()
    mtl_configs = {MTL: cfg, **{f"multi-task ({n})": variant_config(cfg, n, o) for n, o in (variants or {}).items()}}
    if tuned:
        mtl_configs["multi-task (tuned)"] = tuned_config(cfg, tuned)
    prepared = prepare_tasks(cfg, bar=sys.stderr.isatty())  # fail on data problems before any training starts
    out.mkdir(parents=True, exist_ok=True)
    units = Units(out)
    tracking = ComparisonTracking.open(tracking_uri(cfg.tracking.uri), cfg.tracking.required,
                                       cfg.tracking.experiment or cfg.name)
    seed_list = [cfg.seed + i for i in range(seeds)]

    def trained(row: str, seed: int, task: str, c: Config) -> dict:
        if (done := units.get(row, seed, task)) is not None:
            return done
        c = c.model_copy(update={"seed": seed})
        say(f"\n=== {row}{'' if task == '*' else f' {task}'}, seed {seed}: {', '.join(c.tasks)} for {c.train.steps} steps ===")
        r = train_driver(c, config_path=config_path, progress=True,
                         run_name=f"{cfg.name}-cmp{units.id}-{slug(row)}{'' if task == '*' else f'-{task}'}-s{seed}")
        if tracking is not None and r.run_id:
            figure = loss_figure(tracking.loss_curves(r.run_id), f"{row}, seed {seed}")
            tracking.log_figure(r.run_id, figure, "training_loss.png")
            _close(figure)
        return units.add(row, seed, task, Row(row, r.dev_metrics, r.steps, r.wall_seconds, [r.run_id] if r.run_id else []),
                         task_steps=r.task_steps)

    for i, seed in enumerate(seed_list):
        say(f"\n##### seed {seed} ({i + 1} of {len(seed_list)})")
        steps = trained(MTL, seed, "*", cfg)["task_steps"]
        say(f"steps the multi-task sampler drew per task (seed {seed}): {steps}")
        for name, c in list(mtl_configs.items())[1:]:
            trained(name, seed, "*", c)
        if not skip_single_task:
            for t in cfg.tasks:
                if steps.get(t):
                    trained(SINGLE, seed, t, single_task_config(cfg, t, steps[t]))
        for t, spec in specs.items():
            if spec.kind != "summarization" and steps.get(t) and units.get(BILSTM, seed, t) is None:
                say(f"\n=== {BILSTM} {t}, seed {seed}: {steps[t]} steps ===")
                dev = dev_rows(prepared[t], cfg.tasks[t].max_rows.get("validation"), cfg.data.dev_seed)
                units.add(BILSTM, seed, t, run_bilstm(cfg.model_copy(update={"seed": seed}), prepared, t, steps[t], dev,
                                                      tracking))

    rows = [r for r in (units.row(n, seed_list) for n in [*mtl_configs, SINGLE, BILSTM]) if r is not None]
    rows.append(floor_row(cfg, prepared, specs))
    claims = paired_claims(rows, specs)
    base = {MTL: f"multi-task ({base_label})"} if base_label else {}
    for c in claims:
        c.left, c.right = base.get(c.left, c.left), base.get(c.right, c.right)
    names = {SINGLE: f"single-task ({cfg.model.name}, one model per task)", BILSTM: f"{BILSTM} (from scratch, one per task)",
             **base}  # the table's names say what the per-task rows are
    for r in rows:
        r.model = names.get(r.model, r.model)
    files = write_report(cfg, config_path, command, out, units, seed_list, rows, claims, names,
                         tracking if not skip_single_task else None, say)
    if tracking is not None:
        run_id = tracking.comparison(cfg.name, files, linked={r.model: r.run_ids for r in rows})
        say(f"MLflow comparison run: {run_id} ({tracking.uri})")
    return out / "comparison.md"


def write_report(cfg: Config, config_path: str, command: str, out: Path, units: Units, seed_list: list[int],
                 rows: list[Row], claims: list[Claim], names: dict[str, str], tracking, say) -> list[Path]:
    """comparison.md (table, paired differences, published numbers, the first seed's learning curves when
    `tracking` has them), comparison.json and the plots, in `out`; returns the files written."""
    specs = cfg.task_specs()
    task_steps = {u["seed"]: u["task_steps"] for (r, _, _), u in units.done.items() if r == MTL}
    report = (f"# Comparison: {cfg.name}\n\nCommand: `{command}`\n\nSeeds: {', '.join(map(str, seed_list))} "
              f"(mean ± 95% confidence interval, Student t over seeds)\n\n"
              + table_markdown(rows, specs, notes(cfg, task_steps[seed_list[0]]))
              + "\n## Paired differences (by seed)\n\n" + claims_markdown(claims, len(seed_list)))
    published = published_markdown(cfg.model.name, rows, specs, {names[SINGLE]: "single-task here",
                                                                 names.get(MTL, MTL): f"{names.get(MTL, MTL)} here"})
    if published:
        report += "\n## Against published numbers\n\n" + published
    files = [out / "comparison.md", out / "comparison.json", out / "comparison.png"]
    if tracking is not None:
        curves = learning_curves(tracking, units, seed_list[0], specs)
        if any(c["loss"] or c["dev"] for by_row in curves.values() for c in by_row.values()):
            report += "\n" + curves_markdown(curves, specs, seed_list[0])
            files.append(_save(curves_figure(curves, specs), out / "learning_curves.png"))
        else:
            say(f"learning curves: no metric history of seed {seed_list[0]}'s runs in {tracking.uri} (left out)")
    (out / "comparison.md").write_text(report)
    (out / "comparison.json").write_text(json.dumps(
        {"command": command, "config": config_path, "seeds": seed_list, "rows": [r.__dict__ for r in rows],
         "claims": [c.__dict__ for c in claims], "task_steps": task_steps,
         "published": PUBLISHED.get(cfg.model.name)}, indent=1, default=_json_default))
    _save(seeds_figure(rows, specs), out / "comparison.png")
    say("\n" + report)
    return files


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=120)
    _close(figure)
    return path


def _close(figure) -> None:
    import matplotlib.pyplot as plt
    plt.close(figure)


def _json_default(value):
    if isinstance(value, Interval):
        return value.__dict__
    raise TypeError(type(value))


@dataclass
class Claim:
    """One paired comparison: `left − right` on a task's primary metric (×100) or an average, by seed."""
    left: str
    right: str
    task: str
    metric: str
    difference: Interval

    @property
    def verdict(self) -> str:
        if self.difference.n < 2:
            return "one seed: no interval"
        if not self.difference.holds:
            return "within noise"
        return "holds: better" if self.difference.mean > 0 else "holds: worse"


def paired_claims(rows: list[Row], specs: dict[str, TaskSpec]) -> list[Claim]:
    """The multi-task (equal weights) row against single-task and Bi-LSTM per task and on the GLUE-style average;
    every other multi-task row against equal weights per task and on the all-task score. Paired by seed over
    the seeds both rows have."""
    by_name = {r.model: r for r in rows}
    base = by_name.get(MTL)
    if base is None:
        return []
    claims = []
    everything = ("classification", "regression", "summarization")

    def pair(left: Row, right: Row, task: str, metric: str) -> None:
        seeds = sorted(set(left.per_seed) & set(right.per_seed))
        if task in ("GLUE-style avg", "all-task score"):
            kinds = everything if task == "all-task score" else ("classification", "regression")
            a = [score(left.per_seed[s], specs, kinds) for s in seeds]
            b = [score(right.per_seed[s], specs, kinds) for s in seeds]
        else:
            a = [100 * left.per_seed[s][task][metric] for s in seeds if task in left.per_seed[s]]
            b = [100 * right.per_seed[s][task][metric] for s in seeds if task in right.per_seed[s]]
        if a and len(a) == len(b) and all(x == x for x in a + b):
            claims.append(Claim(left.model, right.model, task, metric, paired(a, b)))

    for other in (by_name.get(SINGLE), by_name.get(BILSTM)):
        if other is None:
            continue
        for t, spec in specs.items():
            if t in other.metrics:
                pair(base, other, t, spec.primary_metric)
        pair(base, other, "GLUE-style avg", "mean")
    for r in rows:
        if r.model.startswith("multi-task") and r is not base:
            for t, spec in specs.items():
                pair(r, base, t, spec.primary_metric)
            pair(r, base, "all-task score", "mean")
    return claims


def claims_markdown(claims: list[Claim], seeds: int) -> str:
    if not claims:
        return "No paired comparisons (one row only).\n"
    lines = ["| comparison | task | metric | difference ×100 | 95% interval | verdict |", "|---|---|---|---|---|---|"]
    for c in claims:
        d = c.difference
        span = "n/a" if d.n < 2 else f"[{d.low:+.1f}, {d.high:+.1f}]"
        lines.append(f"| {c.left} − {c.right} | {c.task} | {c.metric} | {d.mean:+.1f} | {span} | {c.verdict} |")
    held = [c for c in claims if c.difference.holds]
    words = [""]
    if seeds < 2:
        words.append("One seed: no difference is supported or ruled out; rerun with `--seeds 3` or more.")
    else:
        words.append(f"{len(held)} of {len(claims)} differences hold (their interval over {seeds} seeds excludes 0):")
        words += [f"- {c.left} is {'better' if c.difference.mean > 0 else 'worse'} than {c.right} on {c.task} "
                  f"({c.difference.mean:+.1f}, interval [{c.difference.low:+.1f}, {c.difference.high:+.1f}])" for c in held]
        if len(held) < len(claims):
            words.append(f"The other {len(claims) - len(held)} are within noise: no claim either way.")
    return "\n".join(lines + words) + "\n"


def seeds_figure(rows: list[Row], specs: dict[str, TaskSpec]):
    """Per task (primary metric, or ROUGE-1): every row's per-seed points and its mean ± 95% interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(specs)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = "rouge1" if specs[task].kind == "summarization" else specs[task].primary_metric
        for x, r in enumerate(rows):
            values = [100 * v for v in r.values(task, metric)]
            if not values:
                continue
            ax.scatter([x] * len(values), values, s=12, alpha=0.6, label="seeds" if x == 0 else None)
            iv = interval(values)
            ax.errorbar([x + 0.15], [iv.mean], yerr=[[0 if iv.half != iv.half else iv.half]] * 2, fmt="o", color="black",
                        capsize=3)
        ax.set_xticks(range(len(rows)), [r.model.split(" (")[0] if not r.model.startswith("multi-task") else
                                         r.model.removeprefix("multi-task ") for r in rows], rotation=60, ha="right",
                      fontsize=7)
        ax.set_title(f"{task} {metric}", fontsize=9)
    fig.tight_layout()
    return fig


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
    lines.append(f"`{FLOOR}`: what a model must beat on the same dev rows, without training: every dev row given "
                 "the training split's most frequent class, every document summarized by its first sentence (LEAD); "
                 "regression has no such floor (n/a).")
    if summarization:
        lines.append(f"Bi-LSTM rows have no summarization model ({', '.join(summarization)}: n/a); the paper's "
                     "LSTM encoder-decoder baseline is not implemented.")
    return lines + [GPT_NOTE]
