"""ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/train.py --config jobs/configs/default.yaml

Multi-task training: preprocess (or read the cache), then train one shared backbone with a head per
task on Ray Train workers under DeepSpeed ZeRO, tracked in MLflow. Prints progress, the final
per-task dev metrics and the MLflow run id. Without a cluster it starts a local Ray instance:

    python jobs/train.py --config jobs/configs/default.yaml train.steps=100 train.zero_stage=2
    python jobs/train.py --config jobs/configs/default.yaml --resume          # continue the latest run
    python jobs/train.py --config jobs/configs/default.yaml --smoke           # a 2-minute check

Runs live in train.storage_path (default ~/.cache/mtl-pipeline/runs): checkpoints, best_model/,
final_model/. MLflow: tracking.uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db
(view with `mlflow ui --backend-store-uri sqlite:///mlflow.db`). Exit status 2 means bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a working dir without install

from pipeline.config import load_config  # noqa: E402
from pipeline.errors import exits_on_bad_input  # noqa: E402
from pipeline.runtime import init_ray, job_parser  # noqa: E402

# Small enough for CI on 2 cores, large enough to exercise evaluation, checkpoints and both tasks.
SMOKE = ["train.steps=8", "train.log_every=4", "train.eval_every=8", "train.checkpoint_every=8", "train.batch_size=8",
         "train.warmup_steps=0"]
SMOKE_ROWS = {"train": 128, "validation": 32}


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                        help="continue the latest run of this config's name, or the named run")
    parser.add_argument("--smoke", action="store_true", help="a few steps on a few rows: checks the whole path")
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if isinstance(args.resume, str) and "=" in args.resume:  # `--resume key=value`: an override, not a run name
        overrides.append(args.resume)
        args.resume = True
    if args.smoke:
        raw = load_config(args.config, overrides)
        overrides = SMOKE + [f"tasks.{t}.max_rows={SMOKE_ROWS}" for t in raw.tasks] + overrides
    cfg = load_config(args.config, overrides)

    init_ray(verbose=args.verbose)
    from pipeline.train.driver import train_driver
    from pipeline.train.failure import RunFailed
    try:
        result = train_driver(cfg, resume=args.resume, config_path=args.config, progress=True,
                              overrides=(["--smoke"] if args.smoke else []) + list(args.overrides))
    except RunFailed as err:  # one line: what died, the last checkpoint, the --resume command
        print(f"\n{err}", file=sys.stderr, flush=True)
        return 1

    print(f"\nrun {result.run_name}: {result.steps} steps in {result.wall_seconds:.0f}s; "
          f"best dev score {result.best_score:.2f}")
    print(f"{'task':<18}{'metric':<12}{'dev':>8}")
    for task, metrics in result.dev_metrics.items():
        for name, value in metrics.items():
            print(f"{task:<18}{name:<12}{value:>8.4f}")
    print(f"models: {result.run_dir}/best_model, {result.run_dir}/final_model")
    if result.run_id:
        print(f"MLflow run id: {result.run_id} ({result.tracking_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
