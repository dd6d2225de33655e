"""Tune efficiency: ASHA against running every configuration to the full budget — the same search space
of task weights and sampling ratios, the same seeded configurations (trial 1 = the config's own equal
weights), real data. Each side is `jobs/tune.py` run as a user would, one after the other; reported: the
best dev score each found, and the training steps each used in total.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.benchmarks import header, machine

ROOT = Path(__file__).resolve().parents[2]


def _side(spec: str, scheduler: list[str], overrides: list[str], out: Path, home: Path, tracking_uri: str) -> dict[str, Any]:
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
                                                     "dev_scores": history.get(t["run_name"], {})} for t in trials]}


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


def run(command: str, *, spec: str = "jobs/configs/tune_default.yaml", samples: int = 8, steps: int = 40,
        report_every: int = 5, grace: int = 5, reduction: int = 4, extra: list[str] | None = None) -> tuple[dict, str]:
    spec = str((ROOT / spec).resolve())
    tmp = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    common = [f"num_samples={samples}", f"report_every={report_every}", f"train.steps={steps}", "register_as=null",
              "train.warmup_steps=4", f"train.storage_path={tmp / 'runs'}", f"tracking.uri={uri}", *(extra or [])]
    full = _side(spec, ["scheduler=fifo", "name=bench-tune-full"], common, tmp / "full", tmp, uri)
    print(f"full budget: best {full['best_score']:.2f} with {full['steps']} steps in {full['seconds']:.0f} s", flush=True)
    asha = _side(spec, ["scheduler=asha", "name=bench-tune-asha", f"asha.grace_period={grace}",
                        f"asha.reduction_factor={reduction}"], common, tmp / "asha", tmp, uri)
    print(f"ASHA: best {asha['best_score']:.2f} with {asha['steps']} steps in {asha['seconds']:.0f} s", flush=True)
    result = {"benchmark": "tune", "command": command, "machine": machine(), "spec": spec, "samples": samples,
              "steps_per_trial": steps, "report_every": report_every, "grace_period": grace,
              "reduction_factor": reduction, "overrides": common, "full": full, "asha": asha,
              "score_ratio": asha["best_score"] / full["best_score"], "steps_ratio": asha["steps"] / full["steps"]}
    result["rung_correlation"] = rung_correlation(full["trials"], grace, reduction, steps)
    return result, markdown(result)


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
    if r.get("rung_correlation"):
        md += ["How well the score at an ASHA rung predicts a configuration's full-budget best (Spearman rank "
               "correlation over the full side's trials): " + ", ".join(
                   f"step {k}: {v:.2f}" for k, v in r["rung_correlation"].items()) + ".", ""]
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
