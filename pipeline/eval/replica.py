"""Batch prediction with Ray Data: files in, one model copy per actor (from a folder, an object store or
MLflow), Parquet/JSONL out.

    rows = predict_files(["in/*.csv"], "out/", model_location("mtl-default-1a2b", storage), replicas=2)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.eval.predict import Predictor, predict_frame
from pipeline.model.multitask import MODEL_META
from pipeline.registry import load_predictor
from pipeline.storage import download, is_uri

READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class ReplicaPredictor:
    """One model copy per Ray Data actor (`map_batches(ReplicaPredictor, concurrency=N)`), called on
    pandas batches of (task, text[, text_pair]); returns the batch with the prediction columns added."""

    def __init__(self, model: str, tracking_uri: str | None = None, batch_size: int = 32, num_beams: int = 1):
        if model.startswith(("models:/", "runs:/")):
            self.predictor = load_predictor(model, tracking_uri)
        elif is_uri(model):  # a model folder in an object store: this replica's own copy
            self.predictor = Predictor(download(model, Path(tempfile.mkdtemp(prefix="mtl-replica-")) / "model"))
        else:
            self.predictor = Predictor(model)
        self.params = {"batch_size": batch_size, "num_beams": num_beams}

    def __call__(self, batch):
        preds = predict_frame(self.predictor, batch, self.params)
        return batch.assign(**{c: preds[c] for c in preds.columns if c != "task"})


def model_location(model: str, storage_path: str) -> str:
    """A local model folder, an MLflow reference, or a model folder's URI in an object store (every
    replica copies it down itself, so replicas on any node can load it)."""
    from pipeline import storage
    from pipeline.train.rundir import BEST_MODEL, RUN_RECORD
    if model.startswith(("models:/", "runs:/")):
        return model
    if storage.is_uri(model) or (not Path(model).expanduser().exists() and storage.is_uri(storage_path)):
        location = model if storage.is_uri(model) else storage.join(storage_path, model)
        if storage.is_file(storage.join(location, RUN_RECORD)):
            location = storage.join(location, BEST_MODEL)
        if not storage.is_file(storage.join(location, MODEL_META)):
            raise PipelineError.one("--model", f"{location} is not a model folder or run folder",
                                    "pass a run name under --storage-path, a run or model folder URI, or models:/NAME@champion")
        return location
    path = Path(model).expanduser()
    if not path.exists():
        path = Path(storage_path).expanduser() / model
    if (path / RUN_RECORD).is_file():
        path = path / BEST_MODEL
    if not (path / MODEL_META).is_file():
        raise PipelineError.one("--model", f"{model} is not a model folder, run folder, run name or models:/ URI",
                                "pass e.g. a run name, RUN/best_model, or models:/NAME@champion")
    return str(path.resolve())


def read_inputs(patterns: list[str], text_col: str, pair_col: str, task: str | None):
    import glob

    import ray.data
    files = sorted({f for p in patterns for f in (glob.glob(p) or [p])})
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise PipelineError.one("--input", f"no such file: {', '.join(missing)}", "check the path or the glob (quote globs)")
    kinds = {READERS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise PipelineError.one("--input", f"files must share one of {', '.join(READERS)}; got {', '.join(files)}",
                                "convert them, or run the job once per format")
    kind = kinds.pop()
    paths = [str(Path(f).resolve()) for f in files]
    if kind == "tsv":
        import pyarrow.csv as pacsv
        ds = ray.data.read_csv(paths, parse_options=pacsv.ParseOptions(delimiter="\t"))
    else:
        ds = getattr(ray.data, f"read_{kind}")(paths)
    columns = ds.columns()
    problems = []
    if text_col not in columns:
        problems.append(f"no {text_col!r} column (columns: {', '.join(columns)})")
    if task is None and "task" not in columns:
        problems.append("no 'task' column and no --task")
    if problems:
        raise PipelineError.one(files[0], "; ".join(problems), "pass --text-column/--task, or add the columns")
    rename = {text_col: "text"} if text_col != "text" else {}
    if pair_col in columns and pair_col != "text_pair":
        rename[pair_col] = "text_pair"
    if rename:
        ds = ds.rename_columns(rename)
    if task is not None:
        ds = ds.add_column("task", lambda df: [task] * len(df), batch_format="pandas")
    return ds, len(files)


def predict_files(patterns: list[str], out: str, model: str, *, task: str | None = None, text_column: str = "text",
                  pair_column: str = "text_pair", replicas: int = 1, batch_size: int = 64, num_beams: int = 1,
                  tracking_uri: str | None = None, fmt: str = "parquet") -> tuple[int, int]:
    """Predict every row of the input files with `replicas` model actors (1 CPU each); (rows written, files read)."""
    import ray
    cpus = ray.cluster_resources().get("CPU", 1)
    if replicas >= cpus:  # the read tasks need a CPU too, or the pipeline stalls
        raise PipelineError.one("--replicas", f"{replicas} replicas × 1 CPU leave no CPU for reading ({cpus:g} in the cluster)",
                                f"use at most {max(1, int(cpus) - 1)}")
    ds, n_files = read_inputs(patterns, text_column, pair_column, task)
    preds = ds.map_batches(ReplicaPredictor, fn_constructor_args=(model, tracking_uri, batch_size, num_beams),
                           batch_format="pandas", batch_size=batch_size * 4, concurrency=replicas, num_cpus=1)
    if fmt == "parquet":
        preds.write_parquet(out)
        return ray.data.read_parquet(out).count(), n_files
    preds.write_json(out)
    return ray.data.read_json(out).count(), n_files
