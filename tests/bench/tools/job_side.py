"""The training benchmark's job side alone, once, on whatever Ray cluster it is submitted to: for layout A/B runs
(two Ray nodes vs one) where the torchrun and plain sides would only repeat what the full benchmark measured.

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python tests/bench/tools/job_side.py jobs/configs/bench_train.yaml 2 OUT.jsonl LABEL [key=value ...]

Arguments: config, workers (2 cores in all, the global batch split over them, as the benchmark), the JSONL file
the run is appended to, a label for the run (e.g. the layout), then config overrides (e.g.
`train.placement=STRICT_SPREAD`). Records tokens/s (median of the windows after the first), the windows, steps/s over them, rank 0's
CPU use, ms per 1,000 tokens by phase and the cluster's nodes.
"""
import json
import sys
import time
from pathlib import Path


def main(config: str, workers: int, out: Path, label: str, overrides: list[str]) -> None:
    import ray

    from pipeline.benchmarks.train import job_side, ms_per_k_tokens, per_process
    from pipeline.config import load_config
    from pipeline.runtime import init_ray

    init_ray()
    nodes = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]]
    cfg = per_process(load_config(config, overrides), workers)
    started = time.strftime("%H:%M:%S")
    side = job_side(cfg)
    rec = {"label": label, "workers": workers, "placement": cfg.train.placement, "ray_nodes_cpus": nodes,
           "tokens_per_s": side["tokens_per_s"], "windows": side["windows"],
           "steps_per_s": cfg.train.log_every * len(side["windows"]) / side["measured_s"], "cpu_use": side["cpu_use"],
           "wall_s": side["wall_s"], "ms_per_k": ms_per_k_tokens(side),
           "started": started, "overrides": overrides}
    with out.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"{label}: {side['tokens_per_s']:,.0f} tokens/s on {len(nodes)} node(s) {nodes}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5:])
