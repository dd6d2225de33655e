"""Tune efficiency: ASHA against running every configuration to the full budget — the same search space
of task weights and sampling ratios, the same seeded configurations (trial 1 = the config's own equal
weights), real data. Each side is `jobs/tune.py` run as a user would, one after the other; reported: the
best dev score each found, and the training steps each used in total.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.benchmarks import WORKER_GROUP_TEXT, cost_label, header, machine

ROOT = Path(__file__).resolve().parents[2]


def tune_side(spec: str, scheduler: list[str], overrides: list[str], out: Path, home: Path, tracking_uri: str) -> dict[str, Any]:
    """One Tune experiment (`jobs/tune.py` in a subprocess, in `home`, results in `out`): its wall time, total
    steps, best dev score and per-trial records (config, weights, ratios, dev scores by step, fixed costs from
    MLflow). Fails with the experiment's output when it exits non-zero."""
    cmd = [sys.executable, str(ROOT / "jobs" / "tune.py"), "--config", spec, "--out", str(out), *scheduler, *overrides]
    env = {**os.environ, "MTL_HOME": os.environ.get("MTL_HOME", str(Path.home() / ".cache" / "mtl-pipeline"))}
    env.pop("RAY_ADDRESS", None)
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=home, env=env, text=True, capture_output=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"tune failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    summary = json.loads((out / "trials.json").read_text())
    trials = summary["trials"]
    best = max(trials, key=lambda t: t["best_score"])
    history = _scores(tracking_uri, summary["parent_run_id"])
    return {"seconds": seconds, "steps": sum(t["steps"] for t in trials), "best_score": best["best_score"],
            "best_trial": best["trial"], "trials": [{**{k: t[k] for k in ("trial", "status", "steps", "best_score",
                                                                          "weights", "ratios", "baseline")},
                                                     "config": t.get("config"),  # the trial's param-space values
                                                     "dev_scores": history.get(t["run_name"], {}),
                                                     "costs": fixed_costs(tracking_uri, t["run_id"])} for t in trials]}


def fixed_costs(uri: str, run_id: str) -> dict[str, float]:
    """One trial's fixed cost, from its MLflow run: the start-up phases the driver and the workers log
    (driver set-up, worker group, tokenizer, DeepSpeed engine, restore, data) and the end (final model,
    shutdown), beside the run's wall time (MLflow run start to end); what is left is steps, evaluations
    and checkpoints."""
    from mlflow.tracking import MlflowClient

    from pipeline.train.loop import CHECKPOINTS_S, FIXED_COSTS, PAUSED_S, WORKER_GROUP_PARTS
    run = MlflowClient(uri).get_run(run_id)
    costs = {k: float(run.data.metrics[k]) for k in FIXED_COSTS if k in run.data.metrics}
    costs["fixed_s"] = sum(costs.values())
    costs.update({k: float(run.data.metrics[k]) for k in WORKER_GROUP_PARTS if k in run.data.metrics})
    if run.info.end_time and run.info.start_time:
        costs["run_s"] = (run.info.end_time - run.info.start_time) / 1000
    if PAUSED_S in run.data.metrics:  # evaluations and checkpoints
        costs["pauses_s"] = float(run.data.metrics[PAUSED_S])
    if CHECKPOINTS_S in run.data.metrics:  # of which checkpoints
        costs["checkpoints_s"] = float(run.data.metrics[CHECKPOINTS_S])
    return costs


def fixed_cost_summary(trials: list[dict]) -> dict[str, float]:
    """Per-trial means over trials with a recorded cost: each phase, the total fixed cost, the run time and the
    fixed cost's share of it."""
    rows = [t["costs"] for t in trials if t.get("costs", {}).get("run_s")]
    if not rows:
        return {}
    keys = sorted({k for r in rows for k in r})
    out = {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in keys}
    out["share"] = sum(r["fixed_s"] / r["run_s"] for r in rows) / len(rows)
    out["trials"] = len(rows)
    return out


def cost_table(costs: dict[str, dict[str, float]]) -> list[str]:
    """Markdown: per side, each fixed-cost phase, the fixed cost, the pauses (evaluations, checkpoints), the
    training steps, the run time and the fixed share; then the worker group's parts."""
    from pipeline.train.loop import FIXED_COSTS, WORKER_GROUP_PARTS
    names = [k for k in FIXED_COSTS if any(k in c for c in costs.values())]
    md = ["Each trial's fixed cost (means per trial, seconds, from the trials' MLflow runs: the driver's set-up, "
          "Ray Train's worker group up to each worker's set-up, then the workers' set-up phases, and the end "
          "from the last checkpoint to the worker group's exit), beside the trial's run time (MLflow run start "
          "to end):", "",
          "| side | trials | " + " | ".join(cost_label(k) for k in names)
          + " | fixed | evaluations | checkpoints | training steps | run | fixed share |",
          "|---|---:|" + "---:|" * (len(names) + 6)]
    for side, c in costs.items():
        if not c:
            continue
        if "pauses_s" not in c:  # trials from before time/paused_total_s was logged
            split = "— | — | —"
        else:
            ckpt = c.get("checkpoints_s")
            evals = c["pauses_s"] - (ckpt or 0.0)
            split = (f"{evals:.1f} | {ckpt:.1f}" if ckpt is not None else f"{evals:.1f} (with checkpoints) | —") + \
                f" | {c['run_s'] - c['fixed_s'] - c['pauses_s']:.1f}"
        md.append(f"| {side} | {c['trials']} | " + " | ".join(f"{c.get(k, 0.0):.1f}" for k in names)
                  + f" | {c['fixed_s']:.1f} | {split} | {c['run_s']:.1f} | {100 * c['share']:.0f}% |")
    md += ["", "Evaluations: the pauses in training for the dev evaluation and the Tune report; checkpoints: saving "
           "and persisting each checkpoint (`time/checkpoint_total_s`; the two together are the trials' "
           "`time/paused_total_s`); training steps: the rest of the run.", ""]
    parts = [k for k in WORKER_GROUP_PARTS if any(k in c for c in costs.values())]
    if parts:
        md += ["The worker group's share, split: " + "; ".join(
            f"{side}: " + ", ".join(f"{cost_label(k)} {c.get(k, 0.0):.1f} s" for k in parts)
            for side, c in costs.items() if c) + f" ({WORKER_GROUP_TEXT}).", ""]
    return md


def _scores(uri: str, parent_run_id: str) -> dict[str, dict[int, float]]:
    """Each trial's dev score at every report, from its MLflow run: what ASHA saw at its rungs."""
    from pipeline.tracking import TuneParent, metric_history
    parent = TuneParent.reopen(uri, True, parent_run_id, resume=False)
    return {name: dict(metric_history(uri, run.info.run_id, "dev/score")) for name, run in parent.children().items()}


def rung_correlation(trials: list[dict], grace: int, reduction: int, steps: int) -> dict[int, float]:
    """How well the dev score at each ASHA rung (grace · reduction^k steps) predicts a configuration's
    full-budget best: Spearman rank correlation over trials that ran to the full budget. ASHA keeps the
    top 1/reduction at each rung, so a low correlation at the first rung is why it stops good trials."""
    from scipy.stats import spearmanr
    out = {}
    rung = grace
    while rung < steps:
        pairs = [(t["dev_scores"][rung], t["best_score"]) for t in trials if rung in t.get("dev_scores", {})]
        if len(pairs) >= 3:
            out[rung] = float(spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)
        rung *= reduction
    return out


def score_correlation(trials: list[dict]) -> dict[int, float]:
    """Spearman rank correlation between the dev score at every report step and the full-budget best, over
    trials that ran to the full budget: from which step on a rung could mean something."""
    from scipy.stats import spearmanr
    steps = sorted({int(k) for t in trials for k in t.get("dev_scores", {})})
    out = {}
    for step in steps:
        pairs = [(t["dev_scores"][step], t["best_score"]) for t in trials if step in t.get("dev_scores", {})]
        if len(pairs) >= 3:
            out[step] = float(spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)
    return out


def replay_asha(trials: list[dict], steps: int, grace: int, reduction: int) -> dict[str, Any]:
    """What ASHA with (grace, reduction) would have done with these full-budget curves, trials arriving one
    at a time in their order (this machine runs one trial at a time): Ray Tune's own ASHAScheduler,
    configured as the Tune job configures it, is fed each trial's reports until it says STOP. Training
    is seeded and deterministic, so a trial's curve is the same whether or not it is stopped: the replay
    of the grace and reduction factor actually used must agree with the real ASHA side."""
    import types

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from pipeline.tuning import METRIC, MODE, TIME_ATTR
    scheduler = ASHAScheduler(time_attr=TIME_ATTR, metric=METRIC, mode=MODE, max_t=steps + 1,
                              grace_period=grace, reduction_factor=reduction)
    ran, best = {}, {}
    for t in trials:
        trial = types.SimpleNamespace(trial_id=t["trial"])
        scheduler.on_trial_add(None, trial)
        for step, score in sorted((int(k), v) for k, v in t["dev_scores"].items()):
            ran[t["trial"]], best[t["trial"]] = step, max(best.get(t["trial"], score), score)
            if scheduler.on_trial_result(None, trial, {TIME_ATTR: step, METRIC: score}) == TrialScheduler.STOP:
                break
    return {"grace_period": grace, "reduction_factor": reduction, "steps": sum(ran.values()),
            "best_score": max(best.values()), "ran": ran}


def shuffled_order(trials: list[dict], seed: int) -> list[dict]:
    """One of `what_if`'s random arrival orders (seed = its `seed` + the order's index)."""
    import random
    return random.Random(seed).sample(trials, len(trials))


def what_if(trials: list[dict], steps: int, graces: tuple[int, ...] = (5, 10, 15, 20, 25, 30),
            reductions: tuple[int, ...] = (2, 3, 4), orders: int = 200, seed: int = 0) -> list[dict]:
    """ASHA replayed over a grid of grace periods and reduction factors on the full side's curves: the
    share of the full-budget best each would have found and the share of the steps it would have used, in
    the order the trials actually ran and averaged over `orders` random orders (seeded). The first trial
    to reach a rung always passes it, so one order can flatter a setting: the random orders show what it
    finds when the best configuration is not the first to run."""
    full_best, full_steps = max(t["best_score"] for t in trials), sum(t["steps"] for t in trials)
    shuffles = [shuffled_order(trials, seed + i) for i in range(orders)]
    rows = []
    for g in graces:
        if g >= steps:
            continue
        for rf in reductions:
            r = replay_asha(trials, steps, g, rf)
            shuffled = [replay_asha(o, steps, g, rf) for o in shuffles]
            shares = [x["best_score"] / full_best for x in shuffled]
            rows.append({**r, "score_ratio": r["best_score"] / full_best, "steps_ratio": r["steps"] / full_steps,
                         "orders": orders, "orders_score_ratio": sum(shares) / orders,
                         "orders_at_98": sum(x >= 0.98 for x in shares) / orders,
                         "orders_steps_ratio": sum(x["steps"] for x in shuffled) / orders / full_steps,
                         "orders_steps_min": min(x["steps"] for x in shuffled) / full_steps,
                         "orders_steps_max": max(x["steps"] for x in shuffled) / full_steps})
    return rows


def run(command: str, *, spec: str = "jobs/configs/tune_default.yaml", samples: int = 8, steps: int = 40,
        report_every: int = 5, grace: int = 5, reduction: int = 4, extra: list[str] | None = None) -> tuple[dict, str]:
    spec = str((ROOT / spec).resolve())
    # the benchmark's own knobs given as overrides (`train.steps=120 asha.grace_period=20`) set its sides and
    # its record alike
    knobs = {"num_samples": "samples", "train.steps": "steps", "report_every": "report_every",
             "asha.grace_period": "grace", "asha.reduction_factor": "reduction"}
    values = {"samples": samples, "steps": steps, "report_every": report_every, "grace": grace, "reduction": reduction}
    rest = []
    for item in extra or []:
        key, _, value = item.partition("=")
        if key not in knobs:
            rest.append(item)
        elif not value.strip().isdigit() or int(value) < 1:
            raise PipelineError.one(key, f"{value!r} is not a whole number >= 1 (the benchmark counts trials and steps)",
                                    f"write a whole number, e.g. {key}={values[knobs[key]]}")
        else:
            values[knobs[key]] = int(value)
    samples, steps, report_every, grace, reduction = (values[k] for k in ("samples", "steps", "report_every", "grace", "reduction"))
    extra = rest
    tmp = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    try:
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        common = [f"num_samples={samples}", f"report_every={report_every}", f"train.steps={steps}", "register_as=null",
                  "train.warmup_steps=4", f"train.storage_path={tmp / 'runs'}", f"tracking.uri={uri}", *(extra or [])]
        full = tune_side(spec, ["scheduler=fifo", "name=bench-tune-full"], common, tmp / "full", tmp, uri)
        print(f"full budget: best {full['best_score']:.2f} with {full['steps']} steps in {full['seconds']:.0f} s", flush=True)
        asha = tune_side(spec, ["scheduler=asha", "name=bench-tune-asha", f"asha.grace_period={grace}",
                            f"asha.reduction_factor={reduction}"], common, tmp / "asha", tmp, uri)
        print(f"ASHA: best {asha['best_score']:.2f} with {asha['steps']} steps in {asha['seconds']:.0f} s", flush=True)
        result = {"benchmark": "tune", "command": command, "machine": machine(), "spec": spec, "samples": samples,
                  "steps_per_trial": steps, "report_every": report_every, "grace_period": grace,
                  "reduction_factor": reduction, "overrides": common, "full": full, "asha": asha,
                  "score_ratio": asha["best_score"] / full["best_score"], "steps_ratio": asha["steps"] / full["steps"]}
        result["rung_correlation"] = rung_correlation(full["trials"], grace, reduction, steps)
        result["fixed_costs"] = {side: fixed_cost_summary(r["trials"]) for side, r in (("full", full), ("asha", asha))}
        analyse(result)
        return result, markdown(result)
    finally:  # the trials' checkpoints and MLflow store: gigabytes once the result is written
        shutil.rmtree(tmp, ignore_errors=True)


def analyse(result: dict) -> dict:
    """Add what the full side's curves say: the score-vs-best correlation at every report, the replay of the
    ASHA side (it must agree with the real one) and the what-if grid."""
    full, steps = result["full"]["trials"], result["steps_per_trial"]
    result["score_correlation"] = score_correlation(full)
    replay = replay_asha(full, steps, result["grace_period"], result["reduction_factor"])
    real = {t["trial"].rsplit("_", 1)[-1]: t["steps"] for t in result["asha"]["trials"]}
    result["replay_agrees"] = {k.rsplit("_", 1)[-1]: v for k, v in replay["ran"].items()} == real
    every = result["report_every"]  # every report up to half the budget as a first rung
    result["what_if"] = what_if(full, steps, graces=tuple(range(every, steps // 2 + 1, every)) or (every,))
    return result


def markdown(r: dict) -> str:
    f, a = r["full"], r["asha"]
    md = header("Tune efficiency (ASHA vs full budget)", r["command"], r["machine"]) + [
        f"Spec `{Path(r['spec']).name}`: {r['samples']} configurations (random search, seed 0, trial 1 = equal "
        f"weights), {r['steps_per_trial']} steps each at full budget, a dev evaluation every {r['report_every']} "
        f"steps. ASHA: grace period {r['grace_period']} steps, reduction factor {r['reduction_factor']}.", "",
        "| side | best dev score | best trial | training steps | wall time |", "|---|---:|---|---:|---:|",
        f"| every configuration to the full budget | {f['best_score']:.2f} | {f['best_trial']} | {f['steps']} | {f['seconds'] / 60:.1f} min |",
        f"| ASHA | {a['best_score']:.2f} | {a['best_trial']} | {a['steps']} | {a['seconds'] / 60:.1f} min |",
        "", f"ASHA found **{100 * r['score_ratio']:.1f}%** of the full-budget best score with **{100 * r['steps_ratio']:.0f}%** "
        "of the steps.", ""]
    costs = r.get("fixed_costs", {})
    if any(costs.values()):
        md += cost_table(costs)
    if r.get("rung_correlation"):
        md += ["How well the score at an ASHA rung predicts a configuration's full-budget best (Spearman rank "
               "correlation over the full side's trials): " + ", ".join(
                   f"step {k}: {v:.2f}" for k, v in r["rung_correlation"].items()) + ".", ""]
    if r.get("score_correlation"):
        md += ["The same correlation at every report (score at step → full-budget best): " + ", ".join(
            f"{k}: {v:.2f}" for k, v in r["score_correlation"].items()) + ".", ""]
    if r.get("what_if"):
        top = max(t["best_score"] for t in f["trials"])
        near = sum(t["best_score"] >= 0.98 * top for t in f["trials"])
        md += [f"What other ASHA settings would have done with the same curves (Ray Tune's ASHAScheduler replayed "
               f"over the full side's reports, trials one at a time in the same order; the replay of the setting "
               f"used {'agrees' if r.get('replay_agrees') else 'does NOT agree'} with the real ASHA side, trial by "
               f"trial). {near} of the {len(f['trials'])} configurations reach 98% of the full-budget best, so "
               "finding 98% only needs one of them to survive.", "",
               f"| grace period | reduction factor | this order: share of the best | this order: share of the steps | "
               f"{r['what_if'][0].get('orders', 0)} random orders: mean share of the best | orders reaching 98% | "
               "mean share of the steps |", "|---:|---:|---:|---:|---:|---:|---:|"]
        md += [f"| {w['grace_period']} | {w['reduction_factor']} | {100 * w['score_ratio']:.1f}% | {100 * w['steps_ratio']:.0f}% | "
               f"{100 * w.get('orders_score_ratio', float('nan')):.1f}% | {100 * w.get('orders_at_98', float('nan')):.0f}% | "
               f"{100 * w.get('orders_steps_ratio', float('nan')):.0f}% |" for w in r["what_if"]]
        md.append("")
    rung_steps = sorted({int(k) for k in r.get("rung_correlation", {})})
    md += ["Per configuration (full budget → ASHA):", "",
           "| trial | weights | full: " + "".join(f"score at {k}, " for k in rung_steps) +
           "steps, best | ASHA: status, steps, best |", "|---|---|---|---|"]
    by_id = {t["trial"].rsplit("_", 1)[-1]: t for t in a["trials"]}
    for t in f["trials"]:
        other = by_id.get(t["trial"].rsplit("_", 1)[-1], {})
        w = " / ".join(f"{v:.2f}" for v in t["weights"].values())
        at = "".join(f"{t['dev_scores'].get(k, float('nan')):.2f}, " for k in rung_steps)
        md.append(f"| {t['trial'].rsplit('_', 1)[-1]}{' (equal)' if t['baseline'] else ''} | {w} | {at}{t['steps']}, "
                  f"{t['best_score']:.2f} | {other.get('status', '—')}, {other.get('steps', '—')}, "
                  f"{other.get('best_score', float('nan')):.2f} |")
    md.append("")
    return "\n".join(md)


# `benchmark tune-cost`: what a trial costs besides its training steps, before and after a change, side by side in
# one run: each side is the same Tune job (every trial to the full budget, no scheduler), only the overrides differ.
COST_SIDES = {"a checkpoint at every report": ["checkpoint_every={report_every}"],
              "the spec's checkpoint_every": []}


def run_cost(command: str, *, spec: str = "jobs/configs/tune_default.yaml", samples: int = 3, steps: int = 60,
             report_every: int = 15, repeats: int = 1, extra: list[str] | None = None) -> tuple[dict, str]:
    """Per-trial fixed cost, evaluations, checkpoints and training steps of each side in COST_SIDES, sides
    alternating `repeats` times; also the time between trials (the side's wall time minus its trials' runs:
    Tune starting each trial's process and driver)."""
    spec = str((ROOT / spec).resolve())
    tmp = Path(tempfile.mkdtemp(prefix="bench-tune-cost-"))
    try:
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        common = [f"num_samples={samples}", f"report_every={report_every}", f"train.steps={steps}", "register_as=null",
                  "train.warmup_steps=4", f"train.storage_path={tmp / 'runs'}", f"tracking.uri={uri}", *(extra or [])]
        sides: dict[str, list[dict]] = {name: [] for name in COST_SIDES}
        for rep in range(repeats):
            for i, (name, overrides) in enumerate(COST_SIDES.items()):
                label = f"bench-tune-cost-{i}-{rep}"
                r = tune_side(spec, ["scheduler=fifo", f"name={label}"], common + [o.format(report_every=report_every)
                                                                                for o in overrides], tmp / label, tmp, uri)
                run_s = sum(t["costs"].get("run_s", 0.0) for t in r["trials"])
                r["between_trials_s"] = (r["seconds"] - run_s) / len(r["trials"])
                sides[name].append(r)
                print(f"{name} (repeat {rep + 1}): {r['seconds']:.0f} s for {len(r['trials'])} trials", flush=True)
        result = {"benchmark": "tune_cost", "command": command, "machine": machine(), "spec": spec, "samples": samples,
                  "steps_per_trial": steps, "report_every": report_every, "repeats": repeats, "overrides": common,
                  "sides": {name: {"overrides": COST_SIDES[name], "runs": runs,
                                   "costs": fixed_cost_summary([t for r in runs for t in r["trials"]]),
                                   "between_trials_s": sum(r["between_trials_s"] for r in runs) / len(runs),
                                   "trial_wall_s": sum(r["seconds"] for r in runs) / sum(len(r["trials"]) for r in runs)}
                            for name, runs in sides.items()}}
        return result, cost_markdown(result)
    finally:  # the trials' checkpoints and MLflow store: gigabytes once the result is written
        shutil.rmtree(tmp, ignore_errors=True)


def cost_markdown(r: dict) -> str:
    sides = r["sides"]
    md = header("Tune: what a trial costs besides its training steps", r["command"], r["machine"]) + [
        f"Spec `{Path(r['spec']).name}`, every side: {r['samples']} trials (no scheduler), {r['steps_per_trial']} steps "
        f"each, a dev evaluation and Tune report every {r['report_every']} steps; sides alternate, {r['repeats']} "
        "time(s). Sides: " + "; ".join(f"**{name}** ({', '.join(s['overrides']).format(report_every=r['report_every']) or 'no override'})"
                                      for name, s in sides.items()) + ".", ""]
    md += cost_table({name: s["costs"] for name, s in sides.items()})
    md += ["| side | Tune's wall time per trial (s) | of which between trials (s) | training steps' share |",
           "|---|---:|---:|---:|"]
    for name, s in sides.items():
        c = s["costs"]
        steps_s = c["run_s"] - c["fixed_s"] - c.get("pauses_s", 0.0)
        md.append(f"| {name} | {s['trial_wall_s']:.1f} | {s['between_trials_s']:.1f} | {100 * steps_s / s['trial_wall_s']:.0f}% |")
    names = list(sides)
    if len(names) == 2:
        a, b = (sides[n]["trial_wall_s"] for n in names)
        md += ["", f"Per trial: {a:.1f} s → {b:.1f} s ({100 * (b - a) / a:+.0f}%)."]
    md.append("")
    return "\n".join(md)
