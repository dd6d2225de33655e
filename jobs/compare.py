"""ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/compare.py --budget small data.glue_dir=GLUE

The paper's comparison table: the multi-task model (equal weights, and a tuned config when given)
against single-task models on the same backbone and the Bi-LSTM + attention baseline, on the same
tasks and dev rows. Writes `comparison.md` / `comparison.json`, logs them to an MLflow run, and logs a
training-loss plot (PNG) to every model's MLflow run.

    python jobs/compare.py --budget small data.glue_dir=path/to/glue                  # ~45 min on 2 CPU cores
    python jobs/compare.py --config jobs/configs/glue.yaml data.glue_dir=path/to/glue train.steps=3000
    python jobs/compare.py --budget small --tuned best_config.yaml data.glue_dir=path/to/glue

Budget semantics (the paper's same-data comparison): each single-task model gets exactly as many
optimizer steps on its task (same batch size) as the multi-task run's sampler drew for that task;
each Bi-LSTM gets the same number of steps. The multi-task run is trained first for that reason.
With the CPU backbone (minilm-l6) the single-task rows are also the paper's BERT-style baseline.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a working dir without install

from pipeline.errors import exits_on_bad_input  # noqa: E402
from pipeline.runtime import job_parser, output_dir  # noqa: E402

BUDGETS = {"small": "jobs/configs/compare_small.yaml"}
GPT_NOTE = ("GPT-3 / GPT-4 rows of the paper are not reproduced: they need hosted models (no network "
            "here, and their outputs are not open); compare against the paper's published numbers instead.")


def parser():
    p = job_parser(__doc__)
    p.add_argument("--budget", choices=sorted(BUDGETS), help="a packaged comparison size (overrides --config)")
    p.add_argument("--tuned", help="best-config YAML from a search: adds a 'multi-task (tuned)' row")
    p.add_argument("--out", default="compare_results", help="output folder (default: %(default)s)")
    p.add_argument("--skip-single-task", action="store_true", help="only the multi-task and Bi-LSTM rows")
    return p


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    from pipeline.compare import Row, loss_figure, merge_rows, run_bilstm, single_task_config, table_markdown, tuned_config
    from pipeline.config import load_config
    from pipeline.data.preprocess import prepare_tasks
    from pipeline.runtime import init_ray
    from pipeline.train.driver import dev_rows, train_driver
    from pipeline.train.tracking import experiment_id, open_tracking, tracking_uri

    start = time.monotonic()
    config_path = BUDGETS[args.budget] if args.budget else args.config
    cfg = load_config(config_path, args.overrides)
    specs = cfg.task_specs()
    init_ray(verbose=args.verbose)
    prepared = prepare_tasks(cfg)  # fail on data problems before any training starts
    out = output_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def trained(name: str, c, note: str = "") -> Row:
        print(f"\n=== {name}: {', '.join(c.tasks)} for {c.train.steps} steps ===", flush=True)
        r = train_driver(c, config_path=config_path)
        return Row(name, r.dev_metrics, r.steps, r.wall_seconds, [r.run_id] if r.run_id else [], note), r

    rows: list[Row] = []
    mtl_row, mtl = trained("multi-task (equal weights)", cfg)
    rows.append(mtl_row)
    steps = mtl.task_steps
    print(f"steps the multi-task sampler drew per task: {steps}", flush=True)
    if args.tuned:
        rows.append(trained("multi-task (tuned)", tuned_config(cfg, args.tuned))[0])
    if not args.skip_single_task:
        singles = [trained(f"single-task {t}", single_task_config(cfg, t, steps[t]))[0] for t in cfg.tasks if steps.get(t)]
        rows.append(merge_rows(f"single-task ({cfg.model.name}, one model per task)", singles))

    uri = tracking_uri(cfg.tracking.uri)
    client = open_tracking(uri, cfg.tracking.required, doing="the Bi-LSTM baselines and the comparison")
    tracking = (client, experiment_id(client, cfg.tracking.experiment or cfg.name, uri)) if client else None
    bilstm = []
    for t, spec in specs.items():
        if spec.kind == "summarization" or not steps.get(t):
            continue
        print(f"\n=== Bi-LSTM + attention: {t} for {steps[t]} steps ===", flush=True)
        dev = dev_rows(prepared[t], cfg.tasks[t].max_rows.get("validation"), cfg.seed)
        bilstm.append(run_bilstm(cfg, prepared, t, steps[t], dev, tracking))
    if bilstm:
        rows.append(merge_rows("Bi-LSTM + attention (from scratch, one per task)", bilstm))

    summarization = [t for t, s in specs.items() if s.kind == "summarization"]
    notes = [
        f"Dev splits; the multi-task run trained {cfg.train.steps} steps of batch {cfg.train.batch_size} × "
        f"{cfg.train.num_workers} workers; the sampler drew {', '.join(f'{t} {n}' for t, n in steps.items())} steps.",
        "Single-task models and Bi-LSTMs get exactly those per-task step counts (same data seen); their train "
        "steps/wall are sums over the per-task models. Wall time includes start-up and evaluation.",
        "Values are ×100: classification accuracy (or the task's primary metric), STS-B Pearson, ROUGE F1. "
        "`GLUE-style avg` averages the classification/regression primary metrics; `all-task score` adds "
        "ROUGE-1 for summarization (the training runs' multi-task score).",
    ]
    if summarization:
        notes.append(f"Bi-LSTM rows have no summarization model ({', '.join(summarization)}: n/a); the paper's "
                     "LSTM encoder-decoder baseline is not implemented.")
    notes.append(GPT_NOTE)
    table = table_markdown(rows, specs, notes)
    command = "python jobs/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = f"# Comparison: {cfg.name}\n\nCommand: `{command}`\n\n{table}"
    (out / "comparison.md").write_text(report)
    (out / "comparison.json").write_text(json.dumps(
        {"command": command, "config": config_path, "rows": [r.__dict__ for r in rows], "task_steps": steps}, indent=1))
    print("\n" + report)

    if tracking is not None:
        client, experiment_id = tracking
        for row in rows:
            for run_id in row.run_ids:
                fig = loss_figure(client, run_id, row.model)
                client.log_figure(run_id, fig, "training_loss.png")
        run = client.create_run(experiment_id, run_name=f"compare-{cfg.name}", tags={"mtl.kind": "comparison"})
        client.log_artifact(run.info.run_id, str(out / "comparison.md"))
        client.log_artifact(run.info.run_id, str(out / "comparison.json"))
        client.set_terminated(run.info.run_id)
        print(f"MLflow comparison run: {run.info.run_id} ({uri})")
    print(f"done in {(time.monotonic() - start) / 60:.1f} min -> {out / 'comparison.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
