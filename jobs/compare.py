"""ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/compare.py --budget small data.glue_dir=GLUE

The paper's comparison table: the multi-task model (equal weights, and a tuned config when given)
against single-task models on the same backbone and the Bi-LSTM + attention baseline, on the same
tasks and dev rows. Writes `comparison.md` / `comparison.json`, logs them to an MLflow run, and logs a
training-loss plot (PNG) to every model's MLflow run.

    python jobs/compare.py --budget small data.glue_dir=path/to/glue          # 3 seeds
    python jobs/compare.py --config jobs/configs/glue.yaml data.glue_dir=path/to/glue train.steps=3000
    python jobs/compare.py --budget small --tuned best_config.yaml data.glue_dir=path/to/glue
    python jobs/compare.py --budget small --variant annealed=sampling.strategy=annealed \
        --variant famo=train.weighting=famo data.glue_dir=path/to/glue          # more multi-task rows
    python jobs/compare.py --config jobs/configs/lora_smollm2.yaml --skip-single-task --base-label "per-task LoRA" \
        --variant "shared LoRA=model.adapter.per_task=false" \
        --variant "full fine-tuning=model.adapter=null,train.lr=1e-4,train.head_lr_mult=10"   # adapters vs full

Every row is trained with `--seeds` seeds (the seed changes head initialisation, data order and the
sampler's draws; the pretrained weights and the dev rows stay the same). Each cell is the mean ± 95%
confidence interval over seeds; a table of paired differences (by seed) says which claims hold. A floor row
(majority class, first sentence as the summary) shows what every model must beat.
Finished models are recorded in `<out>/comparison.units.jsonl`: rerun the same command to continue.

Budget semantics and the row definitions: pipeline/compare.py and docs/guide.md ("The paper's comparison").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a working dir without install

from pipeline.errors import exits_on_bad_input  # noqa: E402
from pipeline.runtime import job_parser, output_dir  # noqa: E402

BUDGETS = {"small": "jobs/configs/compare_small.yaml", "paper": "jobs/configs/compare_paper.yaml"}
SEEDS = {"small": 3, "paper": 1}  # a budget's default --seeds (paper: about 4 hours per seed on 2 CPU cores)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of seeds, 1 or more")
    return int(text)


def variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name or "=" not in overrides:
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=key=value[,key=value...], "
                                         "e.g. annealed=sampling.strategy=annealed")
    return name, overrides.split(",")


def parser():
    p = job_parser(__doc__)
    p.add_argument("--budget", choices=sorted(BUDGETS), help="a packaged comparison size (overrides --config)")
    p.add_argument("--tuned", help="best-config YAML from a search: adds a 'multi-task (tuned)' row")
    p.add_argument("--out", default="compare_results", help="output folder (default: %(default)s)")
    p.add_argument("--skip-single-task", action="store_true", help="only the multi-task and Bi-LSTM rows")
    p.add_argument("--seeds", type=positive, help="seeds per row (default: 3 with --budget small, else 1)")
    p.add_argument("--base-label", help="what the config's own multi-task row is called in the report "
                   "(default: equal weights), e.g. 'per-task LoRA'")
    p.add_argument("--variant", type=variant, action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                   help="another multi-task row: the config with these overrides (repeatable)")
    return p


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    from pipeline.compare import run_comparison
    from pipeline.config import load_config
    from pipeline.runtime import init_ray

    start = time.monotonic()
    config_path = BUDGETS[args.budget] if args.budget else args.config
    cfg = load_config(config_path, args.overrides)
    init_ray(verbose=args.verbose)
    command = "python jobs/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    seeds = args.seeds or SEEDS.get(args.budget, 1)
    report = run_comparison(cfg, config_path, output_dir(args.out), command, seeds=seeds,
                            variants=dict(args.variant), tuned=args.tuned,
                            skip_single_task=args.skip_single_task, base_label=args.base_label, say=lambda line: print(line, flush=True))
    print(f"done in {(time.monotonic() - start) / 60:.1f} min -> {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
