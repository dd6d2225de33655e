"""ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/register.py --run RUN --name NAME

Put a run's model into the MLflow model registry, and move aliases.

    python jobs/register.py --run mtl-default-1a2b3c4d --name mtl-default              # new version, alias challenger
    python jobs/register.py --run RUN --name mtl-default --alias champion              # straight to champion
    python jobs/register.py --run RUN --name mtl-default --promote-if-better           # champion if its dev score is higher
    python jobs/register.py --name mtl-default --promote 3                             # move champion to version 3

Registering logs the run's model folder (`best_model/` by default) as an MLflow pyfunc model of the
training run — input: a DataFrame of task, text, text_pair; output: label, label_id, score, summary —
with a signature and an input example, then creates a version tagged with the run's dev metrics.
Load it anywhere with `mlflow.pyfunc.load_model("models:/NAME@champion")`, or serve it:
`mlflow models serve -m models:/NAME@champion --env-manager local -h 127.0.0.1 -p 5001`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a working dir without install

from pipeline.errors import PipelineError, exits_on_bad_input  # noqa: E402
from pipeline.train.rundir import RUN_RECORD  # noqa: E402
from pipeline.runtime import default_storage  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--run", help="run name or run folder whose model to register")
    p.add_argument("--which", default="best_model", choices=["best_model", "final_model"], help="default: %(default)s")
    p.add_argument("--alias", default="challenger", help="alias for the new version (default: %(default)s)")
    p.add_argument("--promote-if-better", action="store_true",
                   help="also make the new version `champion` when its dev score beats the current champion's")
    p.add_argument("--promote", metavar="VERSION", help="point an alias (--alias, default champion) at an existing version")
    p.add_argument("--storage-path", default=default_storage(), help="where run names are looked up: folder or URI (default: %(default)s)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    return p


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pipeline import storage
    from pipeline.registry import promote_version, register_finished_run, registry_client
    from pipeline.tracking import tracking_uri

    client = registry_client(tracking_uri(args.tracking_uri))
    if args.promote:
        alias = args.alias if args.alias != "challenger" else "champion"
        before = promote_version(client, args.name, args.promote, alias)
        print(f"{args.name}@{alias}: version {before or '(unset)'} -> {args.promote}")
        return 0
    if not args.run:
        raise PipelineError.one("--run", "is required to register a model", "pass --run RUN, or --promote VERSION")
    candidates = [args.run, storage.join(storage.resolve(args.storage_path), args.run)]
    run_dir = next((c for c in candidates if storage.is_file(storage.join(c, RUN_RECORD))), None)
    if run_dir is None:
        raise PipelineError.one("--run", f"no run {args.run!r} (looked for run.json in {' and '.join(candidates)})",
                                "pass a run folder or a run name under --storage-path")
    register_finished_run(client, run_dir, args.name, which=args.which, alias=args.alias,
                          promote_if_better=args.promote_if_better, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
