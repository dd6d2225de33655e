"""Evaluate a saved multi-task model on tasks and splits from the preprocessed cache.

    opened = open_model("mtl-default-1a2b3c4d")             # run name / run dir / model folder / models:/… URI
    report = evaluate_model(opened, ["rotten_tomatoes"], ["validation"])
    print(markdown(report))

A model reference resolves to a `Predictor` plus the config it was trained with (from the run folder's
`run.json`, or from the MLflow run that logged a registry model), so the evaluation reads the same
cached rows the run's own evaluation read. Unlabelled splits (GLUE test) give predictions, no metrics.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.config import Config, load_config
from pipeline.errors import PipelineError
from pipeline.eval.metrics import multitask_score, task_metrics
from pipeline.storage import is_uri, join
from pipeline.eval.predict import Predictor
from pipeline.train.rundir import DS_TAG, MODEL_META, RUN_RECORD

# GLUE benchmark submission files: our task -> (file name, label written as the class name?)
GLUE_SUBMISSION = {"cola": ("CoLA.tsv", False), "sst2": ("SST-2.tsv", False), "mrpc": ("MRPC.tsv", False),
                   "qqp": ("QQP.tsv", False), "stsb": ("STS-B.tsv", False), "mnli": ("MNLI-m.tsv", True),
                   "qnli": ("QNLI.tsv", True), "rte": ("RTE.tsv", True), "wnli": ("WNLI.tsv", False)}


@dataclass
class OpenedModel:
    predictor: Predictor
    reference: str
    config: Config            # the training config (data settings, task definitions, evaluation rows)
    run_id: str | None = None  # the MLflow run that trained it, when known
    run_dir: str | None = None


@dataclass
class SplitResult:
    task: str
    split: str
    rows: int
    metrics: dict[str, float]
    ids: list[str] = field(repr=False)
    predictions: list = field(repr=False)
    references: list | None = field(repr=False, default=None)


def _config_from(raw: dict, where: str) -> Config:
    try:
        return Config.model_validate(raw)
    except Exception as err:  # a run from an older config schema
        raise PipelineError.one(where, f"its recorded config no longer validates ({str(err).splitlines()[0]})",
                                "evaluate with --config pointing at a current config for the same model and tasks")


def open_model(reference: str, *, storage_path: str | None = None, which: str = "best_model",
               config_path: str | None = None, tracking_uri: str | None = None) -> OpenedModel:
    """Resolve `reference`: `models:/name@alias` or `models:/name/version` or `runs:/id/model` (MLflow),
    a model folder (holds mtl_model.json), a run folder (holds run.json: its `which` model), a checkpoint
    (`<run>/step_NNNNNNN`, consolidated into a temporary folder), or a run name under `storage_path`."""
    from pipeline.tracking import tracking_uri as default_uri
    if reference.startswith(("models:/", "runs:/", "m-")):
        from pipeline.registry import load_predictor, model_run_id
        from pipeline.tracking import read_run_text
        uri = default_uri(tracking_uri)
        try:
            predictor = load_predictor(reference, uri)
        except Exception as err:
            raise PipelineError.one(reference, f"cannot be loaded from MLflow at {uri} ({str(err).splitlines()[0]})",
                                    "check the name/alias with `mlflow models` or the UI, and tracking.uri") from None
        run_id = predictor.meta.get("run_id") or model_run_id(uri, reference)
        cfg = None
        if config_path is None and run_id:
            recorded = read_run_text(uri, run_id, "config/resolved_config.json")
            cfg = _config_from(json.loads(recorded), reference) if recorded is not None else None
        return OpenedModel(predictor, reference, cfg or _fallback_config(predictor, config_path), run_id)
    path = Path(reference).expanduser()
    if is_uri(reference):
        path = _fetch(reference, which)
    elif not path.exists() and storage_path is not None:
        path = _fetch(join(storage_path, reference), which) if is_uri(storage_path) else Path(storage_path).expanduser() / reference
    if (path / DS_TAG).is_dir() and (path.parent / RUN_RECORD).is_file():  # a checkpoint: consolidate it first
        import tempfile

        from pipeline.train.export import consolidate_checkpoint
        folder = consolidate_checkpoint(path, Path(tempfile.mkdtemp(prefix="mtl-eval-")) / path.name)
        run = json.loads((path.parent / RUN_RECORD).read_text())
        cfg = load_config(config_path) if config_path else _config_from(run["config"], f"{path.parent}/run.json")
        return OpenedModel(Predictor(folder), reference, cfg, run.get("run_id"), str(path.parent))
    if (path / RUN_RECORD).is_file():
        run = json.loads((path / RUN_RECORD).read_text())
        folder = path / which
        if not (folder / MODEL_META).is_file():
            raise PipelineError.one(reference, f"the run has no {which}/ yet (it has not evaluated or finished)",
                                    "evaluate a checkpoint after `jobs/export.py --run RUN --out DIR`, or wait for the run")
        predictor = Predictor(folder)
        cfg = load_config(config_path) if config_path else _config_from(run["config"], f"{path}/run.json")
        return OpenedModel(predictor, reference, cfg, run.get("run_id"), str(path))
    if (path / MODEL_META).is_file():
        predictor = Predictor(path)
        run_dir = path.parent if (path.parent / RUN_RECORD).is_file() else None
        if config_path is None and run_dir is not None:
            cfg = _config_from(json.loads((run_dir / RUN_RECORD).read_text())["config"], f"{run_dir}/run.json")
        else:
            cfg = _fallback_config(predictor, config_path)
        return OpenedModel(predictor, reference, cfg, predictor.meta.get("run_id"), str(run_dir) if run_dir else None)
    raise PipelineError.one(reference, "is not a model folder (mtl_model.json), a run folder (run.json), a run name "
                            f"under {storage_path}, or an MLflow models:/ or runs:/ URI",
                            "pass e.g. ~/.cache/mtl-pipeline/runs/<run>, <run>/best_model or models:/<name>@champion")


def _fetch(location: str, which: str) -> Path:
    """A local copy of a run, model folder or checkpoint kept in an object store: a run's run.json and
    its `which` model, or the whole folder (plus the run.json beside it); removed at exit."""
    import atexit
    import shutil
    import tempfile

    from pipeline import storage
    tmp = Path(tempfile.mkdtemp(prefix="mtl-eval-"))
    atexit.register(shutil.rmtree, tmp, True)
    dest = tmp / location.rstrip("/").rsplit("/", 1)[-1]
    if storage.is_file(join(location, RUN_RECORD)):
        dest.mkdir()
        (dest / RUN_RECORD).write_text(storage.read_text(join(location, RUN_RECORD)))
        if storage.is_dir(join(location, which)):
            storage.download(join(location, which), dest / which)
    elif storage.is_dir(location):
        storage.download(location, dest)
        parent = location.rstrip("/").rsplit("/", 1)[0]
        if storage.is_file(join(parent, RUN_RECORD)):
            (tmp / RUN_RECORD).write_text(storage.read_text(join(parent, RUN_RECORD)))
    return dest


def _fallback_config(predictor: Predictor, config_path: str | None) -> Config:
    """No recorded config: the given (or default) config with the model's backbone and tasks."""
    tasks = {t: {} for t in predictor.tasks}
    overrides = [f"model.name={predictor.meta['model']}", f"model.max_length={predictor.max_length}",
                 f"tasks={json.dumps(tasks)}"]
    return load_config(config_path or str(Path(__file__).resolve().parents[2] / "jobs" / "configs" / "default.yaml"),
                       overrides)


def evaluate_model(opened: OpenedModel, tasks: list[str] | None = None, splits: tuple[str, ...] = ("validation",), *,
                   max_rows: int | None = None, batch_size: int | None = None, world: int | None = None,
                   num_beams: int = 1, log: Callable[[str], None] = print) -> list[SplitResult]:
    """Predict and score every (task, split). Defaults reproduce the run's own dev evaluation: its row
    limit, seed, batch size and batch composition (`world` ranks)."""
    from pipeline.data.preprocess import prepare_tasks

    predictor, cfg = opened.predictor, opened.config
    tasks = tasks or list(predictor.tasks)
    missing = [t for t in tasks if t not in predictor.tasks]
    if missing:
        raise PipelineError.one("--tasks", f"the model has no head for {', '.join(missing)}",
                                f"choose from {', '.join(predictor.tasks)}")
    evaluation = predictor.meta.get("evaluation", {})
    absent = [t for t in tasks if t not in cfg.tasks]
    if absent:
        raise PipelineError.one("--config", f"the config has no task(s) {', '.join(absent)} that the model predicts",
                                "pass a --config that declares them (user-defined tasks need their define: block)")
    cfg = cfg.model_copy(update={"tasks": {t: cfg.tasks[t] for t in tasks}})
    prepared = prepare_tasks(cfg, log=log)
    specs = cfg.task_specs()
    results = []
    for task in tasks:
        for split in splits:
            if prepared[task].rows(split) == 0:
                log(f"{task}: no {split} rows; skipped")
                continue
            limit = max_rows if max_rows is not None else (
                evaluation.get("max_rows", {}).get(task) if split == "validation" else None)
            table = prepared[task].table(split, limit=limit, shuffle_seed=evaluation.get("seed", cfg.seed))
            rows = table.to_pylist()
            inputs = {"input_ids": [r["input_ids"] for r in rows]}
            if "token_type_ids" in table.column_names:
                inputs["token_type_ids"] = [r["token_type_ids"] for r in rows]
            log(f"{task}/{split}: predicting {len(rows):,} rows")
            preds = predictor.predict_ids(task, inputs, batch_size or evaluation.get("batch_size", 32),
                                          world=world or evaluation.get("world", 1), num_beams=num_beams)
            summarization = specs[task].kind == "summarization"
            refs = [r["target"] if summarization else r["label"] for r in rows]
            labelled = all(x is not None for x in refs)  # GLUE test rows carry no label
            metrics = task_metrics(specs[task], preds, refs) if labelled else {}
            results.append(SplitResult(task, split, len(rows), metrics, [r["id"] for r in rows], preds,
                                       refs if labelled else None))
    return results


def score(results: list[SplitResult], config: Config, split: str = "validation") -> float:
    specs = config.task_specs()
    per_task = {r.task: r.metrics for r in results if r.split == split and r.metrics and r.task in specs}
    return multitask_score(per_task, specs) if per_task else math.nan


def markdown(results: list[SplitResult], title: str | None = None) -> str:
    lines = ([f"## {title}", ""] if title else []) + ["| task | split | rows | metric | value |", "|---|---|---|---|---|"]
    for r in results:
        if not r.metrics:
            lines.append(f"| {r.task} | {r.split} | {r.rows} | (unlabelled: predictions only) | |")
        for name, value in r.metrics.items():
            lines.append(f"| {r.task} | {r.split} | {r.rows} | {name} | {value:.4f} |")
    return "\n".join(lines) + "\n"


def write_glue_submission(results: list[SplitResult], predictor: Predictor, folder: str | Path) -> list[Path]:
    """GLUE benchmark files (`index<TAB>prediction`) for the GLUE tasks' test predictions."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for r in results:
        if r.split != "test" or r.task not in GLUE_SUBMISSION:
            continue
        fname, by_name = GLUE_SUBMISSION[r.task]
        task = predictor.tasks[r.task]
        lines = ["index\tprediction"]
        order = sorted(range(len(r.ids)), key=lambda i: int(r.ids[i]) if r.ids[i].isdigit() else r.ids[i])
        for i in order:
            p = r.predictions[i]
            if task["kind"] == "regression":
                lo, hi = task.get("label_range") or (-math.inf, math.inf)
                value = f"{min(max(float(p), lo), hi):.3f}"
            else:
                value = predictor.label_name(r.task, p) if by_name else str(int(p))
            lines.append(f"{r.ids[i]}\t{value}")
        (folder / fname).write_text("\n".join(lines) + "\n")
        written.append(folder / fname)
    return written


def write_results(out: Path, model: str, opened: OpenedModel, results: list, score: float, table: str) -> list[Path]:
    """results.md (the table) and results.json (metrics and every prediction) in `out`; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table)
    payload = {"model": model, "run_id": opened.run_id, "score": score,
               "results": [{"task": r.task, "split": r.split, "rows": r.rows, "metrics": r.metrics} for r in results],
               "predictions": {f"{r.task}/{r.split}": {"ids": r.ids, "predictions": r.predictions} for r in results}}
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    return [out / "results.md", out / "results.json"]
