"""A Ray Tune experiment end to end: run (or resume) the search over task weights, sampling ratios and
training knobs, then summarise it (trials table, best config, plot, MLflow parent run, optional
registration). The spec, the search space and one trial's training live in pipeline/tuning.py;
jobs/tune.py is the command line around this.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.errors import PipelineError

PARENT_FILE = "mtl_tune.json"  # in the experiment folder: the MLflow parent run id, for --resume


def run_experiment(spec, base, *, resume: bool = False, log=print):
    """Fit (or restore and finish) the experiment; returns (ResultGrid, parent run id, tracking uri,
    the training config with absolute paths that every trial started from)."""
    import ray
    from ray import tune

    from pipeline.config import config_to_dict
    from pipeline import storage as store
    from pipeline.tracking import TuneParent, flatten_params, tracking_uri
    from pipeline.tuning import TRIAL_DRIVER_CPU, max_concurrent, param_space, tune_trial

    storage = store.resolve(base.train.storage_path)
    exp_dir = store.join(storage, spec.name)
    uri = tracking_uri(base.tracking.uri)
    # Tune runs each trial in its own working directory: everything relative (the default sqlite
    # store in the working dir, relative data or run folders) is pinned here, so trials log into
    # the parent's store and read the same cache.
    base = absolute_paths(base, uri, storage)
    if resume:
        if not tune.Tuner.can_restore(exp_dir):
            raise PipelineError.one("--resume", f"no Tune experiment {spec.name!r} under {storage}",
                                    "start it without --resume, or set name / train.storage_path to where it lives")
        parent_run_id = json.loads(store.read_text(store.join(exp_dir, PARENT_FILE))).get("parent_run_id")
        parent = TuneParent.reopen(uri, base.tracking.required, parent_run_id)
    else:
        if store.is_dir(exp_dir):
            raise PipelineError.one("name", f"a Tune experiment {spec.name!r} already exists in {exp_dir}",
                                    "continue it with --resume, or choose another name (name=...)")
        params = flatten_params({k: v for k, v in spec.model_dump(mode="json").items() if k != "overrides"})
        params["train_overrides"] = " ".join(spec.overrides)[:6000]
        parent = TuneParent.start(uri, base.tracking.required, spec.name, params, config_to_dict(base))
        parent_run_id = parent.run_id if parent else None

    resources = ray.cluster_resources()
    concurrent = max_concurrent(spec, base, resources)
    # Build (or check) every task's cache once, here: trials then only read it. Search values
    # (weights, ratios, learning rates) never change the cache key.
    from ray.data import DataContext

    from pipeline.data.preprocess import prepare_tasks
    prepare_tasks(base, log=log, bar=sys.stderr.isatty())
    DataContext.get_current().enable_progress_bars = False
    space = param_space(spec, base)
    log(f"tune {spec.name}: {spec.num_samples} trials ({spec.search} search, {spec.scheduler} scheduler), "
        f"{concurrent} at once on {resources.get('CPU', 0):g} CPUs; searching {', '.join(space) or 'nothing'}")

    trainable = tune.with_parameters(tune_trial, base=config_to_dict(base), spec=spec.model_dump(mode="json"),
                                     parent_run_id=parent_run_id)
    trainable = tune.with_resources(trainable, {"CPU": TRIAL_DRIVER_CPU})
    if resume:
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(trainable, space, spec, base, storage, concurrent, log)
        store.write_text(store.join(exp_dir, PARENT_FILE), json.dumps({"parent_run_id": parent_run_id, "tracking_uri": uri}))
    try:
        grid = tuner.fit()
    except Exception:
        if parent is not None:
            parent.failed()
        raise
    return grid, parent_run_id, uri, base


def _new_tuner(trainable, space: dict, spec, base, storage: str, concurrent: int, log):
    """A fresh Tuner: the search (random/grid or Optuna, trial 1 the config's own values unless grid), ASHA or
    FIFO, trial names from their ids."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipeline.tuning import METRIC, MODE, TIME_ATTR, baseline_point, trial_run_name

    first = [baseline_point(spec, base)] if spec.baseline and spec.search != "grid" else []
    if first:
        log("trial 1 is the training config's own values: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float)
                                                                        else f"{k}={v}" for k, v in first[0].items()))
    if spec.points_to_evaluate:
        log(f"then {len(spec.points_to_evaluate)} given configurations (points_to_evaluate), before the search's own")
    first = [*first, *(dict(p) for p in spec.points_to_evaluate)] or None
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        search_alg = OptunaSearch(seed=spec.seed, points_to_evaluate=first)
    else:
        # (Tune ignores max_concurrent_trials for a generator passed in: it takes its own limit.)
        search_alg = BasicVariantGenerator(random_state=spec.seed, max_concurrent=concurrent,
                                           points_to_evaluate=first)
    if spec.scheduler == "asha":
        # max_t one past the last step: at max_t ASHA stops the trial itself, which could cut off
        # the end of a finished run (final model, MLflow status); this way it ends by returning.
        scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=base.train.steps + 1, grace_period=spec.asha.grace_period,
                                  reduction_factor=spec.asha.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    name = spec.name
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, num_samples=spec.num_samples, search_alg=search_alg,
                                    scheduler=scheduler, max_concurrent_trials=concurrent,
                                    trial_name_creator=lambda t: trial_run_name(name, t.trial_id),
                                    trial_dirname_creator=lambda t: trial_run_name(name, t.trial_id)),
        run_config=tune.RunConfig(name=spec.name, storage_path=storage, verbose=1))
    return tuner


def absolute_paths(base, uri: str, storage: str):
    """The training config with its tracking URI and local paths made absolute."""
    data = base.data.model_copy(update={k: Path(v).expanduser().resolve() for k in ("cache_dir", "glue_dir", "cache_path")
                                        if (v := getattr(base.data, k)) is not None})
    return base.model_copy(update={"data": data, "tracking": base.tracking.model_copy(update={"uri": uri}),
                                   "train": base.train.model_copy(update={"storage_path": storage})})


def trial_rows(grid, spec, base, parent=None) -> list[dict]:
    """One row per trial: its normalised weights and ratios (as the run logged them), status, steps
    and scores. ASHA-stopped trials' child runs are closed as KILLED."""
    from pipeline.tuning import METRIC, trial_config, trial_run_name

    children = parent.children() if parent is not None else {}
    rows = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.rsplit("-", 1)[-1]
        run_name = trial_run_name(spec.name, trial_id)
        cfg = trial_config(base, result.config, spec)
        history = result.metrics_dataframe
        scores = history[METRIC].dropna() if history is not None and METRIC in history else []
        last = result.metrics or {}
        steps = int(last.get("step", 0))
        status = "error" if result.error else ("finished" if steps >= base.train.steps else "stopped (ASHA)")
        child = children.get(run_name)
        ratios = {t: float(child.data.params.get(f"ratio.{t}", "nan")) for t in cfg.tasks} if child else \
                 {t: cfg.tasks[t].ratio for t in cfg.tasks}
        rows.append({
            "trial": trial_id, "run_name": run_name,
            "baseline": bool(spec.baseline and spec.search != "grid" and trial_id.endswith("_00000")), "run_id": child.info.run_id if child else None, "status": status,
            "steps": steps, "score": float(scores.iloc[-1]) if len(scores) else float("nan"),
            "best_score": float(scores.max()) if len(scores) else float("nan"),
            "weights": {t: cfg.tasks[t].weight for t in cfg.tasks}, "ratios": ratios,
            "sampling": cfg.sampling.strategy, "temperature": cfg.sampling.temperature if cfg.sampling.strategy == "temperature" else None,
            "lr": cfg.train.lr, "weighting": getattr(cfg.train, "weighting", "static"),
            "per_task": {k.removeprefix("dev/"): v for k, v in last.items() if k.startswith("dev/") and k.count("/") == 2},
            "config": result.config,
        })
        if child is not None:
            parent.close_child(child, status, last.get("timestamp"))  # ended at its last result
    return rows


def best_row(rows: list[dict]) -> dict:
    """The best trial that trained its full budget (ASHA keeps at least one), by its best dev score."""
    finished = [r for r in rows if r["status"] == "finished" and r["best_score"] == r["best_score"]]
    if not finished:
        raise RuntimeError("no trial finished its full budget: see the trials table and the Tune logs")
    return max(finished, key=lambda r: r["best_score"])


def trials_markdown(rows: list[dict], best: dict, spec, base) -> str:
    tasks = list(base.tasks)
    head = ["trial", "status", "steps", "best score", "last score", "sampling"] + [f"w {t}" for t in tasks] + \
           [f"p {t}" for t in tasks] + ["lr", "weighting"]
    lines = [f"# Tune experiment {spec.name}", "",
             f"{len(rows)} trials, {spec.search} search, {spec.scheduler} scheduler; score = dev multi-task score "
             f"(mean of each task's primary metric ×100). w = loss weight (sum = {len(tasks)}), p = sampling ratio (sum = 1).",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: -(r["best_score"] if r["best_score"] == r["best_score"] else -1e9)):
        sampling = r["sampling"] + (f" T={r['temperature']:.2g}" if r["temperature"] else "")
        cells = [r["trial"] + (" **best**" if r is best else "") + (" (training config's own values)" if r["baseline"] else ""), r["status"], str(r["steps"]), f"{r['best_score']:.2f}",
                 f"{r['score']:.2f}", sampling] + [f"{r['weights'][t]:.2f}" for t in tasks] + \
                [f"{r['ratios'][t]:.2f}" for t in tasks] + [f"{r['lr']:.2g}", r["weighting"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def weights_figure(rows: list[dict], tasks: list[str], path: Path) -> None:
    """Each task's loss weight and sampling ratio against the trial's best dev score."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(tasks), figsize=(4 * len(tasks), 6.5), squeeze=False)
    for j, task in enumerate(tasks):
        for i, (key, label) in enumerate((("weights", "loss weight"), ("ratios", "sampling ratio"))):
            ax = axes[i][j]
            for status, marker in (("finished", "o"), ("stopped (ASHA)", "x")):
                pts = [(r[key][task], r["best_score"]) for r in rows if r["status"] == status]
                if pts:
                    ax.scatter(*zip(*pts), marker=marker, label=status)
            ax.set_xlabel(f"{task} {label}")
            ax.set_ylabel("best dev score")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


INCUMBENT = "own values"  # the confirm stage's name for the training config's own values


def decide(scores: dict[str, list[float]], incumbent: str = INCUMBENT) -> tuple[list[dict], str]:
    """The confirm table (per config: mean ± 95% interval of the final dev score over seeds, and the paired
    difference to the incumbent) and the winner: the candidate with the highest mean among those whose
    difference to the incumbent holds (> 0 beyond noise); the incumbent when none does."""
    from pipeline.eval.stats import interval, paired
    table = []
    for label, values in scores.items():
        diff = None if label == incumbent else paired(values, scores[incumbent])
        table.append({"config": label, "scores": values, "score": interval(values), "difference": diff,
                      "beats": bool(diff is not None and diff.holds and diff.mean > 0)})
    beating = [r for r in table if r["beats"]]
    winner = max(beating, key=lambda r: r["score"].mean)["config"] if beating else incumbent
    return table, winner


def confirm_markdown(table: list[dict], winner: str, seeds: list[int], steps: int) -> str:
    lines = [f"## Confirm stage: {len(seeds)} seeds ({', '.join(map(str, seeds))}) × {steps} steps per config", "",
             "Final dev multi-task score: mean ± 95% interval over seeds; the difference to the training config's "
             "own values is paired by seed.", "",
             "| config | per-seed scores | score | − own values | 95% interval | verdict |", "|---|---|---|---|---|---|"]
    for r in table:
        d = r["difference"]
        verdict = ("incumbent" if d is None else "beats the own values" if r["beats"] else
                   "worse beyond noise" if d.holds else "within noise")
        cells = [r["config"] + (" **winner**" if r["config"] == winner else ""), ", ".join(f"{v:.2f}" for v in r["scores"]),
                 r["score"].text(digits=2), "—" if d is None else f"{d.mean:+.2f}",
                 "—" if d is None else f"[{d.low:+.2f}, {d.high:+.2f}]", verdict]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", (f"Winner: {winner}, better than the training config's own values beyond noise." if winner != INCUMBENT
                   else "No searched config beats the training config's own values beyond noise: the own values stay "
                        "(best_config.yaml holds them; nothing is registered).")]
    return "\n".join(lines) + "\n"


def confirm(spec, base, rows: list[dict], parent_run_id: str | None, log=print) -> dict:
    """The confirm stage: the top-k finished trials' configs and the training config's own values, each
    retrained with `confirm.seeds` seeds and `confirm.overrides` (the full budget), nested under the parent
    run. Runs have fixed names, so a rerun continues them. Returns the table, the winner, its config and the
    run folder of the winner's best seed."""
    from pipeline import storage
    from pipeline.config import Config, apply_overrides, config_to_dict
    from pipeline.eval.metrics import multitask_score
    from pipeline.train.driver import train_driver
    from pipeline.tuning import trial_config

    c = spec.confirm
    top = sorted([r for r in rows if r["status"] == "finished" and not r["baseline"] and r["best_score"] == r["best_score"]],
                 key=lambda r: -r["best_score"])[:c.top_k]
    candidates = {INCUMBENT: {}, **{f"trial {r['trial']}": r["config"] for r in top}}
    seeds = [base.seed + i for i in range(c.seeds)]
    specs = base.task_specs()
    configs, scores, runs = {}, {}, {}
    for label, params in candidates.items():
        raw = config_to_dict(trial_config(base, params, spec))
        raw["train"].update(eval_every=base.train.eval_every, checkpoint_every=base.train.checkpoint_every)  # not Tune's cadence
        apply_overrides(raw, c.overrides)
        configs[label] = Config.model_validate(raw)
        for seed in seeds:
            name = f"{spec.name}-confirm-{label.replace(' ', '-')}-s{seed}"
            log(f"confirm {label}, seed {seed} ({configs[label].train.steps} steps): run {name}")
            r = train_driver(configs[label].model_copy(update={"seed": seed}), run_name=name,
                             parent_run_id=parent_run_id, log=log)
            scores.setdefault(label, []).append(multitask_score(r.dev_metrics, specs))
            runs.setdefault(label, []).append(storage.join(storage.resolve(base.train.storage_path), name))
    table, winner = decide(scores)
    best_seed = max(range(len(seeds)), key=lambda i: scores[winner][i])
    return {"table": table, "winner": winner, "config": configs[winner], "run_dir": runs[winner][best_seed],
            "seeds": seeds, "markdown": confirm_markdown(table, winner, seeds, configs[winner].train.steps)}


def summarise(grid, spec, base, parent_run_id: str | None, uri: str, out: Path, log=print) -> dict:
    """Write trials.md/json, best_config.yaml and the plot; with a `confirm:` stage retrain the top trials and
    the own values over seeds first (the confirmed winner is then the best config); log them to the parent
    run; register the winner's model as `challenger` when `register_as` is set — after a confirm stage only
    when the winner beats the own values beyond noise."""
    import yaml

    from pipeline import storage
    from pipeline.config import config_to_dict
    from pipeline.tracking import TuneParent
    from pipeline.tuning import trial_config

    parent = TuneParent.reopen(uri, False, parent_run_id, resume=False)
    rows = trial_rows(grid, spec, base, parent)
    best = best_row(rows)
    out.mkdir(parents=True, exist_ok=True)
    winner_cfg = trial_config(base, best["config"], spec)
    header = f"# Best trial {best['trial']} of Tune experiment {spec.name}: dev score {best['best_score']:.2f}.\n"
    register_dir = storage.join(storage.resolve(base.train.storage_path), best["run_name"])
    confirmed, files = None, ["trials.md", "trials.json", "best_config.yaml", "weights_vs_score.png"]
    if spec.confirm is not None:
        confirmed = confirm(spec, base, rows, parent_run_id, log)
        winner_cfg = confirmed["config"]
        header = (f"# Confirmed winner of Tune experiment {spec.name}: {confirmed['winner']} "
                  f"({len(confirmed['seeds'])} seeds; see confirm.md).\n")
        register_dir = confirmed["run_dir"] if confirmed["winner"] != INCUMBENT else None
        (out / "confirm.md").write_text(confirmed["markdown"])
        (out / "confirm.json").write_text(json.dumps({k: v for k, v in confirmed.items() if k in ("table", "winner", "seeds")},
                                                     indent=2, default=lambda o: getattr(o, "__dict__", str(o))))
        files += ["confirm.md", "confirm.json"]
    best_cfg = config_to_dict(winner_cfg)
    best_cfg["name"] = f"{spec.name}-best"
    best_cfg["tracking"]["experiment"] = base.tracking.experiment
    header += f"# Retrain with: python jobs/train.py --config {out / 'best_config.yaml'}\n"
    (out / "best_config.yaml").write_text(header + yaml.safe_dump(best_cfg, sort_keys=False))
    (out / "trials.md").write_text(trials_markdown(rows, best, spec, base) + ("\n" + confirmed["markdown"] if confirmed else ""))
    (out / "trials.json").write_text(json.dumps({"experiment": spec.name, "best_trial": best["trial"],
                                                 "parent_run_id": parent_run_id, "trials": rows}, indent=2, default=str))
    weights_figure(rows, list(base.tasks), out / "weights_vs_score.png")
    summary = {"rows": rows, "best": best, "out": str(out), "version": None, "confirm": confirmed}
    if parent is None:
        return summary
    tags = {"mtl.best_trial": best["run_name"], **({"mtl.best_run_id": best["run_id"]} if best["run_id"] else {})}
    metrics = {"best_score": best["best_score"], "trials_finished": sum(r["status"] == "finished" for r in rows),
               "trials_stopped": sum(r["status"].startswith("stopped") for r in rows),
               "steps_total": sum(r["steps"] for r in rows)}
    if confirmed:
        tags["mtl.confirmed_winner"] = confirmed["winner"]
        for r in confirmed["table"]:
            key = r["config"].replace(" ", "_")
            metrics[f"confirm/{key}/mean"] = r["score"].mean
            if r["difference"] is not None:
                metrics[f"confirm/{key}/difference"] = r["difference"].mean
    if spec.register_as and register_dir is None:
        tags["mtl.registered"] = "none: no config beats the own values beyond noise"
        log(f"not registered: no searched config beats the training config's own values beyond noise "
            f"(confirm.md); {spec.register_as}'s current versions stay as they are")
    elif spec.register_as:
        from pipeline.registry import register_run_model, registry_client
        info, version = register_run_model(registry_client(uri, "tracking.uri"), register_dir, spec.register_as,
                                           alias="challenger",
                                           extra_tags={"tune_experiment": spec.name, "tune_parent_run": parent_run_id})
        summary["version"] = version.version
        tags["mtl.registered"] = f"{spec.register_as} v{version.version}"
        log(f"registered {spec.register_as} version {version.version} ({info.model_uri}) as @challenger; "
            f"promote with: python jobs/register.py --name {spec.register_as} --promote {version.version}")
    parent.finish([out / n for n in files], metrics, tags)
    return summary
