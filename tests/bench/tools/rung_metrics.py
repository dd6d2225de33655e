"""Which rung metric would let ASHA stop the right trials? Reads the full-budget side of a `jobs/benchmark.py
tune` run from its MLflow store (every trial's per-task dev metrics at every report), then for each candidate
metric: its Spearman rank correlation with the full-budget best `dev/score` at every report step, and Ray Tune's
own ASHAScheduler replayed over the curves with that metric at the rungs (200 random trial orders; the best
`dev/score` the kept trials reach and the share of the steps they use).

    python tests/bench/tools/rung_metrics.py sqlite:////tmp/bench-tune-XXXX/mlflow.db [bench-tune-full]

The benchmark keeps its store in /tmp/bench-tune-*; the tasks are read from the metric names (dev/<task>/accuracy).
"""
import math
import random
import sys
from collections import defaultdict


def curves(uri: str, experiment: str) -> dict[str, dict[str, dict[int, float]]]:
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    out = {}
    for run in client.search_runs([exp.experiment_id]):
        if "dev/score" not in run.data.metrics or run.info.run_name == experiment:  # the Tune parent run
            continue
        h = defaultdict(dict)
        for key in run.data.metrics:
            if key == "dev/score" or key.endswith("/accuracy"):
                for m in client.get_metric_history(run.info.run_id, key):
                    h[key][m.step] = m.value
        out[run.info.run_name] = dict(h)
    return out


def main(uri: str, experiment: str = "bench-tune-full") -> None:
    from scipy.stats import spearmanr

    hist = curves(uri, experiment)
    tasks = sorted({k.split("/")[1] for h in hist.values() for k in h if k.endswith("/accuracy")})
    best = {t: max(h["dev/score"].values()) for t, h in hist.items()}
    steps = sorted(next(iter(hist.values()))["dev/score"])
    acc = lambda h, s: [h[f"dev/{t}/accuracy"][s] for t in tasks]  # noqa: E731
    metrics = {"mean (dev/score)": lambda h, s: h["dev/score"][s],
               "weakest task": lambda h, s: min(acc(h, s)),
               "geometric mean": lambda h, s: math.prod(acc(h, s)) ** (1 / len(tasks)),
               **{f"{t} only": (lambda h, s, t=t: h[f"dev/{t}/accuracy"][s]) for t in tasks}}
    names = sorted(hist)
    print(f"{len(names)} trials, reports at {steps}, tasks {tasks}; full-budget best {max(best.values()):.2f}\n")
    print("Spearman, metric at step -> full-budget best:")
    for label, f in metrics.items():
        rho = {s: spearmanr([f(hist[t], s) for t in names], [best[t] for t in names]).statistic for s in steps}
        print(f"  {label:18s} " + "  ".join(f"{s}: {r:+.2f}" for s, r in rho.items()))

    def replay(order, f, grace, rf):
        """The benchmark's own replay (Ray's ASHAScheduler) fed metric f at the rungs; the best dev/score
        each kept trial reached up to the step it was stopped at."""
        from pipeline.benchmarks.tune import replay_asha
        fed = [{"trial": t, "dev_scores": {s: f(hist[t], s) for s in steps}} for t in order]
        ran = replay_asha(fed, steps[-1], grace, rf)["ran"]
        return sum(ran.values()), max(v for t in order for s, v in hist[t]["dev/score"].items() if s <= ran[t])

    full_best, full_steps = max(best.values()), steps[-1] * len(names)
    orders = [random.Random(i).sample(names, len(names)) for i in range(200)]
    print("\nASHA replayed, 200 random orders: share of the steps, orders reaching >= 98% of the best, mean share of the best")
    for label, f in metrics.items():
        for grace in steps[:2]:
            for rf in (2, 3, 4):
                rs = [replay(o, f, grace, rf) for o in orders]
                print(f"  {label:18s} grace {grace:3d} rf {rf}: steps {sum(r[0] for r in rs) / len(rs) / full_steps:5.1%}"
                      f"  >=98%: {sum(r[1] / full_best >= 0.98 for r in rs) / len(rs):4.0%}"
                      f"  mean {sum(r[1] for r in rs) / len(rs) / full_best:.3f}")


if __name__ == "__main__":
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    main(*sys.argv[1:3])
