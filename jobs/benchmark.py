"""ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/benchmark.py train --config jobs/configs/bench_train.yaml

Benchmarks that run both sides in one invocation on the same machine, repeated, and write JSON + Markdown to
tests/bench/results/<name>.{json,md} (and the index tests/bench/RESULTS.md). They report; they never fail
on a number.

    preprocess  our Ray Data preprocessing vs datasets.map(batched=True, num_proc=2), SST-2 train (--glue-dir)
    train       tokens/s of the training job at 1 and 2 workers × ZeRO 0-3 vs a plain PyTorch loop,
                equal cores, with a per-phase breakdown (data, forward, backward, step, comm)
    memory      per-rank model-state bytes (parameters, gradients, optimizer) and peak RSS for ZeRO 0-3
                and optimizer offload, 2 workers, SmolLM2-135M, next to the ZeRO paper's formulas
    tune        ASHA vs every configuration at the full budget: best score and total steps
    generate    summarization generation tokens/s: greedy and beam, batched, with and without KV cache
    train-data  the training job's per-task hand-over to Ray Train: in-driver pyarrow + from_arrow for small
                splits vs a Ray Data sort (--config, default jobs/configs/default.yaml)
    gpu-plan    memory per GPU and FLOPs per token for the shipped GPU configs (on paper)

Examples:
    python jobs/benchmark.py preprocess --glue-dir path/to/glue
    python jobs/benchmark.py train --config jobs/configs/bench_train.yaml
    python jobs/benchmark.py train --config jobs/configs/bench_train.yaml --stages 0,2 --workers 2
    python jobs/benchmark.py memory
    python jobs/benchmark.py tune
    python jobs/benchmark.py generate
    python jobs/benchmark.py train-data
    python jobs/benchmark.py gpu-plan
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a working dir without install

from pipeline.benchmarks import RESULTS, write  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.errors import PipelineError, exits_on_bad_input  # noqa: E402
from pipeline.runtime import job_parser  # noqa: E402

NAMES = ["preprocess", "train", "memory", "tune", "generate", "train-data", "gpu-plan"]
ORDER = ["preprocess", "train_data", "train", "memory_bf16", "memory_fp32", "tune", "generate", "gpu_plan"]


def write_index(out: Path) -> Path:
    """tests/bench/RESULTS.md: every benchmark's latest table, in a fixed order."""
    parts = ["# Benchmark results", "",
             "Each section is the latest output of `python jobs/benchmark.py <name>` (the command is in it); the "
             "JSON beside each holds every number. Both sides of a comparison run in the same invocation.", ""]
    for name in ORDER:
        md = out / f"{name}.md"
        if md.is_file():
            parts += [md.read_text().replace("# Benchmark:", "## Benchmark:", 1), ""]
    index = out.parent / "RESULTS.md" if out.resolve() == RESULTS.resolve() else out / "RESULTS.md"
    index.write_text("\n".join(parts))
    return index


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, command=NAMES)
    parser.set_defaults(config=None)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per side where a benchmark repeats (default 3)")
    parser.add_argument("--glue-dir", type=Path, help="preprocess: the GLUE folder holding SST-2/train.tsv")
    parser.add_argument("--stages", default="0,1,2,3", help="train: ZeRO stages (default: %(default)s)")
    parser.add_argument("--workers", default="1,2", help="train: worker counts at equal total cores (default: %(default)s)")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"],
                        help="memory: training precision (default: %(default)s, the formulas' mixed precision)")
    args = parser.parse_intermixed_args(argv)
    command = "python jobs/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    name = args.name.replace("-", "_")

    if name == "preprocess":
        from pipeline.benchmarks import preprocess
        glue = args.glue_dir
        if glue is None or not (glue / "SST-2" / "train.tsv").is_file():
            raise PipelineError.one("--glue-dir", f"no SST-2/train.tsv under {glue}",
                                    "pass the GLUE folder (the standard layout: SST-2/train.tsv)")
        result, md = preprocess.run(glue.resolve(), command, repeats=args.repeats)
    elif name == "train":
        from pipeline.benchmarks import train
        cfg = load_config(args.config or "jobs/configs/bench_train.yaml", args.overrides)
        result, md = train.run(cfg, command, stages=tuple(int(s) for s in args.stages.split(",")),
                               workers=tuple(int(w) for w in args.workers.split(",")))
    elif name == "memory":
        from pipeline.benchmarks import memory
        result, md = memory.run(command, precision=args.precision)
        name = f"memory_{args.precision}"
    elif name == "tune":
        from pipeline.benchmarks import tune
        result, md = tune.run(command, extra=args.overrides)
    elif name == "generate":
        from pipeline.benchmarks import generate
        result, md = generate.run(command, repeats=args.repeats)
    elif name == "train_data":
        from pipeline.benchmarks import train_data
        cfg = load_config(args.config or "jobs/configs/default.yaml", args.overrides)
        result, md = train_data.run(cfg, command, repeats=args.repeats)
    else:
        from pipeline.benchmarks import gpu_plan
        result, md = gpu_plan.run(command)
    path = write(name, result, md, args.out)
    index = write_index(args.out)
    print(md)
    print(f"results: {path} and {path.with_suffix('.json')}; index {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
