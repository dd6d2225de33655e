"""ASHA on a larger search, measured: more configurations run to the full budget with the committed Tune
benchmark's settings, then Ray Tune's ASHAScheduler replayed over all the curves (the benchmark's and these).

    python tests/bench/tools/tune_more.py run tests/bench/results/tune.json OUT_DIR SEED [SEED ...]
    python tests/bench/tools/tune_more.py analyse tests/bench/results/tune.json OUT_DIR OUT.md

`run`: for each SEED, `jobs/tune.py` with the benchmark's full-budget side's overrides (steps, reports, tasks,
warm-up), `scheduler=fifo seed=SEED baseline=false num_samples=6`: six more random configurations of the same
search space, each to the full budget, written to OUT_DIR/seedSEED.json when its Tune run ends. A seed whose file
exists is skipped, so an interrupted series resumes where it stopped (commit each file as it lands).

`analyse`: the benchmark's full-budget curves plus every OUT_DIR/seed*.json; ASHA (grace 15 / reduction 3, and
the other settings below) replayed over them (`pipeline.benchmarks.tune.replay_asha`: training is seeded and
deterministic, and its replay of the benchmark's real ASHA side agreed with it trial by trial) in the order
they ran and in 200 random orders: the share of the full-budget best it finds and the share of the steps.
"""
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PER_SEED = 6
SETTINGS = ((15, 3), (15, 4), (15, 2), (30, 3))  # (grace period, reduction factor) in steps
KEEP = ("report_every=", "train.steps=", "train.warmup_steps=", "register_as=", "tasks=")


def run(bench: Path, out_dir: Path, seeds: list[int]) -> None:
    from pipeline.benchmarks.tune import _side

    result = json.loads(bench.read_text())
    common = [o for o in result["overrides"] if o.startswith(KEEP)] + [f"num_samples={PER_SEED}"]
    spec = str(ROOT / "jobs" / "configs" / Path(result["spec"]).name)
    out_dir.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        dest = out_dir / f"seed{seed}.json"
        if dest.exists():
            print(f"seed {seed}: done already ({dest})", flush=True)
            continue
        tmp = Path(tempfile.mkdtemp(prefix="bench-tune-more-"))
        try:
            uri = f"sqlite:///{tmp / 'mlflow.db'}"
            side = _side(spec, ["scheduler=fifo", f"name=bench-tune-more-{seed}", f"seed={seed}", "baseline=false"],
                         common + [f"train.storage_path={tmp / 'runs'}", f"tracking.uri={uri}"], tmp / "out", tmp, uri)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        side["trials"] = [dict(t, trial=f"s{seed}-{t['trial']}") for t in side["trials"]]
        dest.write_text(json.dumps({"seed": seed, "overrides": common, "spec": Path(spec).name, **side}, indent=1))
        print(f"seed {seed}: best {side['best_score']:.2f}, {side['steps']} steps in {side['seconds'] / 60:.1f} min",
              flush=True)


def analyse(bench: Path, out_dir: Path, out: Path) -> None:
    from pipeline.benchmarks.tune import replay_asha, what_if

    result = json.loads(bench.read_text())
    steps = result["steps_per_trial"]
    curves = list(result["full"]["trials"])
    files = sorted(out_dir.glob("seed*.json"), key=lambda p: int(p.stem[4:]))
    for f in files:
        curves += json.loads(f.read_text())["trials"]
    short = [t["trial"] for t in curves if t["steps"] != steps]
    if short:
        sys.exit(f"error: trials {short} did not run the full {steps} steps — fix: rerun their seed")
    top = max(t["best_score"] for t in curves)
    command = re.sub(r" --out \S+", "", result["command"])
    lines = ["# ASHA over a larger search: full-budget curves, ASHA replayed", "",
             f"Curves: the {len(result['full']['trials'])} full-budget trials of `{bench.name}` (`{command}`) and "
             f"{len(curves) - len(result['full']['trials'])} more configurations of the same search space run the same "
             f"way ({', '.join(f.name for f in files)}: `tests/bench/tools/tune_more.py run`, {PER_SEED} per seed, "
             f"`scheduler=fifo baseline=false`): {len(curves)} configurations, {steps} steps each, a dev evaluation every "
             f"{result['report_every']}. Best full-budget score {top:.2f}; {sum(t['best_score'] >= 0.98 * top for t in curves)} "
             f"configurations reach 98% of it.", "",
             "| grace period | reduction factor | in the order they ran: share of the best / of the steps | "
             "200 random orders: mean share of the best | orders reaching 98% | mean share of the steps (min-max) |",
             "|---:|---:|---|---:|---:|---|"]
    for grace, rf in SETTINGS:
        order = replay_asha(curves, steps, grace, rf)
        (w,) = what_if(curves, steps, graces=(grace,), reductions=(rf,), orders=200)
        shares = [replay_asha(o, steps, grace, rf)["steps"] / (len(curves) * steps) for o in _orders(curves, 200)]
        lines.append(f"| {grace} | {rf} | {100 * order['best_score'] / top:.1f}% / {100 * order['steps'] / (len(curves) * steps):.1f}% | "
                     f"{100 * w['orders_score_ratio']:.2f}% | {100 * w['orders_at_98']:.0f}% | "
                     f"{100 * w['orders_steps_ratio']:.1f}% ({100 * min(shares):.0f}-{100 * max(shares):.0f}%) |")
        print(lines[-1], flush=True)
    out.write_text("\n".join(lines) + "\n")


def _orders(curves: list[dict], n: int, seed: int = 0) -> list[list[dict]]:
    import random
    return [random.Random(seed + i).sample(curves, len(curves)) for i in range(n)]  # what_if's own orders


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if len(sys.argv) < 5 or sys.argv[1] not in ("run", "analyse"):
        sys.exit(__doc__)
    if sys.argv[1] == "run":
        run(Path(sys.argv[2]), Path(sys.argv[3]), [int(s) for s in sys.argv[4:]])
    else:
        analyse(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
