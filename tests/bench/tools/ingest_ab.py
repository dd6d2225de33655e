"""`train.ingest` A/B on the training benchmark's job side: the same job with its small task splits handed to
the workers through Ray's object store (`auto`) and streamed through Ray Data (`streaming`), in pairs whose
order alternates (auto first, then streaming first, ...), so the machine's drift hits both alike.

    python tests/bench/tools/ingest_ab.py jobs/configs/bench_train_short.yaml 1 6 OUT.jsonl data.glue_dir=GLUE

Arguments: config, workers (2 cores in all, as the benchmark), pairs, the JSONL file each job is appended to
(tokens/s: median of the windows after the first; rank 0's CPU use; ms per 1,000 tokens by phase), then config
overrides. Prints each pair's auto / streaming ratio and, at the end, their median and range.
"""
import json
import sys
import time
from pathlib import Path
from statistics import median


def main(config: str, workers: int, pairs: int, out: Path, overrides: list[str]) -> None:
    from pipeline.benchmarks.train import job_side, ms_per_k_tokens, per_process
    from pipeline.config import load_config
    from pipeline.runtime import init_ray

    init_ray()
    base = per_process(load_config(config, overrides), workers)  # the job side prepares its tasks itself
    ratios = []
    for pair in range(pairs):
        got = {}
        for mode in ("auto", "streaming") if pair % 2 == 0 else ("streaming", "auto"):
            side = job_side(base.model_copy(update={"train": base.train.model_copy(update={"ingest": mode})}))
            rec = {"pair": pair, "ingest": mode, "workers": workers, "tokens_per_s": side["tokens_per_s"],
                   "cpu_use": side["cpu_use"], "wall_s": side["wall_s"],
                   "ms_per_k": ms_per_k_tokens(side),
                   "t": time.strftime("%H:%M:%S")}
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            got[mode] = side["tokens_per_s"]
        ratios.append(got["auto"] / got["streaming"])
        print(f"pair {pair + 1}/{pairs}: auto {got['auto']:,.0f} / streaming {got['streaming']:,.0f} tokens/s = "
              f"{ratios[-1]:.3f}", flush=True)
    print(f"auto / streaming over {pairs} pairs: median {median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5:])
