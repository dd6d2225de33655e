"""ASHA on a larger search, measured: more configurations run to the full budget with the committed Tune
benchmark's settings, then Ray Tune's ASHAScheduler replayed over all the curves (the benchmark's and these).

    python tests/bench/tools/tune_more.py run tests/bench/results/tune.json OUT_DIR SEED [SEED ...]
    python tests/bench/tools/tune_more.py analyse tests/bench/results/tune.json OUT_DIR OUT.md
    python tests/bench/tools/tune_more.py asha tests/bench/results/tune.json OUT_DIR ORDER

`run`: for each SEED, `jobs/tune.py` with the benchmark's full-budget side's overrides (steps, reports, tasks,
warm-up), `scheduler=fifo seed=SEED baseline=false num_samples=6`: six more random configurations of the same
search space, each to the full budget, written to OUT_DIR/seedSEED.json when its Tune run ends. A seed whose file
exists is skipped, so an interrupted series resumes where it stopped (commit each file as it lands). SEED 0 is the
benchmark's own series (its search seed, the baseline first, its sample count): the benchmark's configurations
trained by the current code; its seed0.json then replaces the benchmark's curves below (curves measured by older
code need not reproduce: the data order changed with `train.ingest: auto`).

`analyse`: the benchmark's full-budget curves plus every OUT_DIR/seed*.json; how well each rung's dev score
predicts the full-budget best (Spearman over the configurations); ASHA (grace 15 / reduction 3, and
the other settings below) replayed over them (`pipeline.benchmarks.tune.replay_asha`: training is seeded and
deterministic, and its replay of the benchmark's real ASHA side agreed with it trial by trial) in the order
they ran and in 200 random orders: the share of the full-budget best it finds and the share of the steps; and each
real ASHA experiment in OUT_DIR (asha_order*.json) beside the replay of its order, trial by trial.

`asha`: a real ASHA experiment (grace 15 / reduction 3) over the same configurations, in `what_if`'s random order
ORDER (`shuffled_order`): every curve's trial config is regenerated from its series' search seed (and checked
against the weights and ratios it recorded), given to `jobs/tune.py` as `points_to_evaluate` in that order, and the
real experiment's steps per trial are set beside the replay's prediction for the same order. Written to
OUT_DIR/asha_orderORDER.json; an interrupted experiment resumes (`--resume`) from OUT_DIR/asha-work, which holds
the trials' checkpoints (7.4 GB for the 27 trials here): use an OUT_DIR outside the repository (with copies of
the seed files), copy the JSON in, and delete asha-work once the result is committed.
"""
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PER_SEED = 6
SETTINGS = ((15, 3), (15, 4), (15, 2), (30, 3), (30, 4), (30, 6), (30, 8))  # (grace period, reduction factor) in steps
KEEP = ("report_every=", "train.steps=", "train.warmup_steps=", "register_as=", "tasks=")


def run(bench: Path, out_dir: Path, seeds: list[int]) -> None:
    from pipeline.benchmarks.tune import tune_side

    result = json.loads(bench.read_text())
    keep = [o for o in result["overrides"] if o.startswith(KEEP)]
    spec = str(ROOT / "jobs" / "configs" / Path(result["spec"]).name)
    out_dir.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        dest = out_dir / f"seed{seed}.json"
        if dest.exists():
            print(f"seed {seed}: done already ({dest})", flush=True)
            continue
        # seed 0 is the benchmark's own series (its search seed, the baseline first, its sample count): its
        # configurations again, trained by the code of this run
        own = seed == 0
        common = keep + [f"num_samples={result['samples'] if own else PER_SEED}"]
        tmp = Path(tempfile.mkdtemp(prefix="bench-tune-more-"))
        try:
            uri = f"sqlite:///{tmp / 'mlflow.db'}"
            side = tune_side(spec, ["scheduler=fifo", f"name=bench-tune-more-{seed}", f"seed={seed}", f"baseline={str(own).lower()}"],
                         common + [f"train.storage_path={tmp / 'runs'}", f"tracking.uri={uri}"], tmp / "out", tmp, uri)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        side["trials"] = [dict(t, trial=f"s{seed}-{t['trial']}") for t in side["trials"]]
        dest.write_text(json.dumps({"seed": seed, "overrides": common, "spec": Path(spec).name, **side}, indent=1))
        print(f"seed {seed}: best {side['best_score']:.2f}, {side['steps']} steps in {side['seconds'] / 60:.1f} min",
              flush=True)


def analyse(bench: Path, out_dir: Path, out: Path) -> None:
    from pipeline.benchmarks.tune import replay_asha, what_if

    result, curves, files = _curves(bench, out_dir)
    steps = result["steps_per_trial"]
    top = max(t["best_score"] for t in curves)
    command = re.sub(r" --out \S+", "", result["command"])
    own = any(f.stem == "seed0" for f in files)
    lines = ["# ASHA over a larger search: full-budget curves, ASHA replayed", "",
             ("Curves: " if own else f"Curves: the {len(result['full']['trials'])} full-budget trials of `{bench.name}` (`{command}`) and ")
             + f"{len(curves) if own else len(curves) - len(result['full']['trials'])} configurations of "
             f"{'the search space of `' + bench.name + '` (`' + command + '`)' if own else 'the same search space'}, each run to the "
             f"full budget with `tests/bench/tools/tune_more.py run` ({', '.join(f.name for f in files)}; `scheduler=fifo`; "
             + ("seed 0 is the benchmark's own series: its search seed, the baseline first, its 9 configurations; "
                if own else "") + f"the other seeds {PER_SEED} configurations each, `baseline=false`): {len(curves)} configurations, "
             f"{steps} steps each, a dev evaluation every {result['report_every']}. Best full-budget score {top:.2f}; "
             f"{sum(t['best_score'] >= 0.98 * top for t in curves)} configurations reach 98% of it.", "",
             _rung_spearman(curves), "",
             "| grace period | reduction factor | in the order they ran: share of the best / of the steps | "
             "200 random orders: mean share of the best | orders reaching 98% | mean share of the steps (min-max) |",
             "|---:|---:|---|---:|---:|---|"]
    for grace, rf in SETTINGS:
        order = replay_asha(curves, steps, grace, rf)
        (w,) = what_if(curves, steps, graces=(grace,), reductions=(rf,), orders=200)
        lines.append(f"| {grace} | {rf} | {100 * order['best_score'] / top:.1f}% / {100 * order['steps'] / (len(curves) * steps):.1f}% | "
                     f"{100 * w['orders_score_ratio']:.2f}% | {100 * w['orders_at_98']:.0f}% | "
                     f"{100 * w['orders_steps_ratio']:.1f}% ({100 * w['orders_steps_min']:.0f}-{100 * w['orders_steps_max']:.0f}%) |")
        print(lines[-1], flush=True)
    for real_file in sorted(out_dir.glob("asha_order*.json")):
        lines += [""] + _real_vs_replay(json.loads(real_file.read_text()), curves, steps, top, real_file.name)
        print("\n".join(lines[-4:]), flush=True)
    out.write_text("\n".join(lines) + "\n")


def _rung_spearman(curves: list[dict]) -> str:
    """Do rung scores predict the final one? Spearman's rank correlation, over the configurations, of the dev
    score at each report with the best full-budget score."""
    from scipy.stats import spearmanr
    reports = sorted({int(s) for t in curves for s in t["dev_scores"]})
    best = [t["best_score"] for t in curves]
    rho = {s: spearmanr([t["dev_scores"].get(str(s), t["dev_scores"].get(s)) for t in curves], best).statistic
           for s in reports}
    return ("Rung scores against the full-budget best (Spearman over the configurations, by report step): "
            + ", ".join(f"{s}: {r:+.2f}" for s, r in rho.items()) + ".")


def _real_vs_replay(real: dict, curves: list[dict], steps: int, top: float, name: str) -> list[str]:
    """A real ASHA experiment (`asha`) beside ASHA replayed over the current curves in the same order: trial by
    trial, the steps each ran and the dev scores it reported against the curve's."""
    from pipeline.benchmarks.tune import replay_asha, shuffled_order

    arrival = shuffled_order(curves, real["order"])
    replay = replay_asha(arrival, steps, real["grace_period"], real["reduction_factor"])
    same_steps = sum(replay["ran"][c["trial"]] == t["steps"] for c, t in zip(arrival, real["trials"]))
    same_scores = sum(all(abs(v - c["dev_scores"][k]) < 1e-9 for k, v in t["dev_scores"].items())
                      for c, t in zip(arrival, real["trials"]))
    total = len(curves) * steps
    return [f"Real ASHA experiment `{name}` (`tune_more.py asha`, grace {real['grace_period']} / reduction "
            f"{real['reduction_factor']}, {len(real['trials'])} trials in `what_if`'s random order {real['order']}, "
            f"{real['seconds'] / 60:.1f} min): {real['steps']} steps (**{100 * real['steps'] / total:.1f}%**), best "
            f"{real['best_score']:.2f} (**{100 * real['best_score'] / top:.2f}%** of the full-budget best {top:.2f}). "
            f"ASHA replayed over these curves in the same order: {replay['steps']} steps ({100 * replay['steps'] / total:.1f}%), "
            f"best {replay['best_score']:.2f}. Trial by trial: {same_steps} of {len(real['trials'])} ran the steps the replay "
            f"gives, and {same_scores} reported exactly the dev scores of their curve."]




def _curves(bench: Path, out_dir: Path) -> tuple[dict, list[dict], list[Path]]:
    """The benchmark's result, every full-budget curve (the benchmark's, then each seed file's), the seed files."""
    result = json.loads(bench.read_text())
    steps = result["steps_per_trial"]
    files = sorted(out_dir.glob("seed*.json"), key=lambda p: int(p.stem[4:]))
    # seed0.json, when measured, replaces the benchmark's own curves (the same configurations, this code)
    curves = [] if any(f.stem == "seed0" for f in files) else list(result["full"]["trials"])
    for f in files:
        curves += json.loads(f.read_text())["trials"]
    short = [t["trial"] for t in curves if t["steps"] != steps]
    if short:
        sys.exit(f"error: trials {short} did not run the full {steps} steps — fix: rerun their seed")
    return result, curves, files


def _configs(result: dict, files: list[Path], spec_path: str, common: list[str]) -> list[dict]:
    """Each curve's trial config (param-space values), regenerated: Tune's BasicVariantGenerator with the seed
    and sample count each series ran with (the benchmark's seed 0 with the baseline first; `run`'s seeds without),
    checked against the normalised weights and explicit ratios each trial recorded."""
    from ray.tune.experiment import Experiment
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipeline.tuning import baseline_point, load_tune_spec, param_space, trial_config
    spec, base = load_tune_spec(spec_path, common)
    space = param_space(spec, base)
    series = [] if any(f.stem == "seed0" for f in files) else [(0, result["full"]["trials"])]
    series += [(d["seed"], d["trials"]) for d in (json.loads(f.read_text()) for f in files)]
    configs = []
    for seed, trials in series:  # seed 0, the benchmark's series, starts with the baseline
        gen = BasicVariantGenerator(random_state=seed, points_to_evaluate=[baseline_point(spec, base)] if seed == 0 else None)
        gen.add_configurations([Experiment("regenerate", run=lambda c: None, config=space, num_samples=len(trials))])
        for t in trials:
            config = gen.next_trial().config
            cfg = trial_config(base, config, spec)
            if any(abs(cfg.tasks[k].weight - w) > 1e-4 or cfg.tasks[k].ratio is not None and abs(cfg.tasks[k].ratio - t["ratios"][k]) > 1e-4
                   for k, w in t["weights"].items()):
                sys.exit(f"error: trial {t['trial']} (seed {seed}) does not match its regenerated config {config} — "
                         "fix: the search space or Ray Tune's sampling changed since the curves ran; rerun `run`")
            configs.append(config)
    return configs


def asha(bench: Path, out_dir: Path, order: int, grace: int = 15, rf: int = 3) -> None:
    """A real ASHA experiment over the same configurations in what_if's random order ORDER, beside the replay's
    prediction for that order, trial by trial. Resumable: its Tune experiment lives in OUT_DIR/asha-work."""
    from pipeline.benchmarks.tune import tune_side, replay_asha, shuffled_order

    result, curves, files = _curves(bench, out_dir)
    steps = result["steps_per_trial"]
    common = [o for o in result["overrides"] if o.startswith(KEEP)]
    spec = str(ROOT / "jobs" / "configs" / Path(result["spec"]).name)
    configs = _configs(result, files, spec, [o for o in common if not o.startswith("register_as=")])
    by_trial = {t["trial"]: c for t, c in zip(curves, configs)}
    arrival = shuffled_order(curves, order)
    predicted = replay_asha(arrival, steps, grace, rf)
    dest = out_dir / f"asha_order{order}.json"
    work = out_dir / "asha-work"
    resume = ["--resume"] if (work / "runs" / f"bench-tune-more-asha{order}").exists() else []
    print(f"{len(arrival)} configurations in order {order}; the replay predicts {predicted['steps']} steps "
          f"({100 * predicted['steps'] / (len(arrival) * steps):.1f}%), best {predicted['best_score']:.2f}"
          + (" — resuming" if resume else ""), flush=True)
    points = json.dumps([by_trial[t["trial"]] for t in arrival])
    uri = f"sqlite:///{work / 'mlflow.db'}"
    work.mkdir(parents=True, exist_ok=True)
    side = tune_side(spec, [*resume, "scheduler=asha", f"asha.grace_period={grace}", f"asha.reduction_factor={rf}",
                        f"name=bench-tune-more-asha{order}", "baseline=false", f"num_samples={len(arrival)}",
                        f"points_to_evaluate={points}"],
                 common + [f"train.storage_path={work / 'runs'}", f"tracking.uri={uri}"], work / "out", work, uri)
    real = sorted(side["trials"], key=lambda t: t["trial"])  # trial ids _00000... follow the points' order
    rows = [{"position": i, "curve": c["trial"], "trial": r["trial"], "predicted_steps": predicted["ran"][c["trial"]],
             "steps": r["steps"], "full_budget_best": c["best_score"], "best_score": r["best_score"],
             "dev_scores": r["dev_scores"]}
            for i, (c, r) in enumerate(zip(arrival, real))]
    full_best = max(t["best_score"] for t in curves)
    agree = all(r["steps"] == r["predicted_steps"] for r in rows)
    dest.write_text(json.dumps({
        "order": order, "grace_period": grace, "reduction_factor": rf, "overrides": common, "spec": Path(spec).name,
        "seconds": side["seconds"], "steps": side["steps"], "steps_ratio": side["steps"] / (len(curves) * steps),
        "best_score": side["best_score"], "score_ratio": side["best_score"] / full_best, "full_budget_best": full_best,
        "predicted": {"steps": predicted["steps"], "best_score": predicted["best_score"]},
        "agree": agree, "trials": rows,
        "costs": [t["costs"] for t in real]}, indent=1))
    print(f"real ASHA: {side['steps']} steps ({100 * side['steps'] / (len(curves) * steps):.1f}%), best "
          f"{side['best_score']:.2f} ({100 * side['best_score'] / full_best:.2f}% of {full_best:.2f}), "
          f"{side['seconds'] / 60:.1f} min; replay agrees trial by trial: "
          f"{agree} -> {dest}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if len(sys.argv) < 5 or sys.argv[1] not in ("run", "analyse", "asha"):
        sys.exit(__doc__)
    if sys.argv[1] == "asha":
        asha(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "run":
        run(Path(sys.argv[2]), Path(sys.argv[3]), [int(s) for s in sys.argv[4:]])
    else:
        analyse(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
