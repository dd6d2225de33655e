"""ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/predict.py --model MODEL --input FILES --out DIR

Batch inference with Ray Data: read rows from files, predict with a pool of model replicas
(`map_batches` over actors, one model copy each), write the rows with their predictions as Parquet
(or JSONL). Works on the local machine or on a cluster the same way.

    python jobs/predict.py --model mtl-default-1a2b3c4d --task rotten_tomatoes --input reviews.csv --out preds/
    python jobs/predict.py --model models:/mtl-default@champion --input 'data/*.jsonl' --out preds/ --replicas 4
    python jobs/predict.py --model RUN/best_model --task xsum --input docs.parquet --text-column document --out preds/

Input columns: `text` (or --text-column), optional `text_pair` (or --pair-column), and `task` unless
--task gives one task for every row. Output adds: label, label_id, score, summary (empty where the
task does not produce one). Formats: .csv, .tsv, .jsonl/.json, .parquet (by extension).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a working dir without install

from pipeline.errors import PipelineError, exits_on_bad_input  # noqa: E402
from pipeline.train.rundir import BEST_MODEL, MODEL_META, RUN_RECORD  # noqa: E402
from pipeline.runtime import default_storage, output_dir  # noqa: E402

READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run name, run folder, model folder (local or a URI such as s3://...), or models:/NAME@ALIAS")
    p.add_argument("--input", required=True, nargs="+", help="input files or globs")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--task", help="the task of every row (otherwise a `task` column is required)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--pair-column", default="text_pair")
    p.add_argument("--format", choices=["parquet", "jsonl"], default="parquet", help="output format (default: %(default)s)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (Ray actors, 1 CPU each; default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per model call (default: %(default)s)")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--storage-path", default=default_storage(), help="where run names are looked up: folder or URI (default: %(default)s)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ references")
    return p


def _model_folder(model: str, storage_path: str) -> str:
    """A local model folder, an MLflow reference, or a model folder's URI in an object store (every
    replica copies it down itself, so replicas on any node can load it)."""
    from pipeline import storage
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


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pipeline.runtime import init_ray
    from pipeline.train.tracking import tracking_uri

    start = time.monotonic()
    model = _model_folder(args.model, args.storage_path)
    init_ray()
    import ray
    cpus = ray.cluster_resources().get("CPU", 1)
    if args.replicas >= cpus:  # the read tasks need a CPU too, or the pipeline stalls
        raise PipelineError.one("--replicas", f"{args.replicas} replicas × 1 CPU leave no CPU for reading ({cpus:g} in the cluster)",
                                f"use at most {max(1, int(cpus) - 1)}")
    ds, n_files = read_inputs(args.input, args.text_column, args.pair_column, args.task)
    uri = tracking_uri(args.tracking_uri)
    from pipeline.eval.predict import ReplicaPredictor
    preds = ds.map_batches(ReplicaPredictor, fn_constructor_args=(model, uri, args.batch_size, args.num_beams),
                           batch_format="pandas", batch_size=args.batch_size * 4, concurrency=args.replicas, num_cpus=1)
    out = str(output_dir(args.out).resolve())
    if args.format == "parquet":
        preds.write_parquet(out)
    else:
        preds.write_json(out)
    rows = ray.data.read_parquet(out).count() if args.format == "parquet" else ray.data.read_json(out).count()
    print(f"predicted {rows:,} rows from {n_files} file(s) with {args.replicas} replica(s) in "
          f"{time.monotonic() - start:.0f}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
