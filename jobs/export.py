"""ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/export.py --run RUN_DIR --out OUT_DIR

Consolidate a training checkpoint (ZeRO 0-3, sharded across any number of ranks) into a model folder
that a plain process reloads with `MultiTaskModel.load(OUT_DIR)`. Runs on one machine, no Ray needed:

    python jobs/export.py --run ~/.cache/mtl-pipeline/runs/mtl-default-1a2b3c4d --out exported/
    python jobs/export.py --run RUN_DIR --step 300 --out exported/      # a specific checkpoint
    python jobs/export.py --run RUN_DIR --merge sst2 --out merged/      # adapters: one task merged into a plain model

With LoRA adapters (model.adapter) the folder is a bundle: the base model by reference, every adapter in
PEFT's format under adapters/, the heads. `--merge TASK` writes instead that task's adapter merged into the
base weights plus its head: backbone/ is then an ordinary transformers folder.

Training already writes `final_model/` and `best_model/` this way; export is for any other checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a working dir without install

from pipeline.errors import PipelineError, exits_on_bad_input  # noqa: E402


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="run folder (holds run.json and step_* checkpoints)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, type=Path, help="where to write the model folder")
    parser.add_argument("--merge", metavar="TASK", help="adapter runs: write TASK's adapter merged into the base instead")
    args = parser.parse_args(argv)
    from pipeline.train.checkpoints import checkpoint_order, step_of
    steps = sorted((p for p in args.run.expanduser().glob("step_*") if step_of(p.name) is not None), key=checkpoint_order)
    if args.step is not None:
        steps = [p for p in steps if step_of(p.name) == args.step]
    if not steps:
        raise PipelineError.one(str(args.run), f"no checkpoint{'' if args.step is None else f' for step {args.step}'}",
                                f"choose one of: {', '.join(p.name for p in sorted(args.run.glob('step_*'))) or 'none'}")
    from pipeline.train.export import consolidate_checkpoint, merge_task
    from pipeline.runtime import output_dir
    if args.merge:
        import tempfile
        with tempfile.TemporaryDirectory(prefix="mtl-bundle-") as bundle:
            out = merge_task(consolidate_checkpoint(steps[-1], bundle), args.merge, output_dir(args.out))
        print(f"exported {steps[-1]}, task {args.merge} merged -> {out}")
        return 0
    out = consolidate_checkpoint(steps[-1], output_dir(args.out))
    print(f"exported {steps[-1]} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
