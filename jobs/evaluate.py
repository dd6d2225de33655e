"""ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/evaluate.py --model RUN_OR_URI

Evaluate a trained multi-task model on any of its tasks and splits; print a per-task table, write
Markdown and JSON, and record them in MLflow (an evaluation run in the training run's experiment,
tagged with the run it evaluates). One process, no Ray Train; reads the preprocessed cache.

    python jobs/evaluate.py --model mtl-default-1a2b3c4d                   # a run name: its best_model
    python jobs/evaluate.py --model models:/mtl-default@champion --splits validation,test
    python jobs/evaluate.py --model RUN_DIR/final_model --tasks sst2 --max-rows 200
    python jobs/evaluate.py --model RUN_DIR/step_0000075                    # a checkpoint (any ZeRO stage)
    python jobs/evaluate.py --model RUN --tasks sst2,mrpc,stsb --splits test --glue-submission glue_out/

By default the evaluation reproduces the run's own dev evaluation (same rows, seed, batch size and
batch composition), so its dev metrics equal the ones the run logged.
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
    p.add_argument("--model", required=True,
                   help="run name, run folder, checkpoint (RUN/step_N), model folder, or MLflow URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model)")
    p.add_argument("--which", default="best_model", choices=["best_model", "final_model"],
                   help="for a run: which of its models (default: %(default)s)")
    p.add_argument("--tasks", help="comma-separated tasks (default: every task the model predicts)")
    p.add_argument("--splits", default="validation", help="comma-separated: train, validation, test (default: %(default)s)")
    p.add_argument("--max-rows", type=int, help="rows per task and split (default: the run's dev limit for validation, all otherwise)")
    p.add_argument("--batch-size", type=int, help="default: the run's eval batch size")
    p.add_argument("--num-beams", type=int, default=1, help="beam width for summarization (default: greedy)")
    p.add_argument("--config", help="config for data settings and task definitions (default: the run's own)")
    p.add_argument("--storage-path", default=default_storage(), help="where run names are looked up: folder or URI (default: %(default)s)")
    p.add_argument("--out", default="eval_results", help="folder for results.md / results.json (default: %(default)s)")
    p.add_argument("--glue-submission", metavar="DIR", help="also write GLUE benchmark files for test-split predictions")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="do not record the evaluation in MLflow")
    return p


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pipeline.eval.evaluate import (evaluate_model, markdown, open_model, score, write_glue_submission,
                                        write_results)
    from pipeline.tracking import log_evaluation, tracking_uri

    start = time.monotonic()
    opened = open_model(args.model, storage_path=args.storage_path, which=args.which, config_path=args.config,
                        tracking_uri=args.tracking_uri)
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    results = evaluate_model(opened, tasks, splits, max_rows=args.max_rows, batch_size=args.batch_size,
                             num_beams=args.num_beams)
    dev_score = score(results, opened.config)
    table = markdown(results, f"Evaluation of {args.model}") + (f"\nmulti-task score (validation): {dev_score:.2f}\n"
                                                                if dev_score == dev_score else "")
    print(table)

    out = output_dir(args.out)
    files = write_results(out, args.model, opened, results, dev_score, table)
    written = write_glue_submission(results, opened.predictor, args.glue_submission) if args.glue_submission else []
    for path in written:
        print(f"GLUE submission file: {path}")
    print(f"results: {', '.join(map(str, files))} ({time.monotonic() - start:.0f}s)")

    if not args.no_mlflow:
        uri = tracking_uri(args.tracking_uri)
        run_id = log_evaluation(uri, opened.reference, opened.run_id, results, dev_score, files, written)
        if run_id:
            print(f"MLflow evaluation run: {run_id} ({uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
