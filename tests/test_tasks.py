"""Task registry and catalogue."""

from __future__ import annotations

import collections

import pytest

from pipeline.data.normalise import carve_split
from pipeline.errors import PipelineError
from pipeline.tasks import BUILTIN, METRICS_BY_KIND, Columns, FilesSource, SplitFiles, TaskRegistry, TaskSpec

GLUE = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]


def _spec(name="t", **kw) -> TaskSpec:
    source = FilesSource("csv", "", {"train": SplitFiles(("a.csv",))}, Columns("x", label="y"))
    return TaskSpec(name, kw.pop("kind", "classification"), "test", local=source,
                    num_labels=kw.pop("num_labels", 2), metrics=kw.pop("metrics", ("accuracy",)), **kw)


def test_catalogue_has_the_issue_tasks():
    expected = set(GLUE) | {"rotten_tomatoes", "imdb", "bbc_news", "xsum", "cnn_dailymail", "samsum"}
    assert expected == set(BUILTIN.names())


@pytest.mark.parametrize("spec", list(BUILTIN), ids=lambda s: s.name)
def test_builtin_specs_are_consistent(spec):
    assert spec.check() == []
    assert spec.metrics and all(m in METRICS_BY_KIND[spec.kind] for m in spec.metrics)
    if spec.kind == "classification":
        assert spec.num_labels >= 2
    if spec.kind == "summarization":
        assert spec.prompt and "{text}" in spec.prompt and spec.max_target_tokens


@pytest.mark.parametrize("name", GLUE)
def test_glue_tasks_load_locally_or_from_the_hub(name):
    spec = BUILTIN.get(name)
    assert spec.local.root == "glue_dir:" and spec.local.format == "tsv"
    assert spec.hub.dataset == "nyu-mll/glue" and spec.hub.config == name


def test_qnli_carves_train_from_dev():
    local = BUILTIN.get("qnli").local
    assert local.carve_from == "dev" and set(local.carve) == {"train", "validation"}
    assert not local.splits["test"].labelled


def test_registry_refuses_duplicates_and_unknown_names():
    registry = TaskRegistry([_spec("a")])
    with pytest.raises(PipelineError, match="already registered"):
        registry.register(_spec("a"))
    with pytest.raises(PipelineError) as info:
        registry.get("b")
    assert "unknown task 'b'" in str(info.value)
    with pytest.raises(PipelineError, match="did you mean 'sst2'"):
        BUILTIN.get("sst")


def test_registry_refuses_inconsistent_specs():
    with pytest.raises(PipelineError, match="classification needs >= 2 labels"):
        TaskRegistry([_spec(num_labels=1)])
    with pytest.raises(PipelineError, match="does not apply to classification"):
        TaskRegistry([_spec(metrics=("pearson",))])


def test_carving_is_seeded_order_free_and_proportional():
    fractions = {"train": 0.8, "validation": 0.1, "test": 0.1}
    keys = [f"row-{i}" for i in range(20000)]
    first = [carve_split(k, 0, fractions) for k in keys]
    assert first == [carve_split(k, 0, fractions) for k in reversed(keys)][::-1]
    counts = collections.Counter(first)
    for split, frac in fractions.items():
        assert abs(counts[split] / len(keys) - frac) < 0.01
    assert first != [carve_split(k, 1, fractions) for k in keys]  # another seed, another split
