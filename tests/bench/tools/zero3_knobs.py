"""ZeRO-3 knobs, one variant after another, on the training benchmark's torchrun side (no Ray) and its plain
loop: what a `zero_optimization` setting does to DeepSpeed's own cost, with no Ray in the measurement.

    python tests/bench/tools/zero3_knobs.py jobs/configs/bench_train.yaml 1 plain,defaults,no_mel,defaults OUT.jsonl

Arguments: config, processes (1 or 2, 2 cores in all), comma-separated variants (VARIANTS below, or `plain`),
the JSONL file each measurement is appended to (tokens/s: median of the windows after the first; ms per 1,000
tokens by phase; CPU use). For a profile, run it under `py-spy record --subprocesses -f raw -o OUT.txt -- …`.
"""
import json
import sys
import time
from pathlib import Path

VARIANTS = {
    "stage0": (0, {}),
    "defaults": (3, {}),
    "persist": (3, {"stage3_param_persistence_threshold": 20_000_000}),  # above MiniLM's largest tensor: nothing partitioned
    "no_mel": (3, {"memory_efficient_linear": False}),  # torch's F.linear instead of DeepSpeed's LinearFunctionForZeroStage3
    "no_mel_persist": (3, {"memory_efficient_linear": False, "stage3_param_persistence_threshold": 20_000_000}),
    # DeepSpeed's defaults already hold MiniLM (22.7M parameters) in one bucket (prefetch 5e7, reduce 5e8): only
    # smaller buckets, no prefetch or no overlap of communication with compute (2 cores for both) can differ
    "no_prefetch": (3, {"stage3_prefetch_bucket_size": 0}),
    "no_overlap": (3, {"overlap_comm": False}),
    "no_overlap_no_prefetch": (3, {"overlap_comm": False, "stage3_prefetch_bucket_size": 0}),
    "small_buckets": (3, {"stage3_prefetch_bucket_size": 1_000_000, "reduce_bucket_size": 1_000_000}),
    # leaf modules do not train on CPU with DeepSpeed 0.19.8 (tests/bench/results/train_zero3_leaf): these two fail
    "encoder_leaf": (3, {"stage3_module_granularity_threshold": 130_000}),  # MiniLM's encoder (granularity 125,256) fetched whole
    "model_leaf": (3, {"stage3_module_granularity_threshold": 100_000_000}),  # the whole model fetched whole
}


def main(config: str, processes: int, variants: list[str], out: Path) -> None:
    from pipeline.benchmarks.train import ms_per_k_tokens, per_process, plain_loop, torchrun_side, workload
    from pipeline.config import load_config

    base = per_process(load_config(config, []), processes)
    prepared, ratios, weights = workload(base)
    for name in variants:
        if name == "plain":
            side = plain_loop(base, prepared, ratios, weights)
        else:
            stage, options = VARIANTS[name]
            c = base.model_copy(update={"train": base.train.model_copy(update={"zero_stage": stage, "zero_options": options})})
            try:
                side = torchrun_side(c, prepared, weights)
            except RuntimeError as e:  # a knob DeepSpeed cannot run on this setup: recorded, the next one goes on
                causes = [ln for ln in str(e).splitlines() if "Error:" in ln and "ChildFailedError" not in ln]
                rec = {"variant": name, "processes": processes, "error": (causes or [str(e)])[-1].strip()[:300]}
                print(json.dumps(rec), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(rec | {"t": time.strftime("%H:%M:%S")}) + "\n")
                continue
        rec = {"variant": name, "processes": processes, "tokens_per_s": side["tokens_per_s"], "cpu_use": side["cpu_use"],
               "ms_per_k": ms_per_k_tokens(side),
               "t": time.strftime("%H:%M:%S")}
        print(json.dumps(rec), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), Path(sys.argv[4]))
