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

from pipeline.errors import exits_on_bad_input  # noqa: E402
from pipeline.runtime import default_storage, output_dir  # noqa: E402


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
    p.add_argument("--verbose", action="store_true", help="library log lines (Ray Data, MLflow) on the console too")
    return p


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pipeline.eval.replica import model_location, predict_files
    from pipeline.runtime import init_ray
    from pipeline.tracking import tracking_uri

    start = time.monotonic()
    model = model_location(args.model, args.storage_path)
    init_ray(verbose=args.verbose)
    out = str(output_dir(args.out).resolve())
    rows, n_files = predict_files(args.input, out, model, task=args.task, text_column=args.text_column,
                                  pair_column=args.pair_column, replicas=args.replicas, batch_size=args.batch_size,
                                  num_beams=args.num_beams, tracking_uri=tracking_uri(args.tracking_uri), fmt=args.format)
    print(f"predicted {rows:,} rows from {n_files} file(s) with {args.replicas} replica(s) in "
          f"{time.monotonic() - start:.0f}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
