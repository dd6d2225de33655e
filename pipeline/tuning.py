"""Ray Tune over task loss weights and sampling ratios: the search spec, the trial's config, the
trainable, and how many trials fit on the cluster.

    spec, base = load_tune_spec("jobs/configs/tune_default.yaml", ["num_samples=4"])
    space = param_space(spec, base)                 # {"weight.sst2": tune.loguniform(...), ...}
    cfg = trial_config(base, sampled_params, spec)  # a plain training Config for one trial

A tune spec (YAML, strict like the training config) names a training config and what to search:

    train_config: default.yaml          # relative to this file
    num_samples: 8
    search: random                      # random | grid | optuna (TPE)
    scheduler: asha                     # asha | fifo
    asha: {grace_period: 40, reduction_factor: 2}   # in optimizer steps
    report_every: 20                    # steps between dev evaluations = Tune reports
    checkpoint_every: 60                # steps between a trial's checkpoints (unset: every report)
    space:
      weights: {low: 0.25, high: 4, log: true}      # per task; normalised to sum to the number of tasks
      sampling:
        strategy: [temperature, explicit]
        temperature: {low: 1, high: 8}
        ratios: {low: 0.05, high: 1}                 # per task, explicit trials only; normalised to sum to 1
      lr: {low: 2e-5, high: 2e-4, log: true}
      weighting: [static, gradcos]
    points_to_evaluate:                 # optional: tried first (after the baseline), e.g. an earlier trial's config
      - {weight.sst2: 2.0, weight.cola: 0.5, sampling.strategy: temperature, sampling.temperature: 3.0}

A dimension is a list (a categorical; a grid axis with `search: grid`) or a range {low, high, log}.
Each trial trains through `train_driver` (a Tune function trainable that fits a TorchTrainer, the
Ray Train v2 pattern), reports the dev multi-task score and every per-task metric at each
evaluation, and logs into an MLflow child run nested under the experiment's parent run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, model_validator

from pipeline.config import (SAMPLING_STRATEGIES, WEIGHTING_OPTIONS, Config, Strict, apply_overrides, config_to_dict,
                             load_config, problems_from, read_yaml)
from pipeline.errors import PipelineError, Problem
from pipeline.train.mixing import normalise_ratios, normalise_weights

METRIC, MODE, TIME_ATTR = "dev/score", "max", "step"
TRIAL_DRIVER_CPU = 0.001  # the trial's driver function only waits on its TorchTrainer (Ray refuses 0)
DATA_CPU = 1.0  # kept free on the cluster for the Ray Data tasks that read each trial's data
WEIGHTINGS = tuple(WEIGHTING_OPTIONS)


class Range(Strict):
    low: float
    """Lower bound (inclusive)."""
    high: float
    """Upper bound."""
    log: bool = False
    """Sample on a log scale (bounds must be > 0)."""

    @model_validator(mode="after")
    def _bounds(self) -> "Range":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


def _dim(value: Any) -> "list | Range":
    """A search dimension: a non-empty list of values, or a {low, high, log} range."""
    if isinstance(value, Range):
        return value
    if isinstance(value, dict):
        try:
            return Range.model_validate(value)
        except ValidationError as err:
            raise ValueError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'range'}: {e['msg'].removeprefix('Value error, ')}"
                                       for e in err.errors(include_url=False))
                             + " — write {low: ..., high: ..., log: true|false}") from None
    if isinstance(value, list) and value and all(isinstance(v, (int, float, str)) for v in value):
        return value
    raise ValueError(f"{value!r} is neither a list of values nor a range — write [a, b, ...] or {{low: ..., high: ...}}")


Dim = Annotated[Any, AfterValidator(_dim)]


class SamplingSpace(Strict):
    strategy: list[Literal[SAMPLING_STRATEGIES]] | None = None
    """Sampling strategies to try (unset: the training config's)."""
    online: list[bool] | None = None
    """Online mixing off/on (`[false, true]`: searched as a categorical)."""
    temperature: Dim | None = None
    """Temperature of `temperature` trials."""
    ratios: Dim | None = None
    """Per-task sampling ratio of `explicit` trials, normalised to sum to 1 (a point on the simplex)."""


class Space(Strict):
    weights: Dim | None = None
    """Per-task loss weight, normalised to sum to the number of tasks."""
    sampling: SamplingSpace = SamplingSpace()
    lr: Dim | None = None
    """train.lr"""
    head_lr_mult: Dim | None = None
    """train.head_lr_mult"""
    warmup_steps: list[int] | None = None
    """train.warmup_steps"""
    weighting: list[Literal[WEIGHTINGS]] | None = None
    """train.weighting: static weights or a dynamic method, searched as a categorical."""
    adapter_r: list[int] | None = None
    """model.adapter.r: the LoRA rank, searched as a categorical (the training config must set model.adapter)."""


class AshaSpec(Strict):
    grace_period: int = Field(40, ge=1)
    """Steps every trial trains before ASHA may stop it."""
    reduction_factor: float = Field(2.0, gt=1)
    """Each rung keeps 1/reduction_factor of the trials."""


class ConfirmSpec(Strict):
    top_k: int = Field(2, ge=1)
    """The best finished trials whose configs are retrained (beside the training config's own values)."""
    seeds: int = Field(3, ge=2)
    """Seeds per config (at least 2: an interval needs two)."""
    overrides: list[str] = []
    """`key=value` overrides of every retrained config: the full budget (e.g. `train.steps=120`, when the
    search trained shorter runs)."""


class TuneSpec(Strict):
    train_config: Path
    """The training config every trial starts from (relative to the spec file)."""
    overrides: list[str] = []
    """`key=value` overrides of the training config, applied before the search space."""
    name: str | None = None
    """Experiment name: Tune's folder and the MLflow experiment (default: `<training name>-tune`)."""
    num_samples: int = Field(8, ge=1)
    """Trials (with `search: grid`: repeats of the whole grid)."""
    search: Literal["random", "grid", "optuna"] = "random"
    """Search algorithm: random sampling, a full grid (every dimension a list), or Optuna's TPE."""
    seed: int = 0
    """Seed of the search algorithm."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """ASHA stops weak trials early on the dev multi-task score; fifo runs every trial to the end."""
    asha: AshaSpec = AshaSpec()
    report_every: int = Field(20, ge=1)
    """Steps between dev evaluations (each one a Tune report)."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Steps between a trial's checkpoints, a multiple of report_every (the last step is always checkpointed);
    unset: at every report. A checkpoint holds the model and optimizer states: what a failed trial or a
    restored experiment continues from. Fewer of them make every trial cheaper (`jobs/benchmark.py tune-cost`,
    docs/performance.md: 138 vs 144 s per trial on MiniLM), and a failure redoes more steps."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials at once (default: as many as the cluster's CPUs/GPUs hold, see docs/guide.md)."""
    space: Space = Space()
    register_as: str | None = None
    """Registered model name for the best trial's model (alias `challenger`); unset: not registered."""
    baseline: bool = True
    """Make the first trial the training config's own values (e.g. equal weights), so every
    experiment scores its starting point side by side with what the search finds."""
    points_to_evaluate: list[dict[str, Any]] = []
    """Configurations tried first (after the baseline), in order, each replacing one of num_samples: dicts in
    param-space keys (`weight.<task>`, `ratio.<task>`, `sampling.strategy`, `sampling.temperature`, `train.lr`,
    ...; a trial's `config` in trials.json). Keys left out are sampled. E.g. to rerun an earlier experiment's best
    trials under another scheduler. Not with search: grid."""
    confirm: ConfirmSpec | None = None
    """After the search, retrain the top-k trials' configs and the training config's own values with several
    seeds; the winner must beat the own values beyond noise (paired by seed) to become best_config.yaml and
    to be registered. Unset: the best trial wins as it is."""


def load_tune_spec(path: str | Path, overrides: list[str] = ()) -> tuple[TuneSpec, Config]:
    """The spec and its validated base training config. Overrides whose first key is a spec field
    (`num_samples=4`, `asha.grace_period=10`) change the spec; the rest (`train.steps=60`) the
    training config."""
    path = Path(path)
    raw = read_yaml(path)
    def for_training(item: str) -> bool:  # a training-config key that is not also a spec key
        first = item.partition("=")[0].split(".")[0]
        return first not in TuneSpec.model_fields and first in Config.model_fields

    apply_overrides(raw, [o for o in overrides if not for_training(o)])
    raw.setdefault("overrides", [])
    if isinstance(raw["overrides"], list):
        raw["overrides"] = list(raw["overrides"]) + [o for o in overrides if for_training(o)]
    try:
        spec = TuneSpec.model_validate(raw)
    except ValidationError as err:
        raise PipelineError(problems_from(err, TuneSpec)) from None
    train_path = spec.train_config if spec.train_config.is_absolute() else path.parent / spec.train_config
    if not train_path.is_file():
        raise PipelineError.one("train_config", f"{train_path} not found", "name a training config relative to the tune spec")
    base = load_config(train_path, spec.overrides)
    spec = spec.model_copy(update={"train_config": train_path, "name": spec.name or f"{base.name}-tune"})
    _check(spec, base)
    return spec, base


def _check(spec: TuneSpec, base: Config) -> None:
    problems = []
    steps = base.train.steps
    if spec.report_every > steps:
        problems.append(Problem("report_every", f"{spec.report_every} is more than train.steps ({steps})",
                                "report at most every train.steps steps"))
    if spec.checkpoint_every is not None and spec.checkpoint_every % spec.report_every:
        problems.append(Problem("checkpoint_every", f"{spec.checkpoint_every} is not a multiple of report_every "
                                f"({spec.report_every}): a checkpoint comes with an evaluation",
                                f"use a multiple of {spec.report_every}, e.g. {spec.report_every * max(1, round(spec.checkpoint_every / spec.report_every))}"))
    if spec.scheduler == "asha" and spec.asha.grace_period >= steps:
        problems.append(Problem("asha.grace_period", f"{spec.asha.grace_period} steps is not below train.steps ({steps})",
                                "use a grace period shorter than the training run, or scheduler: fifo"))
    if spec.scheduler == "asha" and spec.asha.grace_period < spec.report_every:
        problems.append(Problem("asha.grace_period", f"{spec.asha.grace_period} steps is shorter than report_every "
                                f"({spec.report_every}): no score exists yet when ASHA first decides",
                                "use a grace period of at least report_every steps"))
    if spec.search == "grid":
        s = spec.space
        for key, dim in (("weights", s.weights), ("sampling.temperature", s.sampling.temperature),
                         ("sampling.ratios", s.sampling.ratios), ("lr", s.lr), ("head_lr_mult", s.head_lr_mult)):
            if isinstance(dim, Range):
                problems.append(Problem(f"space.{key}", "is a range, but search: grid needs a list of values",
                                        "write the values to try as a list, or use search: random/optuna"))
    strategies = spec.space.sampling.strategy or [base.sampling.strategy]
    if "explicit" in strategies and spec.space.sampling.ratios is None and any(t.ratio is None for t in base.tasks.values()):
        problems.append(Problem("space.sampling.ratios", "explicit sampling is searched but no ratios are given",
                                "add space.sampling.ratios, or give every task a ratio in the training config"))
    if spec.space.adapter_r is not None and base.model.adapter is None:
        problems.append(Problem("space.adapter_r", "searches the LoRA rank, but the training config trains no adapters",
                                "set model.adapter in the training config (e.g. model.adapter={r: 8}), or drop adapter_r"))
    if spec.space.adapter_r is not None and any(r < 1 for r in spec.space.adapter_r):
        problems.append(Problem("space.adapter_r", f"{spec.space.adapter_r} holds a rank below 1", "use ranks >= 1"))
    problems += _point_problems(spec, base)
    if len(base.tasks) < 2 and (spec.space.weights or spec.space.sampling.ratios):
        problems.append(Problem("space.weights", "searching task balance needs at least two tasks",
                                "add tasks to the training config"))
    if problems:
        raise PipelineError(problems)


def _point_problems(spec: TuneSpec, base: Config) -> list[Problem]:
    """Each given point: searched keys only, every value inside its dimension; room for all of them in num_samples."""
    if not spec.points_to_evaluate:
        return []
    if spec.search == "grid":
        return [Problem("points_to_evaluate", "is given, but search: grid tries every grid point itself",
                        "use search: random or optuna, or drop points_to_evaluate")]
    problems, dims = [], dict(_dims(spec, base))
    for i, point in enumerate(spec.points_to_evaluate):
        for key, value in point.items():
            dim = dims.get(key)
            if dim is None:
                problems.append(Problem(f"points_to_evaluate[{i}].{key}", "is not a searched key",
                                        f"use one of {', '.join(dims) or '(nothing is searched)'}"))
            elif isinstance(dim, Range) and not (isinstance(value, (int, float)) and dim.low <= value <= dim.high):
                problems.append(Problem(f"points_to_evaluate[{i}].{key}", f"{value!r} is outside its range "
                                        f"[{dim.low:g}, {dim.high:g}]", "use a value inside the searched range"))
            elif isinstance(dim, list) and value not in dim:
                problems.append(Problem(f"points_to_evaluate[{i}].{key}", f"{value!r} is not one of {dim}",
                                        "use one of the searched values"))
    first = len(spec.points_to_evaluate) + int(spec.baseline)
    if spec.num_samples < first:
        problems.append(Problem("num_samples", f"{spec.num_samples} is fewer than the {first} configurations tried first "
                                f"({len(spec.points_to_evaluate)} points_to_evaluate" + (" and the baseline)" if spec.baseline else ")"),
                                f"use num_samples={first} or more"))
    return problems


def _dims(spec: TuneSpec, base: Config) -> list[tuple[str, Dim]]:
    """(param key, dimension) of every searched value; per-task dimensions expand to one key per task."""
    s = spec.space
    dims: list[tuple[str, Dim]] = []
    if s.weights is not None:
        dims += [(f"weight.{t}", s.weights) for t in base.tasks]
    if s.sampling.strategy is not None:
        dims.append(("sampling.strategy", list(s.sampling.strategy)))
    if s.sampling.online is not None:
        dims.append(("sampling.online", list(s.sampling.online)))
    if s.sampling.temperature is not None:
        dims.append(("sampling.temperature", s.sampling.temperature))
    if s.sampling.ratios is not None:
        dims += [(f"ratio.{t}", s.sampling.ratios) for t in base.tasks]
    for key in ("lr", "head_lr_mult", "warmup_steps", "weighting"):
        if getattr(s, key) is not None:
            dims.append((f"train.{key}", getattr(s, key)))
    if s.adapter_r is not None:
        dims.append(("model.adapter.r", list(s.adapter_r)))
    return dims


def param_space(spec: TuneSpec, base: Config) -> dict[str, Any]:
    """Tune's param_space: flat dotted keys (the same names the MLflow params use)."""
    from ray import tune

    def domain(dim: Dim):
        if isinstance(dim, Range):
            return (tune.loguniform if dim.log else tune.uniform)(dim.low, dim.high)
        return tune.grid_search(list(dim)) if spec.search == "grid" else tune.choice(list(dim))

    return {key: domain(dim) for key, dim in _dims(spec, base)}


def baseline_point(spec: TuneSpec, base: Config) -> dict[str, Any]:
    """The training config's own values, in param-space keys (Tune's `points_to_evaluate`). Keys
    whose dimension cannot hold the config's value are left to the search."""
    values: dict[str, Any] = {}
    weights = normalise_weights({t: c.weight for t, c in base.tasks.items()})
    for key, dim in _dims(spec, base):
        kind, _, name = key.partition(".")
        if kind == "weight":
            value = weights[name]
        elif kind == "ratio":
            value = base.tasks[name].ratio
            if value is None:  # not an explicit-sampling config: ratios are not used by its first trial
                value = dim.low if isinstance(dim, Range) else dim[0]
        elif key == "model.adapter.r":
            value = base.model.adapter.r
        else:
            value = getattr(base.sampling if kind == "sampling" else base.train, name)
        if isinstance(dim, Range) and dim.low <= value <= dim.high or isinstance(dim, list) and value in dim:
            values[key] = value
    return values


def trial_config(base: Config | dict, params: dict[str, Any], spec: TuneSpec) -> Config:
    """The training config of one trial: the base config with the trial's values. Weights are stored
    normalised (sum = number of tasks) and ratios normalised (sum = 1), so the config reproduces the
    trial as-is; ratios only apply to `explicit` trials."""
    raw = config_to_dict(base) if isinstance(base, Config) else dict(base)
    raw = {**raw, "tasks": {t: dict(v) for t, v in raw["tasks"].items()}, "sampling": dict(raw["sampling"]),
           "train": dict(raw["train"]), "tracking": dict(raw["tracking"]), "model": dict(raw["model"])}
    if "model.adapter.r" in params:
        raw["model"]["adapter"] = {**raw["model"]["adapter"], "r": int(params["model.adapter.r"])}
    tasks = list(raw["tasks"])
    if any(f"weight.{t}" in params for t in tasks):
        weights = normalise_weights({t: float(params.get(f"weight.{t}", raw["tasks"][t]["weight"])) for t in tasks})
        for t in tasks:
            raw["tasks"][t]["weight"] = round(weights[t], 6)
    for key in ("strategy", "temperature", "online"):
        if f"sampling.{key}" in params:
            raw["sampling"][key] = params[f"sampling.{key}"]
    if raw["sampling"]["strategy"] == "explicit":
        ratios = {t: float(params.get(f"ratio.{t}", raw["tasks"][t]["ratio"] or 0.0)) for t in tasks}
        if sum(ratios.values()) > 0:  # all zero: left as given, for the config's own check to name
            ratios = normalise_ratios(ratios)
        for t in tasks:
            raw["tasks"][t]["ratio"] = round(ratios[t], 6)
    else:
        for t in tasks:
            raw["tasks"][t]["ratio"] = None
    for key, value in params.items():
        if key.startswith("train."):
            raw["train"][key.split(".", 1)[1]] = value
    raw["train"]["eval_every"] = spec.report_every
    raw["train"]["checkpoint_every"] = spec.checkpoint_every or spec.report_every
    raw["tracking"]["experiment"] = spec.name  # children live in the parent's experiment
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise PipelineError(problems_from(err)) from None


def max_concurrent(spec: TuneSpec, base: Config, resources: dict[str, float]) -> int:
    """Trials that fit at once: each needs its workers (num_workers × cpus_per_worker CPUs, one GPU
    per worker with use_gpu) plus a sliver for its driver; DATA_CPU CPUs stay free for Ray Data.
    An explicit `max_concurrent_trials` wins when it fits. Fails fast when not even one trial fits."""
    workers_cpu = base.train.num_workers * base.train.cpus_per_worker
    cpus = resources.get("CPU", 0.0)
    fit = math.floor((cpus - DATA_CPU) / workers_cpu + 1e-9)
    if fit > 0 and fit * (workers_cpu + TRIAL_DRIVER_CPU) > cpus + 1e-9:  # the drivers' slivers must fit too
        fit -= 1
    need = f"{base.train.num_workers} workers × {base.train.cpus_per_worker:g} CPU + {DATA_CPU:g} CPU for data"
    if base.train.use_gpu:
        gpus = resources.get("GPU", 0.0)
        fit = min(fit, math.floor(gpus / base.train.num_workers + 1e-9))
        need += f", {base.train.num_workers} GPUs"
    if fit < 1:
        raise PipelineError.one("train.num_workers", f"one trial needs {need}, but the cluster has {cpus:g} CPUs"
                                + (f" and {resources.get('GPU', 0.0):g} GPUs" if base.train.use_gpu else ""),
                                "use fewer workers per trial or a smaller train.cpus_per_worker, or a bigger cluster")
    return min(fit, spec.max_concurrent_trials or fit)


def trial_run_name(experiment: str, trial_id: str) -> str:
    """A trial's training run name: derived from its trial id, so a restored trial continues its run."""
    return f"{experiment}-{trial_id}"


def tune_trial(params: dict[str, Any], *, base: dict[str, Any], spec: dict[str, Any], parent_run_id: str | None) -> None:
    """The Tune function trainable: one trial = one training run (a TorchTrainer fit by the driver),
    reporting each evaluation to Tune through TuneReportCallback."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.train.driver import train_driver

    from ray.data import DataContext
    DataContext.get_current().enable_progress_bars = False  # trials read a ready cache; bars would interleave

    tune_spec = TuneSpec.model_validate(spec)
    cfg = trial_config(base, params, tune_spec)
    run_name = trial_run_name(tune_spec.name, ray.tune.get_context().get_trial_id())
    train_driver(cfg, run_name=run_name, parent_run_id=parent_run_id, callbacks=[TuneReportCallback()])

