"""ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/benchmark.py train --config jobs/configs/bench_train.yaml

Benchmarks that run both sides in one invocation on the same machine, repeated, and write JSON + Markdown to
tests/bench/results/<name>.{json,md} (and the index tests/bench/RESULTS.md). They report; they never fail
on a number.

    preprocess  our Ray Data preprocessing vs datasets.map(batched=True, num_proc=2), SST-2 train (--glue-dir)
    train       tokens/s of the training job at 1 and 2 workers × ZeRO 0-3 vs the same loop under torchrun
                (no Ray) and a plain PyTorch loop,
                equal cores, with a per-phase breakdown (data, forward, backward, step, comm)
    memory      per-rank model-state bytes (parameters, gradients, optimizer) and peak RSS for ZeRO 0-3
                and optimizer offload, 2 workers, SmolLM2-135M, next to the ZeRO paper's formulas
    tune        ASHA vs every configuration at the full budget: best score and total steps
    tune-cost   what a Tune trial costs besides its training steps (start-up, evaluations, checkpoints, end, the
                time between trials), a checkpoint at every report vs the spec's checkpoint_every, side by side
    generate    summarization generation tokens/s: greedy and beam, batched, with and without KV cache
    train-data  the training job's per-task hand-over to Ray Train: in-driver pyarrow + from_arrow for small
                splits vs a Ray Data sort (--config, default jobs/configs/default.yaml)
    gpu-plan    memory per GPU and FLOPs per token for the shipped GPU configs (on paper)
    lora        full fine-tuning vs shared vs per-task LoRA on SmolLM2-135M (2 workers, ZeRO-2): trainable
                parameters, model states per rank, checkpoint size, peak RSS, tokens/s; GPU plan rows for
                per-task LoRA on Llama-3.1-8B (jobs/configs/lora_llama8b_gpu.yaml), 1 and 8 GPUs

Examples:
    python jobs/benchmark.py preprocess --glue-dir path/to/glue
    python jobs/benchmark.py train --config jobs/configs/bench_train.yaml
    python jobs/benchmark.py train --config jobs/configs/bench_train.yaml --stages 0,2 --workers 2
    python jobs/benchmark.py train --config jobs/configs/bench_train_short.yaml data.glue_dir=path/to/glue   # short rows
    python jobs/benchmark.py memory
    python jobs/benchmark.py tune
    python jobs/benchmark.py generate
    python jobs/benchmark.py train-data
    python jobs/benchmark.py gpu-plan
    python jobs/benchmark.py lora
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a working dir without install

from pipeline.benchmarks import NAMES, RESULTS, run_benchmark, write, write_index  # noqa: E402
from pipeline.errors import exits_on_bad_input  # noqa: E402
from pipeline.runtime import job_parser  # noqa: E402

@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, command=NAMES)
    parser.set_defaults(config=None)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: %(default)s)")
    parser.add_argument("--repeats", type=int, help="repetitions per side: preprocess, generate, train-data (default 3), tune-cost (default 1), "
                        "train (default 1: each row's three sides, back to back, that many times; the ratios are the "
                        "median over repeats, with their range)")
    parser.add_argument("--glue-dir", type=Path, help="preprocess: the GLUE folder holding SST-2/train.tsv")
    parser.add_argument("--stages", default="0,1,2,3", help="train: ZeRO stages (default: %(default)s)")
    parser.add_argument("--workers", default="1,2", help="train: worker counts at equal total cores (default: %(default)s)")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"],
                        help="memory: training precision (default: %(default)s, the formulas' mixed precision)")
    args = parser.parse_intermixed_args(argv)
    command = "python jobs/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    name, result, md = run_benchmark(args.name, command, config=args.config, overrides=args.overrides,
                                     repeats=args.repeats, glue_dir=args.glue_dir, stages=args.stages,
                                     workers=args.workers, precision=args.precision)
    path = write(name, result, md, args.out)
    index = write_index(args.out)
    print(md)
    print(f"results: {path} and {path.with_suffix('.json')}; index {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
