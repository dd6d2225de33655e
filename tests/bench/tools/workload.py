"""The training benchmark's workload for the tools in this folder: the config with its global batch spread over
`processes` (2 cores in all) and profiling on, the prepared tasks, the sampling ratios and the loss weights, as
`pipeline.benchmarks.train.run` sets them up."""


def workload(config: str, overrides: list[str], processes: int):
    """(per-process config, prepared tasks, sampling ratios, weights)."""
    from pipeline.config import load_config
    from pipeline.data.preprocess import prepare_tasks
    from pipeline.train.driver import rows_used
    from pipeline.train.mixing import normalise_weights, sampling_ratios

    cfg = load_config(config, overrides)
    prepared = prepare_tasks(cfg, log=lambda _: None)
    rows = rows_used(cfg, prepared)
    ratios = sampling_ratios(cfg.sampling.strategy, rows, {t: cfg.tasks[t].ratio for t in rows}, cfg.sampling.temperature)
    weights = normalise_weights({t: cfg.tasks[t].weight for t in rows})
    batch = cfg.train.batch_size * cfg.train.num_workers  # the global batch, as in the benchmark
    base = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "num_workers": processes, "cpus_per_worker": 2 / processes, "batch_size": batch // processes, "profile": True})})
    return base, prepared, ratios, weights
