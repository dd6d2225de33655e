"""What a task is: where its rows come from, which fields are text and label, how it is scored.

Modelled on seqio: a `TaskSpec` is plain, frozen data; a `TaskRegistry` refuses duplicate and unknown
names. Built-in tasks live in `catalogue.py`; user tasks are declared in YAML (`tasks.<name>.define`)
and become `TaskSpec`s through `pipeline.config`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterator, Literal, Mapping

from pipeline.errors import PipelineError, Problem

Kind = Literal["classification", "regression", "summarization"]
Format = Literal["tsv", "csv", "jsonl", "parquet", "text_folders"]
SPLITS = ("train", "validation", "test")

# Metric names a task may declare; implementations live in pipeline.eval. The first declared is primary.
METRICS_BY_KIND: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "f1", "macro_f1", "matthews"),
    "regression": ("pearson", "spearman"),
    "summarization": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
}


def default_metrics(kind: str, num_labels: int = 0) -> tuple[str, ...]:
    """Metrics of a task that declares none: accuracy + F1 (binary F1 for two classes, macro F1 for
    more), Pearson + Spearman, or ROUGE."""
    if kind == "classification":
        return ("accuracy", "f1") if num_labels <= 2 else ("accuracy", "macro_f1")
    return ("pearson", "spearman") if kind == "regression" else METRICS_BY_KIND["summarization"]


@dataclass(frozen=True)
class Columns:
    """Which source columns hold what. Names refer to the header (or declared column names)."""

    text: str
    text_pair: str | None = None
    label: str | None = None  # classification / regression
    target: str | None = None  # summarization
    id: str | None = None  # when absent, the id is a content hash of the row


@dataclass(frozen=True)
class SplitFiles:
    """The files of one split. `column_names` is for header-less files (CoLA): names in order."""

    paths: tuple[str, ...]
    column_names: tuple[str, ...] | None = None
    labelled: bool = True  # GLUE test files carry no labels


@dataclass(frozen=True)
class FilesSource:
    """Files on disk (or any pyarrow filesystem URI), one entry per split.

    `root` is prefixed to every path: `glue_dir:SST-2` (the configured GLUE folder), `package:NAME/sub`
    (a folder inside an installed package), or a plain folder ('' for paths as given).
    `carve_from` names an entry of `splits` whose rows are divided into `carve` (split -> fraction)
    by a seeded hash of each row's id, so membership never depends on file order or block layout.
    """

    format: Format
    root: str
    splits: Mapping[str, SplitFiles]
    columns: Columns
    where: Mapping[str, str] = field(default_factory=dict)  # keep rows whose column equals value
    carve_from: str | None = None
    carve: Mapping[str, float] = field(default_factory=dict)
    encoding: str = "utf-8"  # of text files (TSV, CSV, JSONL); a UTF-8 byte-order mark is stripped


@dataclass(frozen=True)
class HubSource:
    """A Hugging Face hub dataset: `datasets.load_dataset(dataset, config)`, splits mapped by name."""

    dataset: str
    config: str | None
    splits: Mapping[str, str]  # our split -> hub split
    columns: Columns
    unlabelled: tuple[str, ...] = ()  # our splits whose labels are placeholders (GLUE test: -1)
    carve_from: str | None = None
    carve: Mapping[str, float] = field(default_factory=dict)


Source = FilesSource | HubSource


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: Kind
    description: str
    local: FilesSource | None = None  # preferred when available (GLUE folder set, package installed)
    hub: HubSource | None = None
    num_labels: int = 0  # classification: classes; regression: 1; summarization: 0
    label_names: tuple[str, ...] | None = None  # raw string labels, in class-index order
    label_range: tuple[float, float] | None = None  # regression: inclusive bounds
    metrics: tuple[str, ...] = ()
    prompt: str | None = None  # for generative use; `{text}` (and `{text_pair}`) are filled in
    max_target_tokens: int | None = None  # summarization: declared summary length

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    def check(self) -> list[Problem]:
        """Internal consistency; user tasks are reported under `tasks.<name>.define`."""
        where = f"tasks.{self.name}.define"
        problems: list[Problem] = []
        if self.local is None and self.hub is None:
            problems.append(Problem(where, "no source", "declare `format` and `files`"))
        if self.kind == "classification":
            if self.label_names and self.num_labels not in (0, len(self.label_names)):
                problems.append(Problem(f"{where}.num_labels", f"{self.num_labels} but {len(self.label_names)} label_names",
                                        "drop num_labels or make it match label_names"))
            if self.num_labels < 2:
                problems.append(Problem(f"{where}.num_labels", f"classification needs >= 2 labels, got {self.num_labels}",
                                        "set num_labels or label_names"))
        allowed = METRICS_BY_KIND[self.kind]
        if not self.metrics:
            problems.append(Problem(f"{where}.metrics", "no metrics", f"declare at least one of {list(allowed)}"))
        for m in self.metrics:
            if m not in allowed:
                problems.append(Problem(f"{where}.metrics", f"{m!r} does not apply to {self.kind}", f"use one of {list(allowed)}"))
            elif m == "f1" and self.num_labels > 2:  # scikit-learn's binary F1 refuses more than two classes
                problems.append(Problem(f"{where}.metrics", f"'f1' is binary F1, but the task has {self.num_labels} classes",
                                        "use 'macro_f1' (F1 averaged over classes) instead"))
        for src in (self.local, self.hub):
            if src is None:
                continue
            cols = src.columns
            if self.kind == "summarization" and not cols.target:
                problems.append(Problem(f"{where}.columns.target", "summarization needs a target column", "set columns.target"))
            if self.kind != "summarization" and not cols.label:
                problems.append(Problem(f"{where}.columns.label", f"{self.kind} needs a label column", "set columns.label"))
            if src.carve:
                if src.carve_from not in src.splits:
                    problems.append(Problem(f"{where}.carve", f"carve_from {src.carve_from!r} is not a declared split", "name one of the files' splits"))
                if abs(sum(src.carve.values()) - 1.0) > 1e-6 or any(v < 0 for v in src.carve.values()):
                    problems.append(Problem(f"{where}.carve", f"fractions {dict(src.carve)} are not a distribution",
                                            "use non-negative fractions that sum to 1"))
        return problems


class TaskRegistry:
    """Named tasks. Registering a name twice, or asking for one never registered, is an error."""

    def __init__(self, specs: Iterator[TaskSpec] | tuple[TaskSpec, ...] = ()):
        self._specs: dict[str, TaskSpec] = {}
        for spec in specs:
            self.register(spec)

    def register(self, spec: TaskSpec) -> TaskSpec:
        if spec.name in self._specs:
            raise PipelineError.one(f"tasks.{spec.name}", "a task with this name is already registered",
                                    "give the task another name")
        problems = spec.check()
        if problems:
            raise PipelineError(problems)
        self._specs[spec.name] = spec
        return spec

    def get(self, name: str) -> TaskSpec:
        if name not in self._specs:
            raise PipelineError(self.unknown(name, f"tasks.{name}"))
        return self._specs[name]

    def unknown(self, name: str, where: str) -> Problem:
        close = difflib.get_close_matches(name, self._specs, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return Problem(where, f"unknown task {name!r}",
                       f"{hint}use a built-in task ({', '.join(sorted(self._specs))}) or declare it with `define:`")

    def copy(self) -> "TaskRegistry":
        return TaskRegistry(tuple(self._specs.values()))

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[TaskSpec]:
        return iter(self._specs.values())

    def names(self) -> list[str]:
        return list(self._specs)
