"""How ASHA's share of the training steps depends on the number of configurations, estimated from one Tune
benchmark's full-budget curves: searches of n configurations are drawn from those curves (with replacement, in a
random order) and Ray Tune's ASHAScheduler is replayed over them (`pipeline.benchmarks.tune.replay_asha`, trials one
at a time as on this machine).

    python tests/bench/tools/asha_scale.py tests/bench/results/tune.json OUT.md [draws]

With trials one at a time, asynchronous ASHA lets the first trial to reach a rung through, so its step share falls
toward successive halving's own only as the search grows. A drawn search repeats curves, so this is an estimate of
the trend, not a measurement of a larger search.
"""
import json
import random
import re
import sys
from pathlib import Path

SIZES = (9, 27, 81)
SETTINGS = ((15, 3), (15, 4), (30, 3))  # (grace period, reduction factor) in steps


def main(source: Path, out: Path, draws: int = 100) -> None:
    from pipeline.benchmarks.tune import replay_asha

    result = json.loads(source.read_text())
    full, steps = result["full"]["trials"], result["steps_per_trial"]
    command = re.sub(r" --out \S+", "", result["command"])
    lines = [f"# ASHA's step share vs the number of configurations (replayed over drawn searches)", "",
             f"Curves: the {len(full)} full-budget trials of `{source.name}` ({steps} steps, a report every "
             f"{result['report_every']}; command `{command}`). Each row: {draws} searches of n "
             f"configurations drawn from them with replacement (seeds 0-{draws - 1}), ASHA replayed over each. "
             f"Best share: the ASHA best over the drawn search's own full-budget best.", "",
             "| configurations | grace period | reduction factor | mean step share | range | mean best share | searches ≥ 98% |",
             "|---:|---:|---:|---:|---|---:|---:|"]
    for n in SIZES:
        for grace, rf in SETTINGS:
            shares, best = [], []
            for seed in range(draws):
                drawn = [dict(t, trial=f"{t['trial']}_{k}") for k, t in enumerate(random.Random(seed).choices(full, k=n))]
                x = replay_asha(drawn, steps, grace, rf)
                shares.append(x["steps"] / (n * steps))
                best.append(x["best_score"] / max(t["best_score"] for t in drawn))
            lines.append(f"| {n} | {grace} | {rf} | {100 * sum(shares) / draws:.1f}% | {100 * min(shares):.0f}-"
                         f"{100 * max(shares):.0f}% | {100 * sum(best) / draws:.2f}% | {sum(b >= 0.98 for b in best)}/{draws} |")
            print(lines[-1], flush=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    main(Path(sys.argv[1]), Path(sys.argv[2]), *(int(a) for a in sys.argv[3:4]))
