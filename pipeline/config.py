"""Typed, strict configuration: YAML files under jobs/configs/ plus dotted `key=value` overrides.

    cfg = load_config("jobs/configs/default.yaml", ["train.num_workers=1", "tasks.sst2.weight=2"])

Unknown keys, wrong types and impossible values fail at load time with one `PipelineError` that lists
every problem as `<key>: <what> — <fix>`. Relative paths are relative to the working directory.
"""

from __future__ import annotations

import codecs
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import PipelineError, Problem
from pipeline.model.refs import HOME
from pipeline.tasks import BUILTIN, Columns, FilesSource, SplitFiles, TaskRegistry, TaskSpec
from pipeline.tasks.spec import default_metrics



class _Problems(ValueError):
    """Raised inside validators so that each problem keeps its own key and fix."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(map(str, problems)))


def _zero_option_problems(stage: int, options: dict[str, Any], use_gpu: bool) -> list[Problem]:
    """train.zero_options against DeepSpeed's ZeRO config schema (its field names and aliases, its types), and
    against what does not train on CPU."""
    if not options:
        return []
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    names = sorted({n for name, f in DeepSpeedZeroConfig.model_fields.items() for n in (name, f.alias) if n})
    problems = []
    for key in options:
        if key in ("stage", "offload_optimizer"):
            problems.append(Problem(f"train.zero_options.{key}", "is set by the project's own keys",
                                    f"use train.{'zero_stage' if key == 'stage' else 'offload_optimizer'} instead"))
        elif key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(Problem(f"train.zero_options.{key}", "is not a key of DeepSpeed's zero_optimization",
                                    f"{hint}see DeepSpeed's ZeRO configuration reference"))
    if not problems:
        try:
            DeepSpeedZeroConfig(stage=stage, **options)
        except ValidationError as err:
            for e in err.errors():
                problems.append(Problem(f"train.zero_options.{'.'.join(map(str, e['loc']))}", e["msg"],
                                        "give a value of the type DeepSpeed documents for it"))
    leaf = ("module_granularity_threshold", DeepSpeedZeroConfig.model_fields["module_granularity_threshold"].alias)
    if not problems and stage == 3 and not use_gpu:
        problems += [Problem(f"train.zero_options.{key}",
                             "ZeRO-3 leaf modules do not train on CPU with DeepSpeed 0.19.8: it reduces a leaf's gradients "
                             "in the leaf's backward hook, which CPU autograd runs before it has accumulated them (the first "
                             "step then fails in zero_grad; with that failure bypassed, the leaves' parameters never change)",
                             "leave it unset on CPU (it is for GPU training; tests/bench/results/train_zero3_leaf has the "
                             "measurement)") for key in leaf if options.get(key)]
    return problems


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True, use_attribute_docstrings=True)


class AdapterConfig(Strict):
    kind: Literal["lora"] = "lora"
    """Adapter type (LoRA, through `peft`). The backbone's own weights are frozen and stay out of the
    optimizer; only the adapters, the task heads and any task decoders train."""
    r: int = Field(8, ge=1, le=4096)
    """LoRA rank."""
    alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter's input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Which linear layers of the backbone get an adapter: module names matched as name suffixes (e.g.
    `[q_proj, v_proj]` for Llama, `[query, value]` for BERT), or `all-linear` (every linear layer but the
    output layer). A name matching no module of the model is an error that lists the model's own."""
    per_task: bool = True
    """true: every task its own adapter (the step's task activates it) and its own head; false: one shared
    adapter plus per-task heads."""


class ModelConfig(Strict):
    name: str = "minilm-l6"
    """Model reference: a packaged model (`minilm-l6`, `smollm2-135m`), a test config (`tiny-bert`,
    `tiny-llama`), a local folder, or a hub id (needs a network)."""
    max_length: int = Field(128, ge=8, le=32768)
    """Input tokens per example; longer inputs are truncated. Batches are padded dynamically."""
    max_target_length: int = Field(64, ge=1, le=4096)
    """Summary tokens kept per summarization target (a task's own `max_target_tokens` wins if smaller)."""
    adapter: AdapterConfig | None = None
    """LoRA adapters on a frozen backbone instead of full fine-tuning (unset: the whole backbone trains)."""


class DataConfig(Strict):
    glue_dir: Path | None = None
    """A folder in the standard GLUE layout (`SST-2/train.tsv`, ...). Unset: GLUE tasks load from the hub."""
    cache_dir: Path = HOME / "data"
    """Root of the preprocessed cache; each task lands in `<cache_dir>/<task>/<key>/`, key = content hash."""
    cache_path: Path | None = None
    """Pin the cache to this folder (`<cache_path>/<task>/`) instead of keyed folders. A pinned cache
    built with another tokenizer is an error; any other change rebuilds it in place."""
    carve_seed: int = 0
    """Seed of the hash that carves train/validation/test out of sources that lack them."""
    dev_seed: int = 0
    """Seed of the order that picks the dev rows a run evaluates (`max_rows.validation`). Kept apart from
    `seed` so runs with different seeds (`jobs/compare.py --seeds`) are scored on the same rows."""
    batch_rows: int = Field(1024, ge=1)
    """Rows per Ray Data batch when normalising and tokenizing."""
    max_bad_labels: float = Field(0.25, ge=0, le=1)
    """Largest share of a split's rows whose label is unparsable or out of range. Up to it such rows are
    dropped and counted (manifest.json); above it the label mapping is taken to be wrong and preprocessing
    stops with an error naming the task, the file and example rows."""

    @field_validator("glue_dir", "cache_dir", "cache_path", mode="after")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return None if v is None else v.expanduser()

    @field_validator("glue_dir", mode="after")
    @classmethod
    def _glue_dir_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise _Problems([Problem("data.glue_dir", f"{v} is not a folder",
                                     "point it at a folder holding SST-2/, MRPC/, ... in the GLUE layout, or unset it to use the hub")])
        return v


class ColumnsConfig(Strict):
    text: str
    """Column holding the input text."""
    text_pair: str | None = None
    """Column holding the second text of a pair task."""
    label: str | None = None
    """Column holding the class (name or index) or the regression score."""
    target: str | None = None
    """Column holding the summary (summarization)."""
    id: str | None = None
    """Column holding a row id; without one, ids are content hashes."""


class TaskDefinition(Strict):
    """A user task read from local files: no code needed."""

    kind: Literal["classification", "regression", "summarization"]
    """What the task predicts: a class, a score, or a summary."""
    format: Literal["tsv", "csv", "jsonl", "parquet"]
    """File format. TSV is read without quoting (GLUE style); CSV with standard quoting."""
    encoding: str = "utf-8"
    """Text encoding of TSV/CSV/JSONL files (e.g. `latin-1`, `cp1252`); a UTF-8 byte-order mark is stripped."""
    files: dict[str, str | list[str]]
    """Split name -> file path(s) (`train`, `validation`, `test`, or any name used by `carve_from`)."""
    columns: ColumnsConfig
    column_names: list[str] | None = None
    """Column names of header-less TSV/CSV files, in order."""
    carve_from: str | None = None
    """A split in `files` to divide into the splits of `carve` by a seeded hash of each row."""
    carve: dict[Literal["train", "validation", "test"], float] | None = None
    """Fractions for `carve_from`, e.g. {train: 0.8, validation: 0.1, test: 0.1}."""
    num_labels: int | None = Field(None, ge=1)
    """Classes (classification; implied by label_names) — regression is always 1."""
    label_names: list[str] | None = None
    """Raw label strings in class-index order; without it labels must be integers 0..num_labels-1."""
    label_range: tuple[float, float] | None = None
    """Regression: inclusive bounds; rows outside are dropped and counted."""
    metrics: list[str] | None = None
    """Metrics, primary first. Default: accuracy + f1 (two classes) or accuracy + macro_f1 (more) /
    pearson + spearman / ROUGE."""
    prompt: str | None = None
    """Template for generative use, with `{text}` and `{text_pair}`."""
    max_target_tokens: int | None = Field(None, ge=1)
    """Summarization: declared summary length in tokens."""
    where: dict[str, str] = {}
    """Keep only rows whose column equals the value."""

    @field_validator("encoding", mode="after")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError("unknown text encoding — use a Python codec name such as utf-8, latin-1 or cp1252") from None
        return v

    def problems(self, name: str) -> list[Problem]:
        """What the task's own checks (TaskSpec.check) cannot see: one file given for two splits."""
        seen: dict[str, str] = {}
        problems = []
        for split, paths in self.files.items():
            for path in [paths] if isinstance(paths, str) else paths:
                same = os.path.realpath(os.path.expanduser(path))
                if same in seen:
                    problems.append(Problem(
                        f"tasks.{name}.define.files", f"{path} is given for both {seen[same]!r} and {split!r}: every row "
                        "would be trained on and evaluated on, which measures nothing",
                        f"give each split its own file, or carve one file into splits: files: {{all: {path}}}, "
                        "carve_from: all, carve: {train: 0.8, validation: 0.1, test: 0.1}"))
                seen.setdefault(same, split)
        return problems

    def to_spec(self, name: str) -> TaskSpec:
        splits = {s: SplitFiles(tuple([p] if isinstance(p, str) else p),
                                tuple(self.column_names) if self.column_names else None)
                  for s, p in self.files.items()}
        source = FilesSource(self.format, "", splits, Columns(**self.columns.model_dump()), where=dict(self.where),
                             carve_from=self.carve_from, carve=dict(self.carve or {}), encoding=self.encoding)
        num_labels = {"regression": 1, "summarization": 0}.get(self.kind) or (
            len(self.label_names) if self.label_names else (self.num_labels or 0))
        return TaskSpec(name, self.kind, f"User task from {self.format} files.", local=source, num_labels=num_labels,
                        label_names=tuple(self.label_names) if self.label_names else None,
                        label_range=self.label_range, metrics=tuple(self.metrics or default_metrics(self.kind, num_labels)),
                        prompt=self.prompt, max_target_tokens=self.max_target_tokens)


class TaskConfig(Strict):
    weight: float = Field(1.0, ge=0)
    """Loss weight; all weights are normalised to sum to the number of tasks (equal = 1.0 each)."""
    ratio: float | None = Field(None, ge=0)
    """Sampling ratio, used when `sampling.strategy` is `explicit`; normalised to sum to 1."""
    head_lr_mult: float | None = Field(None, gt=0)
    """This task's head learning-rate multiplier (default: `train.head_lr_mult`)."""
    max_rows: dict[Literal["train", "validation", "test"], int] = {}
    """Use at most this many rows of a split (the cache always holds every row)."""
    define: TaskDefinition | None = None
    """Declare a new task from local files (only for names that are not built in)."""

    @field_validator("max_rows", mode="after")
    @classmethod
    def _positive(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: n for k, n in v.items() if n < 1}
        if bad:
            raise ValueError(f"row limits must be >= 1, got {bad}")
        return v


SAMPLING_STRATEGIES = ("explicit", "proportional", "temperature", "annealed")  # pipeline/train/mixing.py


class SamplingConfig(Strict):
    strategy: Literal[SAMPLING_STRATEGIES] = "proportional"
    """Which task each step trains on: `explicit` ratios, `proportional` to train rows, `temperature`
    (p ∝ n^(1/T); T=1 is proportional, large T approaches uniform), or `annealed` (Stickland & Murray
    2019: p ∝ n^α with α falling linearly from 1 at the first step to `anneal_floor` at the last)."""
    temperature: float = Field(2.0, gt=0)
    """T of the `temperature` strategy."""
    size_cap: int | None = Field(None, ge=1)
    """T5's K: a task counts at most this many train rows (p ∝ min(n, K)^…), so one large task cannot
    crowd the others out. Applies to `proportional`, `temperature` and `annealed`."""
    anneal_floor: float = Field(0.2, ge=0, le=1)
    """α of the `annealed` strategy at the last step (0: uniform at the end)."""
    online: bool = False
    """Online mixing, an EXP3-style bandit (after Albalak et al. 2023): during training the ratios move
    toward tasks whose loss is still falling, with the strategy's ratios as the prior. The same on every
    rank (rank-averaged losses), checkpointed, logged as `ratio/<task>`."""
    online_eta: float = Field(0.1, gt=0)
    """Step size of the online bandit (larger: the ratios follow the loss progress faster)."""
    online_explore: float = Field(0.2, gt=0, le=1)
    """Share of every online draw that stays with the prior ratios (exploration; 1 turns the bandit off)."""


# Options of each loss-weighting method and their defaults (pipeline/train/weighting.py), with the
# check each value must pass.
WEIGHTING_OPTIONS: dict[str, dict[str, float]] = {
    "static": {},
    "uncertainty": {"lr": 0.02},
    "dwa": {"temperature": 2.0, "window": 10},
    "gradcos": {"beta": 0.9, "eps": 0.05},
    "famo": {"lr": 0.025, "decay": 0.001},
}
WEIGHTING_NEEDS_GRADS = {"gradcos": True}  # methods that read the shared group's gradient (the rest: losses only)
WeightingMethod = Literal[tuple(WEIGHTING_OPTIONS)]  # the one list of method names (config, Tune space, factory)
_OPTION_CHECKS = {
    "lr": (lambda v: v > 0, "use a value > 0"),
    "temperature": (lambda v: v > 0, "use a value > 0"),
    "window": (lambda v: v >= 1 and v == int(v), "use a whole number >= 1"),
    "beta": (lambda v: 0 <= v < 1, "use a value in [0, 1)"),
    "eps": (lambda v: v > 0, "use a value > 0"),
    "decay": (lambda v: v >= 0, "use a value >= 0"),
}


def _weighting_problems(method: str, options: dict[str, float]) -> list[Problem]:
    allowed = WEIGHTING_OPTIONS[method]
    problems = []
    for key, value in options.items():
        where = f"train.weighting_options.{key}"
        if key not in allowed:
            fix = (f"use one of: {', '.join(allowed)}" if allowed else
                   "remove it (static weighting takes no options), or choose another train.weighting")
            problems.append(Problem(where, f"unknown option for train.weighting={method}", fix))
        elif not _OPTION_CHECKS[key][0](value):
            problems.append(Problem(where, f"{value!r} is out of range", _OPTION_CHECKS[key][1]))
    return problems


class TrainConfig(Strict):
    num_workers: int = Field(2, ge=1)
    """Ray Train workers (one training process each; one GPU each with `use_gpu`)."""
    use_gpu: bool = False
    """Train on GPUs (NCCL). On CPU the same code runs with gloo."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs Ray reserves per worker (fractions allowed)."""
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy of the workers: PACK fills a node before the next; SPREAD puts workers
    on different nodes where it can (STRICT_SPREAD: must, one worker per node)."""
    ingest: Literal["auto", "streaming"] = "auto"
    """How the workers get their training rows. auto: a task whose cached train split is at most 64 MiB of
    Parquet goes to each worker whole, through Ray's object store (its 1/num_workers part, reshuffled every
    epoch in the worker), so no Ray Data execution and its helper actors run beside training; a larger
    split streams through Ray Data (Ray Train's dataset shards). streaming: every task through Ray Data."""
    steps: int = Field(300, ge=1)
    """Optimizer steps in total; each step trains one task's batch, drawn by the task sampler."""
    max_minutes: float | None = Field(None, gt=0)
    """Wall-clock budget of one attempt: past it, training stops at the next step and ends as at the last
    step (evaluation, checkpoint, final model). Unset: train all `steps`. A resumed run gets it anew."""
    batch_size: int = Field(16, ge=1)
    """Examples per micro-batch per worker: one optimizer step sees batch_size × num_workers × grad_accum
    examples of one task."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches (of the same task) accumulated per optimizer step."""
    lr: float = Field(5e-5, gt=0)
    """Peak learning rate of the backbone."""
    head_lr_mult: float = Field(1.0, gt=0)
    """Learning-rate multiplier of every task head (a task's own `head_lr_mult` wins)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay (not applied to biases and norms)."""
    fused_optimizer: bool = True
    """AdamW as torch's fused kernel (CPU and CUDA): one vectorised pass over the parameters, about 4.5× faster
    on CPU than the per-parameter loop torch picks there by default. false: torch's default implementation.
    (With `offload_optimizer` the optimizer is DeepSpeedCPUAdam and this does not apply.)"""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps from 0 to `lr`."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warm-up, to 0 at `steps`."""
    clip_grad: float = Field(1.0, ge=0)
    """Gradient-norm clipping of each step's task gradient, before its loss weight applies (0 turns it off)."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout before each task head."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision. fp16 needs GPUs; bf16 works on CPU and recent GPUs."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage: 0 plain data parallel, 1 optimizer states, 2 + gradients, 3 + parameters sharded."""
    sparse_embedding_grads: bool = True
    """Reduce the backbone's word-embedding gradient across workers as the rows each batch used: torch's sparse
    embedding gradient, which DeepSpeed's ZeRO-0 all-reduce gathers row by row, made dense again before the
    optimizer step (the same update). Applies at ZeRO stage 0 in fp32 with more than one worker, to an embedding
    that is trained and not tied to an LM head; elsewhere, and with false, the whole matrix is all-reduced.
    A short-row batch uses a few hundred of a vocabulary's rows: on MiniLM (half its parameters are the word
    embeddings) this cut the all-reduce time by a quarter and made 2-worker training 1.10-1.15x faster on CPU
    (docs/performance.md)."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (ZeRO >= 1); the optimizer becomes DeepSpeedCPUAdam."""
    zero_options: dict[str, Any] = {}
    """More keys of DeepSpeed's `zero_optimization` section, by DeepSpeed's names (e.g.
    `stage3_param_persistence_threshold`, `stage3_prefetch_bucket_size`, `reduce_bucket_size`,
    `overlap_comm`); checked against DeepSpeed's own schema at load time. The stage and optimizer offload
    stay `zero_stage` and `offload_optimizer`. `stage3_module_granularity_threshold` (ZeRO-3 leaf modules) is
    refused on CPU: DeepSpeed 0.19.8 loses the leaves' gradients there."""
    activation_checkpointing: bool = False
    """Recompute each backbone layer's activations in backward instead of storing them: less memory, ~30% more compute."""
    profile: bool = False
    """Per-window time in data wait, forward, backward, step and DeepSpeed collectives (time/* metrics; synchronizes GPUs)."""
    log_every: int = Field(10, ge=1)
    """Steps between loss/throughput logs (rank 0 to MLflow and stdout)."""
    eval_every: int = Field(100, ge=1)
    """Steps between dev evaluations (also at the last step)."""
    eval_batch_size: int = Field(64, ge=1)
    """Examples per evaluation batch per worker."""
    checkpoint_every: int = Field(100, ge=1)
    """Steps between checkpoints (also at the last step)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Most recent checkpoints kept; the best model is kept apart as `best_model/`."""
    weighting: WeightingMethod = "static"
    """How task loss weights evolve: `static` (the configured weights), `uncertainty` (learned
    log-variances, Kendall et al. 2018), `dwa` (Dynamic Weight Average, Liu et al. 2019), `famo` (FAMO,
    Liu et al. 2023: loss-only, balances the tasks' log-loss improvement) or `gradcos` (the paper's
    gradient-cosine adjustment). The configured weights are each method's prior; current
    weights (summing to the number of tasks) are logged as `weight/<task>`."""
    weighting_options: dict[str, float] = {}
    """Options of the weighting method; unset ones take their defaults: uncertainty `lr` (0.02);
    dwa `temperature` (2.0), `window` (10 steps of a task); gradcos `beta` (0.9), `eps` (0.05); famo `lr`
    (0.025, Adam on the logits), `decay` (0.001, pull toward the prior)."""
    shared_params: str | None = None
    """Parameter-name prefix of the shared group whose gradients `gradcos` compares, ending in a dot
    (e.g. `backbone.encoder.layer.5.`). Unset: the backbone's last transformer block."""
    max_failures: int = Field(1, ge=-1)
    """Worker-group restarts from the latest checkpoint before the run fails (-1: unlimited; 0: fail at
    once). A failed run prints its last checkpoint's step and the `--resume` command that continues it."""
    storage_path: str = str(HOME / "runs")
    """Where runs keep checkpoints and models: a local/NFS folder or an object-store URI."""

    @model_validator(mode="after")
    def _combinations(self) -> "TrainConfig":
        problems = []
        if self.precision == "fp16" and not self.use_gpu:
            problems.append(Problem("train.precision", "fp16 needs GPUs", "use bf16 or fp32 on CPU, or set train.use_gpu=true"))
        if self.offload_optimizer and self.zero_stage == 0:
            problems.append(Problem("train.offload_optimizer", "optimizer offload needs ZeRO stage 1, 2 or 3",
                                    "set train.zero_stage to 1, 2 or 3, or turn offload off"))
        if self.warmup_steps >= self.steps:
            problems.append(Problem("train.warmup_steps", f"{self.warmup_steps} warm-up steps of {self.steps} in total",
                                    "use fewer warm-up steps than train.steps"))
        problems += _weighting_problems(self.weighting, self.weighting_options)
        problems += _zero_option_problems(self.zero_stage, self.zero_options, self.use_gpu)
        if problems:
            raise _Problems(problems)
        return self


CREDENTIALS_IN_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@\s]+@")


def credentials_problem(where: str) -> Problem:
    """A tracking URI with `user:password@` in it (the config's or $MLFLOW_TRACKING_URI)."""
    return Problem(where, "holds credentials (user:password@host), which would be logged and printed",
                   "remove them from the URI and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                   "(or MLFLOW_TRACKING_TOKEN) in the environment")


class TrackingConfig(Strict):
    uri: str | None = None
    """MLflow tracking URI. Unset: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    experiment: str | None = None
    """MLflow experiment name (default: the config's `name`)."""
    required: bool = False
    """Fail before training when the tracking server cannot be reached (otherwise: warn and train on)."""

    @field_validator("uri", mode="after")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        if v is not None and CREDENTIALS_IN_URI.match(v):
            raise _Problems([credentials_problem("tracking.uri")])
        return v


class Config(Strict):
    name: str = Field("mtl", min_length=1)
    """Experiment name: the MLflow experiment and the Ray Train run name."""
    seed: int = 0
    """Seed for initialisation, task sampling and shuffling."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    tasks: dict[str, TaskConfig] = Field(min_length=1)
    """Tasks to train on, by name: built-in tasks (docs/guide.md, "Task catalogue") or user tasks with `define:`."""
    sampling: SamplingConfig = SamplingConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("tasks", mode="after")
    @classmethod
    def _known_tasks(cls, tasks: dict[str, TaskConfig]) -> dict[str, TaskConfig]:
        problems = []
        for name, task in tasks.items():
            if task.define is None and name not in BUILTIN:
                problems.append(BUILTIN.unknown(name, f"tasks.{name}"))
            elif task.define is not None and name in BUILTIN:
                problems.append(Problem(f"tasks.{name}.define", f"{name!r} is a built-in task",
                                        "give your task another name, or drop `define` to use the built-in one"))
            elif task.define is not None:
                problems.extend(task.define.problems(name))
                try:
                    TaskRegistry().register(task.define.to_spec(name))
                except PipelineError as err:
                    problems.extend(err.problems)
        if tasks and sum(t.weight for t in tasks.values()) <= 0:
            problems.append(Problem("tasks.*.weight", "all task weights are 0", "give at least one task a positive weight"))
        if problems:
            raise _Problems(problems)
        return tasks

    @model_validator(mode="after")
    def _ratios(self) -> "Config":
        problems = []
        with_ratio = [n for n, t in self.tasks.items() if t.ratio is not None]
        if self.sampling.strategy == "explicit":
            for name in self.tasks:
                if name not in with_ratio:
                    problems.append(Problem(f"tasks.{name}.ratio", "missing with sampling.strategy=explicit",
                                            "give every task a ratio, or choose proportional/temperature sampling"))
            if with_ratio and sum(self.tasks[n].ratio for n in with_ratio) <= 0:
                problems.append(Problem("tasks.*.ratio", "all sampling ratios are 0", "give at least one task a positive ratio"))
        else:
            for name in with_ratio:
                problems.append(Problem(f"tasks.{name}.ratio", f"ignored with sampling.strategy={self.sampling.strategy}",
                                        "remove it, or set sampling.strategy=explicit"))
        if self.sampling.strategy == "explicit" and self.sampling.size_cap is not None:
            problems.append(Problem("sampling.size_cap", "ignored with sampling.strategy=explicit (ratios are given)",
                                    "remove it, or choose proportional, temperature or annealed sampling"))
        if problems:
            raise _Problems(problems)
        return self

    def registry(self) -> TaskRegistry:
        """The built-in tasks plus this config's user tasks."""
        registry = BUILTIN.copy()
        for name, task in self.tasks.items():
            if task.define is not None:
                registry.register(task.define.to_spec(name))
        return registry

    def task_specs(self) -> dict[str, TaskSpec]:
        registry = self.registry()
        return {name: registry.get(name) for name in self.tasks}

    def max_new_tokens(self, spec: TaskSpec) -> int:
        """A summarization task's generation length: its declared summary length, capped by
        model.max_target_length (never a library default)."""
        return min(self.model.max_target_length, spec.max_target_tokens or self.model.max_target_length)


# ---------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply `a.b.c=value` overrides (values parsed as YAML), validate strictly."""
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    apply_overrides(raw, overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        problems = problems_from(err)
    # Unknown task names are checked by a validator that only runs once `tasks` parses; report them
    # together with any other problem, so one run shows everything.
    if isinstance(raw.get("tasks"), dict):
        problems += [BUILTIN.unknown(n, f"tasks.{n}") for n, t in raw["tasks"].items()
                     if n not in BUILTIN and not (isinstance(t, dict) and "define" in t)]
    raise PipelineError(list(dict.fromkeys(problems)))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping read with `safe_load`; a missing file or bad syntax is a PipelineError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError.one(str(path), "config file not found", "pass an existing YAML file (see jobs/configs/)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        if isinstance(err, yaml.constructor.ConstructorError):  # e.g. !!python/object: never constructed
            raise PipelineError.one(where, f"YAML tag not allowed ({getattr(err, 'problem', err)}); configs are read "
                                    "with yaml.safe_load", "write a plain YAML value (string, number, list, mapping)") from None
        raise PipelineError.one(where, f"not valid YAML ({getattr(err, 'problem', err)})",
                                "fix the YAML syntax at that line") from None
    if not isinstance(raw, dict):
        raise PipelineError.one(str(path), f"top level is a {type(raw).__name__}, not a mapping",
                                "write the config as `key: value` pairs")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a raw config dict, in place."""
    problems: list[Problem] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(Problem(f"override {item!r}", "not of the form key.sub=value",
                                    "write overrides like train.num_workers=2"))
            continue
        try:
            parsed = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            parsed = value
        _set_dotted(raw, key.split("."), parsed, problems, item)
    if problems:
        raise PipelineError(problems)
    return raw


def _set_dotted(raw: dict, keys: list[str], value: Any, problems: list[Problem], item: str) -> None:
    node = raw
    for i, k in enumerate(keys[:-1]):
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            problems.append(Problem(".".join(keys[: i + 1]), f"is a value, so override {item!r} cannot go inside it",
                                    "override the key itself"))
            return
        node = child
    node[keys[-1]] = value


_FIXES = {
    "missing": "add it",
    "greater_than_equal": "use a value >= {ge}",
    "greater_than": "use a value > {gt}",
    "less_than_equal": "use a value <= {le}",
    "too_short": "give at least {min_length}",
    "literal_error": "use one of {expected}",
    "int_parsing": "write a whole number", "int_from_float": "write a whole number", "int_type": "write a whole number",
    "float_parsing": "write a number", "float_type": "write a number", "bool_parsing": "write true or false",
    "bool_type": "write true or false", "string_type": "write a string", "dict_type": "write a mapping (key: value)",
    "model_type": "write a mapping (key: value)", "list_type": "write a list", "tuple_type": "write a list",
}


def problems_from(err: ValidationError, root: type[BaseModel] | None = None) -> list[Problem]:
    problems: list[Problem] = []
    for e in err.errors(include_url=False):
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, _Problems):
            problems.extend(cause.problems)
            continue
        loc = [str(p) for p in e["loc"] if not str(p).startswith("function-")]
        key = ".".join(loc) or "<config>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(root or Config, loc[:-1])
            close = difflib.get_close_matches(loc[-1], allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(Problem(key, "unknown key", f"{hint}remove it; allowed here: {', '.join(allowed)}"))
            continue
        ctx = {k: v for k, v in (e.get("ctx") or {}).items()}
        fix = _FIXES.get(e["type"], "see the config reference in docs/configuration.md").format(**ctx)
        msg = e["msg"].removeprefix("Value error, ")
        if " — " in msg:  # a validator's own "what — fix"
            msg, fix = msg.split(" — ", 1)
        what = msg if e["type"] == "missing" else f"{msg} (got {e.get('input')!r})"
        problems.append(Problem(key, what, fix))
    return problems


def _allowed_keys(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names valid at `loc` (a path of keys below `model`), for 'unknown key' messages."""
    node: Any = model
    for part in loc:
        node = _model_in(node)
        if node is None:
            return []
        field = node.model_fields.get(part)
        if field is None:  # a dict key (task name)
            continue
        node = field.annotation
        origin = typing.get_origin(node)
        if origin is dict:
            node = typing.get_args(node)[1]
    node = _model_in(node)
    return sorted(node.model_fields) if node is not None else []


def _model_in(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    if typing.get_origin(tp) is dict:
        return _model_in(typing.get_args(tp)[1])
    return None


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain, YAML-ready dict (paths as strings)."""
    return cfg.model_dump(mode="json")


def reference_markdown() -> str:
    """The config reference table in docs/configuration.md, generated from the field docstrings."""
    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            sub = _model_in(field.annotation)
            if sub is not None and typing.get_origin(field.annotation) is not dict:
                walk(sub, f"{key}.")
                continue
            default = "required" if field.is_required() else f"`{field.get_default(call_default_factory=True)}`"
            default = default.replace(str(HOME), "$MTL_HOME")
            doc = " ".join((field.description or "").split()).replace("|", "\\|")
            lines.append(f"| `{key}` | {default} | {doc} |")
            if sub is not None:  # tasks.<name>.*
                walk(sub, f"{key}.<name>.")

    walk(Config, "")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys as _sys
    if _sys.argv[1:] == ["--reference"]:
        print(reference_markdown())
