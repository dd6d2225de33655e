"""ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/tune.py --config jobs/configs/tune_default.yaml

Search task loss weights, sampling ratios (and learning-rate knobs, dynamic weighting methods) with
Ray Tune. Each trial is a full multi-task training run (a TorchTrainer on its own workers) that
reports the dev multi-task score and every per-task metric at each evaluation; ASHA stops weak
trials early. Without a cluster it starts a local Ray instance:

    python jobs/tune.py --config jobs/configs/tune_default.yaml
    python jobs/tune.py --config jobs/configs/tune_default.yaml num_samples=4 train.steps=60 asha.grace_period=20
    python jobs/tune.py --config jobs/configs/tune_default.yaml --resume      # continue an interrupted experiment

Overrides whose first key is a tune-spec field (num_samples, search, asha.*, report_every, ...)
change the spec; the others (train.*, tasks.*, ...) the training config it names.

MLflow: one parent run per experiment (in the experiment `name`), one nested child run per trial
with its normalised weights, ratios and metrics. At the end, written to --out and logged to the
parent run: trials.md / trials.json (every trial's weights, ratios, score, status), best_config.yaml
(a training config `jobs/train.py --config` accepts as-is), weights_vs_score.png. With `register_as`
the best trial's best model becomes a new registered version with alias `challenger`; promoting it
to `champion` stays a human step (`jobs/register.py --promote`). Trials and their checkpoints live
in train.storage_path: the experiment in `<name>/`, each trial's run in `<name>-<trial id>/`.
Exit status 2 means bad input.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a working dir without install

from pipeline.errors import PipelineError, exits_on_bad_input  # noqa: E402
from pipeline.runtime import init_ray, job_parser, output_dir  # noqa: E402

PARENT_FILE = "mtl_tune.json"  # in the experiment folder: the MLflow parent run id, for --resume


def run_experiment(spec, base, *, resume: bool = False, log=print):
    """Fit (or restore and finish) the experiment; returns (ResultGrid, parent run id, tracking uri,
    the training config with absolute paths that every trial started from)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipeline.config import config_to_dict
    from pipeline import storage as store
    from pipeline.train.tracking import experiment_id, flatten_params, open_tracking, tracking_uri
    from pipeline.tuning import (METRIC, MODE, TIME_ATTR, TRIAL_DRIVER_CPU, baseline_point, max_concurrent, param_space,
                                 trial_run_name, tune_trial)

    storage = store.resolve(base.train.storage_path)
    exp_dir = store.join(storage, spec.name)
    uri = tracking_uri(base.tracking.uri)
    # Tune runs each trial in its own working directory: everything relative (the default sqlite
    # store in the working dir, relative data or run folders) is pinned here, so trials log into
    # the parent's store and read the same cache.
    base = absolute_paths(base, uri, storage)
    parent_run_id = None
    client = open_tracking(uri, base.tracking.required, "tuning")

    if resume:
        if not tune.Tuner.can_restore(exp_dir):
            raise PipelineError.one("--resume", f"no Tune experiment {spec.name!r} under {storage}",
                                    "start it without --resume, or set name / train.storage_path to where it lives")
        parent_run_id = json.loads(store.read_text(store.join(exp_dir, PARENT_FILE))).get("parent_run_id")
        if client is not None and parent_run_id:
            client.update_run(parent_run_id, status="RUNNING")
    else:
        if store.is_dir(exp_dir):
            raise PipelineError.one("name", f"a Tune experiment {spec.name!r} already exists in {exp_dir}",
                                    "continue it with --resume, or choose another name (name=...)")
        if client is not None:
            parent = client.create_run(experiment_id(client, spec.name, uri), run_name=spec.name, tags={"mtl.kind": "tune"})
            parent_run_id = parent.info.run_id
            params = flatten_params({k: v for k, v in spec.model_dump(mode="json").items() if k != "overrides"})
            params["train_overrides"] = " ".join(spec.overrides)[:6000]
            from mlflow.entities import Param
            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):
                client.log_batch(parent_run_id, params=items[i:i + 100])
            client.log_text(parent_run_id, json.dumps(config_to_dict(base), indent=2), "config/base_config.json")

    resources = ray.cluster_resources()
    concurrent = max_concurrent(spec, base, resources)
    # Build (or check) every task's cache once, here: trials then only read it. Search values
    # (weights, ratios, learning rates) never change the cache key.
    from ray.data import DataContext

    from pipeline.data.preprocess import prepare_tasks
    prepare_tasks(base, log=log)
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
        first = [baseline_point(spec, base)] if spec.baseline and spec.search != "grid" else None
        if first:
            log("trial 1 is the training config's own values: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float)
                                                                            else f"{k}={v}" for k, v in first[0].items()))
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
        store.write_text(store.join(exp_dir, PARENT_FILE), json.dumps({"parent_run_id": parent_run_id, "tracking_uri": uri}))
    try:
        grid = tuner.fit()
    except Exception:
        if client is not None and parent_run_id:
            client.set_terminated(parent_run_id, status="FAILED")
        raise
    return grid, parent_run_id, uri, base


def absolute_paths(base, uri: str, storage: str):
    """The training config with its tracking URI and local paths made absolute."""
    data = base.data.model_copy(update={k: Path(v).expanduser().resolve() for k in ("cache_dir", "glue_dir", "cache_path")
                                        if (v := getattr(base.data, k)) is not None})
    return base.model_copy(update={"data": data, "tracking": base.tracking.model_copy(update={"uri": uri}),
                                   "train": base.train.model_copy(update={"storage_path": storage})})


def trial_rows(grid, spec, base, client=None, parent_run_id: str | None = None) -> list[dict]:
    """One row per trial: its normalised weights and ratios (as the run logged them), status, steps
    and scores. ASHA-stopped trials' child runs are closed as KILLED."""
    from pipeline.tuning import METRIC, trial_config, trial_run_name

    children = {}
    if client is not None and parent_run_id:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        for run in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10000):
            children[run.data.tags.get("mtl.run_name")] = run
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
        if child is not None and status != "finished":  # a stopped trial's driver may have marked it FAILED
            client.set_tag(child.info.run_id, "mtl.tune_status", status)
            client.set_terminated(child.info.run_id, status="KILLED" if status.startswith("stopped") else "FAILED")
        elif child is not None and child.info.status == "RUNNING":  # Tune stopped the driver right after its last
            client.set_terminated(child.info.run_id, status="FINISHED")  # result, before it closed the run
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


def summarise(grid, spec, base, parent_run_id: str | None, uri: str, out: Path, log=print) -> dict:
    """Write trials.md/json, best_config.yaml and the plot; log them to the parent run; register the
    best model as `challenger` when `register_as` is set."""
    import yaml

    from pipeline.config import config_to_dict
    from pipeline.train.tracking import check_reachable
    from pipeline.tuning import trial_config

    client = None
    if parent_run_id and not check_reachable(uri):
        from mlflow.tracking import MlflowClient
        client = MlflowClient(uri)
    rows = trial_rows(grid, spec, base, client, parent_run_id)
    best = best_row(rows)
    out.mkdir(parents=True, exist_ok=True)
    best_cfg = config_to_dict(trial_config(base, best["config"], spec))
    best_cfg["name"] = f"{spec.name}-best"
    best_cfg["tracking"]["experiment"] = base.tracking.experiment
    header = (f"# Best trial {best['trial']} of Tune experiment {spec.name}: dev score {best['best_score']:.2f}.\n"
              f"# Retrain with: python jobs/train.py --config {out / 'best_config.yaml'}\n")
    (out / "best_config.yaml").write_text(header + yaml.safe_dump(best_cfg, sort_keys=False))
    (out / "trials.md").write_text(trials_markdown(rows, best, spec, base))
    (out / "trials.json").write_text(json.dumps({"experiment": spec.name, "best_trial": best["trial"],
                                                 "parent_run_id": parent_run_id, "trials": rows}, indent=2, default=str))
    weights_figure(rows, list(base.tasks), out / "weights_vs_score.png")
    summary = {"rows": rows, "best": best, "out": str(out), "version": None}
    if client is not None:
        for name in ("trials.md", "trials.json", "best_config.yaml", "weights_vs_score.png"):
            client.log_artifact(parent_run_id, str(out / name), "tune")
        client.log_metric(parent_run_id, "best_score", best["best_score"])
        client.log_metric(parent_run_id, "trials_finished", sum(r["status"] == "finished" for r in rows))
        client.log_metric(parent_run_id, "trials_stopped", sum(r["status"].startswith("stopped") for r in rows))
        client.log_metric(parent_run_id, "steps_total", sum(r["steps"] for r in rows))
        client.set_tag(parent_run_id, "mtl.best_trial", best["run_name"])
        if best["run_id"]:
            client.set_tag(parent_run_id, "mtl.best_run_id", best["run_id"])
        if spec.register_as:
            import mlflow

            from pipeline.registry import register_run_model
            mlflow.set_tracking_uri(uri)
            from pipeline import storage
            run_dir = storage.join(storage.resolve(base.train.storage_path), best["run_name"])
            info, version = register_run_model(client, run_dir, spec.register_as, alias="challenger",
                                               extra_tags={"tune_experiment": spec.name, "tune_parent_run": parent_run_id})
            summary["version"] = version.version
            client.set_tag(parent_run_id, "mtl.registered", f"{spec.register_as} v{version.version}")
            log(f"registered {spec.register_as} version {version.version} ({info.model_uri}) as @challenger; "
                f"promote with: python jobs/register.py --name {spec.register_as} --promote {version.version}")
        client.set_terminated(parent_run_id, status="FINISHED")
    return summary


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__)
    parser.set_defaults(config="jobs/configs/tune_default.yaml")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted experiment of this spec's name (finished trials are not rerun)")
    parser.add_argument("--out", help="where the summary files go (default: tune_results/<name>)")
    args = parser.parse_intermixed_args(argv)
    from pipeline.tuning import load_tune_spec

    start = time.monotonic()
    spec, base = load_tune_spec(args.config, args.overrides)
    init_ray(verbose=args.verbose)
    grid, parent_run_id, uri, base = run_experiment(spec, base, resume=args.resume)
    out = output_dir(args.out or str(Path("tune_results") / spec.name))
    summary = summarise(grid, spec, base, parent_run_id, uri, out)
    print()
    print((out / "trials.md").read_text())
    best = summary["best"]
    print(f"best trial {best['trial']}: dev score {best['best_score']:.2f} "
          f"(weights {', '.join(f'{t} {w:.2f}' for t, w in best['weights'].items())}; "
          f"ratios {', '.join(f'{t} {p:.2f}' for t, p in best['ratios'].items())})")
    print(f"best config: {out / 'best_config.yaml'}  (python jobs/train.py --config {out / 'best_config.yaml'})")
    baseline = next((r for r in summary["rows"] if r["baseline"]), None)
    if baseline is not None:
        print(f"the training config's own values (trial {baseline['trial']}, {baseline['status']}, {baseline['steps']} steps): "
              f"dev score {baseline['best_score']:.2f}")
    if parent_run_id:
        print(f"MLflow parent run: {parent_run_id} ({uri})")
    print(f"took {time.monotonic() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
