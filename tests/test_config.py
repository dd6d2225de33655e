"""Config loading: every shipped YAML validates; every kind of bad input names the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, load_config
from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (ROOT / "jobs" / "configs").rglob("*.yaml") if not p.name.startswith("tune_"))  # tune specs: test_tune


def problems(path=None, overrides=()) -> list[str]:
    with pytest.raises(PipelineError) as info:
        load_config(path, list(overrides))
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.tasks, "a shipped config must name tasks"
    cfg.registry()  # user tasks register without clashes
    assert set(cfg.task_specs()) == set(cfg.tasks)


def test_every_config_the_project_names_exists_and_is_validated_above():
    """The configs the README, the docs, the Makefile and the jobs' docstrings name are real files, and the training
    configs among them are the ones test_every_shipped_config_validates loads."""
    import re
    texts = [(ROOT / f).read_text() for f in ("README.md", "Makefile")] + \
            [p.read_text() for p in [*(ROOT / "jobs").glob("*.py"), *(ROOT / "docs").glob("*.md")]]
    named = {m for t in texts for m in re.findall(r"jobs/configs/[\w./-]+\.yaml", t)}
    assert "jobs/configs/default.yaml" in named and len(named) >= 4, named
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, missing
    training = {ROOT / n for n in named if not Path(n).name.startswith("tune_")}
    assert training <= set(SHIPPED), training - set(SHIPPED)


def test_overrides_are_typed_and_nested():
    cfg = load_config(ROOT / "jobs/configs/default.yaml",
                      ["model.max_length=64", "tasks.rotten_tomatoes.weight=2", "tasks.sst2={}", "seed=7",
                       "tasks.bbc_news.max_rows={train: 100}"])
    assert cfg.model.max_length == 64 and cfg.seed == 7
    assert cfg.tasks["rotten_tomatoes"].weight == 2.0
    assert "sst2" in cfg.tasks and cfg.tasks["bbc_news"].max_rows == {"train": 100}


def test_every_problem_is_reported_at_once_with_key_and_fix():
    lines = problems(overrides=["tasks.sst3={}", "tasks.sst2.wieght=2", "train.num_workers=0",
                                "tasks.mrpc.weight=-1", "model.max_length=abc"])
    joined = "\n".join(lines)
    assert "tasks.sst3: unknown task 'sst3' — did you mean 'sst2'?" in joined
    assert "tasks.sst2.wieght: unknown key — did you mean 'weight'?" in joined
    assert any(l.startswith("train.num_workers:") and "use a value >= 1" in l for l in lines)
    assert any(l.startswith("tasks.mrpc.weight:") and "use a value >= 0" in l for l in lines)
    assert any(l.startswith("model.max_length:") and "write a whole number" in l for l in lines)
    assert len(lines) == 5
    assert all(" — " in l for l in lines)


@pytest.mark.parametrize("overrides, expected", [
    (["tasks.sst2.weight=0", "tasks.mrpc.weight=0"], "tasks.*.weight: all task weights are 0"),
    (["tasks.sst2.ratio=0.5"], "tasks.sst2.ratio: ignored with sampling.strategy=proportional"),
    (["sampling.strategy=explicit", "tasks.sst2.ratio=1"], "tasks.mrpc.ratio: missing with sampling.strategy=explicit"),
    (["sampling.strategy=explicit", "tasks.sst2.ratio=0", "tasks.mrpc.ratio=0"], "tasks.*.ratio: all sampling ratios are 0"),
    (["sampling.strategy=uniformly"], "sampling.strategy: Input should be 'explicit', 'proportional', 'temperature' or 'annealed'"),
        (["sampling.size_cap=100", "sampling.strategy=explicit", "tasks.sst2.ratio=1", "tasks.mrpc.ratio=1"],
         "sampling.size_cap: ignored with sampling.strategy=explicit"),
    (["sampling.temperature=0"], "sampling.temperature: Input should be greater than 0"),
    (["tasks.sst2.max_rows={train: 0}"], "tasks.sst2.max_rows: row limits must be >= 1"),
    (["data.glue_dir=/no/such/folder"], "data.glue_dir: /no/such/folder is not a folder"),
    (["tasks.sst2.define={kind: classification, format: tsv, files: {train: a.tsv}, columns: {text: s, label: l}}"],
     "tasks.sst2.define: 'sst2' is a built-in task"),
    (["tasks.mine.define={kind: regression, format: csv, files: {train: a.csv}, columns: {text: s}}"],
     "tasks.mine.define.columns.label: regression needs a label column"),
    (["tasks.mine.define={kind: classification, format: csv, files: {train: a.csv}, columns: {text: s, label: y}, "
      "num_labels: 3, metrics: [rouge1]}"], "tasks.mine.define.metrics: 'rouge1' does not apply to classification"),
    (["tasks.mine.define={kind: summarization, format: xml, files: {train: a}, columns: {text: s, target: t}}"],
     "tasks.mine.define.format: Input should be"),
    (["train.zero_options={stage3_param_persistance_threshold: 5}"],
     "train.zero_options.stage3_param_persistance_threshold: is not a key of DeepSpeed's zero_optimization — did you "
     "mean 'stage3_param_persistence_threshold'?"),
    (["train.zero_options={stage: 2}"], "train.zero_options.stage: is set by the project's own keys — use train.zero_stage"),
    (["train.zero_options={reduce_bucket_size: lots}"], "train.zero_options.reduce_bucket_size: Input should be a valid integer"),
    (["train.zero_stage=3", "train.zero_options={stage3_module_granularity_threshold: 130000}"],
     "train.zero_options.stage3_module_granularity_threshold: ZeRO-3 leaf modules do not train on CPU"),
    (["train.zero_stage=3", "train.zero_options={module_granularity_threshold: 5}"],
     "train.zero_options.module_granularity_threshold: ZeRO-3 leaf modules do not train on CPU"),
])
def test_impossible_values_fail_at_load(overrides, expected):
    lines = problems(overrides=["tasks={sst2: {}, mrpc: {}}", *overrides])
    assert any(l.startswith(expected) for l in lines), lines


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntasks:\n  sst2: {weight: 1\n  mrpc: {}\n")
    (line,) = problems(bad)
    assert line.startswith(f"{bad}:") and "not valid YAML" in line and "fix the YAML syntax" in line


def test_missing_config_file_and_bad_override_form(tmp_path):
    assert "config file not found" in problems(tmp_path / "nope.yaml")[0]
    assert problems(overrides=["tasks.sst2"])[0].startswith("override 'tasks.sst2': not of the form key.sub=value")


def test_a_config_without_tasks_is_refused():
    assert problems(overrides=["seed=1"]) == ["tasks: Field required — add it"]


def test_user_task_definition_becomes_a_registered_spec():
    cfg = load_config(ROOT / "jobs/configs/user_task.yaml")
    spec = cfg.task_specs()["support_tickets"]
    assert spec.kind == "classification" and spec.num_labels == 3
    assert spec.metrics == ("macro_f1", "accuracy") and spec.local.columns.text_pair == "subject"


def test_config_round_trips_through_yaml():
    cfg = load_config(ROOT / "jobs/configs/glue.yaml")
    again = Config.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))
    assert again == cfg


def test_zero3_leaf_modules_are_refused_on_cpu_only():
    """The refusal is CPU's: the same option loads at ZeRO-3 on GPUs, and the threshold's 0 (DeepSpeed's off) loads anywhere."""
    base = ["name=x", "tasks={sst2: {}}", "train.zero_stage=3"]
    assert load_config(None, [*base, "train.use_gpu=true", "train.zero_options={stage3_module_granularity_threshold: 130000}"])
    assert load_config(None, [*base, "train.zero_options={stage3_module_granularity_threshold: 0}"])


def test_zero_options_reach_deepspeeds_zero_section():
    from pipeline.train.loop import deepspeed_config
    cfg = load_config(None, ["name=x", "tasks={sst2: {}}", "train.zero_stage=3",
                             "train.zero_options={stage3_param_persistence_threshold: 1000000, overlap_comm: false}"])
    zero = deepspeed_config(cfg.train, 2)["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 1000000 and zero["overlap_comm"] is False
