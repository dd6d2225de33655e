"""ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/tune.py --config jobs/configs/tune_default.yaml

Search task loss weights, sampling ratios (and learning-rate knobs, dynamic weighting methods) with
Ray Tune. Each trial is a full multi-task training run (a TorchTrainer on its own workers) that
reports the dev multi-task score and every per-task metric at each evaluation; ASHA stops weak
trials early. Without a cluster it starts a local Ray instance:

    python jobs/tune.py --config jobs/configs/tune_default.yaml
    python jobs/tune.py --config jobs/configs/tune_default.yaml num_samples=4 train.steps=60 asha.grace_period=20
    python jobs/tune.py --config jobs/configs/tune_default.yaml --resume      # continue an interrupted experiment

Overrides whose first key is a tune-spec field (num_samples, search, asha.*, report_every, ...)
change the spec; the others (train.*, tasks.*, ...) the training config it names.

MLflow: one parent run per experiment (in the experiment `name`), one nested child run per trial
with its normalised weights, ratios and metrics. At the end, written to --out and logged to the
parent run: trials.md / trials.json (every trial's weights, ratios, score, status), best_config.yaml
(a training config `jobs/train.py --config` accepts as-is), weights_vs_score.png. With `register_as`
the best trial's best model becomes a new registered version with alias `challenger`; promoting it
to `champion` stays a human step (`jobs/register.py --promote`). With a `confirm:` stage (top_k, seeds,
overrides) the top trials and the training config's own values are retrained over seeds first; the
winner must beat the own values beyond noise (paired by seed) to become best_config.yaml and be
registered (confirm.md has the table). Trials and their checkpoints live
in train.storage_path: the experiment in `<name>/`, each trial's run in `<name>-<trial id>/`.
Exit status 2 means bad input.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a working dir without install

from pipeline.errors import exits_on_bad_input  # noqa: E402
from pipeline.runtime import init_ray, job_parser, output_dir  # noqa: E402

@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.set_defaults(config="jobs/configs/tune_default.yaml")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted experiment of this spec's name (finished trials are not rerun)")
    parser.add_argument("--out", help="where the summary files go (default: tune_results/<name>)")
    args = parser.parse_intermixed_args(argv)
    from pipeline.experiment import run_experiment, summarise
    from pipeline.tuning import load_tune_spec

    start = time.monotonic()
    spec, base = load_tune_spec(args.config, args.overrides)
    init_ray(verbose=args.verbose)
    grid, parent_run_id, uri, base = run_experiment(spec, base, resume=args.resume)
    out = output_dir(args.out or str(Path("tune_results") / spec.name))
    summary = summarise(grid, spec, base, parent_run_id, uri, out)
    print()
    print((out / "trials.md").read_text())
    best = summary["best"]
    print(f"best trial {best['trial']}: dev score {best['best_score']:.2f} "
          f"(weights {', '.join(f'{t} {w:.2f}' for t, w in best['weights'].items())}; "
          f"ratios {', '.join(f'{t} {p:.2f}' for t, p in best['ratios'].items())})")
    print(f"best config: {out / 'best_config.yaml'}  (python jobs/train.py --config {out / 'best_config.yaml'})")
    baseline = next((r for r in summary["rows"] if r["baseline"]), None)
    if baseline is not None:
        print(f"the training config's own values (trial {baseline['trial']}, {baseline['status']}, {baseline['steps']} steps): "
              f"dev score {baseline['best_score']:.2f}")
    if summary["confirm"]:
        print("\n" + summary["confirm"]["markdown"])
    if parent_run_id:
        print(f"MLflow parent run: {parent_run_id} ({uri})")
    print(f"took {time.monotonic() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
