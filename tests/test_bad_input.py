"""Bad input, one case per test: the job exits with status 2 and prints one line per problem in the
format of README "Errors" (`<where>: <what is wrong> — <how to fix>`), naming the config key, file or
row and the fix — and everything written before (preprocessed caches, a pinned cache, checkpoints, the
MLflow runs and the registry) is untouched: every file byte for byte, every run, version and alias."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import mlflow_uri

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))
pytestmark = pytest.mark.usefixtures("ray_session")
PROBLEM = re.compile(r"^(?P<where>\S.*?): (?P<what>.+) — (?P<fix>.+)$")
TASKS = "{rotten_tomatoes: {max_rows: {train: 64, validation: 32}}, bbc_news: {max_rows: {train: 64, validation: 32}}}"
MODEL = "bad-input-tiny"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Work a user would not want to lose: a finished run (checkpoint, models, MLflow run), its keyed
    cache, a pinned cache, and a registered model version with the alias `champion`."""
    import preprocess
    import train

    ws = tmp_path_factory.mktemp("workspace")
    base = [f"tasks={TASKS}", "name=ws", "model.name=tiny-bert", "train.num_workers=1", "train.cpus_per_worker=1",
            "train.steps=4", "train.eval_every=4", "train.checkpoint_every=4", "train.batch_size=8",
            f"train.storage_path={ws / 'runs'}", f"tracking.uri={mlflow_uri(ws)}",
            f"data.cache_dir={ws / 'cache'}"]
    (ws / "base.yaml").write_text("name: ws\n")
    assert train.main(["--config", str(ws / "base.yaml"), *base]) == 0
    assert preprocess.main(["--config", str(ws / "base.yaml"), *base, f"data.cache_path={ws / 'pinned'}"]) == 0
    run = next((ws / "runs").glob("ws-*/run.json")).parent
    # A registry entry for the run's logged model (what jobs/register.py makes; its pyfunc logging is tested in
    # tests/test_registry.py), with the alias a bad --promote must leave alone.
    from mlflow.tracking import MlflowClient
    client = MlflowClient(mlflow_uri(ws))
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, f"{client.get_run(run_id).info.artifact_uri}/model", run_id=run_id)
    client.set_registered_model_alias(MODEL, "champion", version.version)
    return {"dir": ws, "base": base, "run": run}


def _state(ws: Path) -> dict:
    """Every file's hash (caches, runs, checkpoints; the MLflow database is compared through MLflow) and
    MLflow's view: runs with status and metric histories, registered versions and aliases."""
    from mlflow.tracking import MlflowClient
    files = {str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(ws.rglob("*"))
             if p.is_file() and not p.name.startswith("mlflow.db")}
    client = MlflowClient(f"{mlflow_uri(ws)}")
    runs = {}
    for exp in client.search_experiments():
        for r in client.search_runs([exp.experiment_id]):
            runs[r.info.run_id] = (r.info.status, {k: len(client.get_metric_history(r.info.run_id, k)) for k in r.data.metrics})
    model = client.get_registered_model(MODEL)
    versions = sorted((v.version, v.run_id) for v in client.search_model_versions(f"name='{MODEL}'"))
    return {"files": files, "runs": runs, "aliases": dict(model.aliases), "versions": versions}


def _user_task(tmp: Path, rows: str, columns: str = "{text: text, label: label}") -> str:
    (tmp / "mine.tsv").write_text(rows)
    return (f"tasks={{mine: {{define: {{kind: classification, format: tsv, files: {{train: {tmp / 'mine.tsv'}}}, "
            f"columns: {columns}, label_names: [neg, pos]}}}}}}")


def _other_tokenizer(tmp: Path) -> Path:
    """MiniLM's tokenizer files with another max length: a different tokenizer fingerprint (tiny-bert's is MiniLM's)."""
    import shutil

    from pipeline.model.refs import resolve_model
    src, other = resolve_model("minilm-l6").path, tmp / "other-tokenizer"
    other.mkdir()
    for name in ("config.json", "tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, other / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 64}))
    return other


def _define(tmp: Path, name: str, content: str | bytes, fmt: str = "tsv", *, files: str | None = None,
            extra: str = "label_names: [neg, pos]", columns: str = "{text: text, label: label}") -> str:
    """`tasks={mine: {define: ...}}` over one file written into tmp (bytes are written as they are)."""
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    files = files or f"{{train: {path}}}"
    return (f"tasks={{mine: {{define: {{kind: classification, format: {fmt}, files: {files}, columns: {columns}, "
            f"{extra}}}}}}}")


def _four_classes(tmp: Path, metrics: str = "") -> str:
    rows = "".join(f"row {i} about {t}\t{t}\n" for i in range(40) for t in ("a", "b", "c", "d"))
    (tmp / "dev.tsv").write_text("text\tlabel\n" + rows[: len(rows) // 4])
    return _define(tmp, "four.tsv", "text\tlabel\n" + rows, files=f"{{train: {tmp / 'four.tsv'}, validation: {tmp / 'dev.tsv'}}}",
                   extra=f"label_names: [a, b, c, d]{metrics}")


# (case id, job, argv builder (workspace, tmp) -> (argv, files to create), where the first line points, fix words)
CASES = {
    "malformed_yaml": ("train", lambda w, t: (["--config", str(t / "c.yaml")], {"c.yaml": "train:\n  steps: [1, 2\n"}),
                       "c.yaml:", "YAML"),
    "unknown_key": ("train", lambda w, t: (["train.stepz=5"], {}), "train.stepz", "steps"),
    "wrong_type": ("train", lambda w, t: (["train.steps=many"], {}), "train.steps", "whole number"),
    "negative_weight": ("train", lambda w, t: (["tasks.rotten_tomatoes.weight=-1"], {}),
                        "tasks.rotten_tomatoes.weight", "0"),
    "all_zero_weights": ("train", lambda w, t: (["tasks.rotten_tomatoes.weight=0", "tasks.bbc_news.weight=0"], {}),
                         "tasks", "weight"),
    "ratios_do_not_normalise": ("train", lambda w, t: (["sampling.strategy=explicit", "tasks.rotten_tomatoes.ratio=0",
                                                        "tasks.bbc_news.ratio=0"], {}), "tasks", "ratio"),
    "unknown_task": ("train", lambda w, t: (["tasks={rotten_tomatos: {}}"], {}), "tasks.rotten_tomatos", "rotten_tomatoes"),
    "missing_data_file": ("preprocess", lambda w, t: ([_user_task(t, "").replace("mine.tsv", "gone.tsv")], {}),
                          "gone.tsv", "file"),
    "wrong_columns": ("preprocess", lambda w, t: ([_user_task(t, "sentence\tlabel\ngood\tpos\n")], {}),
                      "mine.tsv:1", "columns.text"),
    "labels_out_of_range": ("preprocess", lambda w, t: ([_user_task(t, "text\tlabel\na\tpos\nb\tneutral\nc\tneutral\n"
                                                                       "d\tneg\n")], {}), "mine.tsv", "label_names"),
    "empty_after_filtering": ("preprocess", lambda w, t: ([_user_task(t, "text\tlabel\n\tpos\n \tneg\n")], {}),
                              "tasks.mine", "column mapping"),
    "model_offline": ("train", lambda w, t: (["model.name=some-org/not-on-this-machine"], {}), "model.name", ""),
    "pinned_cache_other_tokenizer": ("preprocess", lambda w, t: ([f"data.cache_path={w / 'pinned'}",
                                                                  f"model.name={_other_tokenizer(t)}"], {}),
                                     "data.cache_path", "unset data.cache_path"),
    "zero_stage_invalid": ("train", lambda w, t: (["train.zero_stage=4"], {}), "train.zero_stage", "0"),
    "offload_without_zero": ("train", lambda w, t: (["train.zero_stage=0", "train.offload_optimizer=true"], {}),
                             "train.offload_optimizer", "train.zero_stage"),
    "tracking_required_unreachable": ("train", lambda w, t: (["tracking.uri=http://127.0.0.1:9", "tracking.required=true"], {}),
                                      "tracking.uri", "tracking.required=false"),
    "registry_alias_missing_version": ("register", lambda w, t: (["--name", MODEL, "--promote", "9", "--tracking-uri",
                                                                  f"{mlflow_uri(w)}"], {}), "--promote", ""),
    "unsafe_yaml_tag": ("train", lambda w, t: (["--config", str(t / "c.yaml")],
                                               {"c.yaml": f"name: !!python/object/apply:os.system ['touch {t / 'pwned'}']\n"}),
                        "c.yaml:", "plain YAML value"),
    "resources_never_available": ("train", lambda w, t: (["train.num_workers=8"], {}), "train.num_workers", "fewer workers"),
    "resume_unknown_run": ("train", lambda w, t: (["--resume", "ws-00000000"], {}), "--resume", "ws-"),
    # Added with the fresh-clone review (issue 17).
    "non_utf8_file": ("preprocess", lambda w, t: ([_define(t, "mine.tsv", b"text\tlabel\ngood\tpos\nbad \xff byte\tneg\n")],
                                                  {}), "mine.tsv:3", "encoding"),
    "same_file_two_splits": ("train", lambda w, t: ([_define(t, "mine.tsv", "text\tlabel\na\tpos\n",
                                                             files=f"{{train: {t / 'mine.tsv'}, validation: {t / 'mine.tsv'}}}")],
                                                    {}), "tasks.mine.define.files", "carve_from"),
    "metric_does_not_fit_kind": ("train", lambda w, t: ([_define(t, "mine.tsv", "text\tlabel\na\tpos\n",
                                                                 extra="label_names: [neg, pos], metrics: [rouge1, pearson]")], {}),
                                 "tasks.mine.define.metrics", "use one of"),
    "binary_f1_on_four_classes": ("train", lambda w, t: ([_four_classes(t, ", metrics: [accuracy, f1]")], {}),
                                  "tasks.mine.define.metrics", "macro_f1"),
    "unknown_encoding": ("train", lambda w, t: ([_define(t, "mine.tsv", "text\tlabel\na\tpos\n",
                                                         extra="label_names: [neg, pos], encoding: latin-9000")], {}),
                         "tasks.mine.define.encoding", "latin-1"),
    "empty_file": ("preprocess", lambda w, t: ([_define(t, "mine.tsv", "")], {}), "mine.tsv", "put rows in it"),
    "header_only_file": ("preprocess", lambda w, t: ([_define(t, "mine.tsv", "text\tlabel\n")], {}), "mine.tsv:1",
                         "put rows in it"),
    "jsonl_line_is_an_array": ("preprocess", lambda w, t: ([_define(t, "mine.jsonl", '\n[1, 2]\n{"text": "a", "label": "pos"}\n',
                                                                    fmt="jsonl")], {}), "mine.jsonl:2", "one object per line"),
    "jsonl_line_is_a_number": ("preprocess", lambda w, t: ([_define(t, "mine.jsonl", '3\n', fmt="jsonl")], {}),
                               "mine.jsonl:1", "one object per line"),
    "numeric_labels_with_label_names": ("preprocess", lambda w, t: ([_define(t, "mine.tsv", "text\tlabel\ngood\t1\nbad\t0\n"
                                                                              "fine\t1\n")], {}), "mine.tsv", "drop label_names"),
    "summaries_all_empty_in_validation": ("preprocess", lambda w, t: ([
        f"tasks={{mine: {{define: {{kind: summarization, format: tsv, files: {{train: {t / 's.tsv'}, validation: "
        f"{t / 'd.tsv'}}}, columns: {{text: doc, target: summary}}}}}}}}"],
        {"s.tsv": "doc\tsummary\na long story\tshort\nanother one\tbrief\n", "d.tsv": "doc\tsummary\na text\t \nmore\t\n"}),
        "tasks.mine", "column mapping"),
    "resume_run_of_another_config": ("train", lambda w, t: (["name=other", "--resume", next((w / "runs").glob("ws-*")).name], {}), "--resume",
                                     "config it was made from"),
    "ratios_with_non_explicit_strategy": ("train", lambda w, t: (["sampling.strategy=temperature",
                                                                  "tasks.rotten_tomatoes.ratio=0.7"], {}),
                                          "tasks.rotten_tomatoes.ratio", "sampling.strategy=explicit"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_per_problem_and_loses_nothing(case, workspace, tmp_path, capsys):
    job_name, build, where, fix = CASES[case]
    ws = workspace["dir"]
    job = __import__(job_name)
    argv, files = build(ws, tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    if job_name in ("train", "preprocess"):
        config = [] if "--config" in argv else ["--config", str(ws / "base.yaml")]
        argv = config + workspace["base"] + argv
    before = _state(ws)
    capsys.readouterr()

    assert job.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("ray: connected")]
    assert lines, f"no problem printed for {case}"
    for line in lines:
        assert PROBLEM.match(line), f"not `<where>: <what> — <fix>`: {line!r}"
    assert any(PROBLEM.match(line)["where"].startswith(where) or where in PROBLEM.match(line)["where"] for line in lines), lines
    assert any(fix.lower() in PROBLEM.match(line)["fix"].lower() for line in lines), lines
    assert _state(ws) == before  # nothing written before was changed, and no run, version or alias appeared
    assert not (tmp_path / "pwned").exists()
    print(f"\n{case}: " + " | ".join(lines))


def _rows(n: int, text=lambda i: f"review number {i} was {'good' if i % 2 else 'bad'}", label=lambda i: "pos" if i % 2 else "neg"):
    return [(text(i), label(i)) for i in range(n)]


def _tsv(rows, bom: bool = False) -> bytes:
    return ("\ufeff" * bom + "text\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in rows)).encode()


def _csv(rows, encoding: str = "utf-8", bom: bool = False) -> bytes:
    import csv
    import io
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    return ("\ufeff" * bom + out.getvalue()).encode(encoding)


# (case id, format, train file bytes, validation file bytes, define extras, kept rows (train, validation), a text that
# must be in the cache exactly as written, the dev metrics the task reports)
WORKING = {
    "utf8_bom_tsv": ("tsv", _tsv(_rows(40), bom=True), _tsv(_rows(10), bom=True), "", (40, 10), "review number 0 was bad",
                     {"accuracy", "f1"}),
    "utf8_bom_csv": ("csv", _csv(_rows(40), bom=True), _csv(_rows(10), bom=True), "", (40, 10), "review number 1 was good",
                     {"accuracy", "f1"}),
    "csv_quoted_newlines": ("csv", _csv(_rows(40, text=lambda i: f"line one of {i}\nline two, \"quoted\"")),
                            _csv(_rows(10)), "", (40, 10), 'line one of 3\nline two, "quoted"', {"accuracy", "f1"}),
    "latin1_with_encoding": ("csv", _csv(_rows(40, text=lambda i: f"café crème n°{i}"), "latin-1"),
                             _csv(_rows(10), "latin-1"), ", encoding: latin-1", (40, 10), "café crème n°7",
                             {"accuracy", "f1"}),
    "multiclass_default_metrics": ("tsv", _tsv(_rows(40, label=lambda i: "abcd"[i % 4])), _tsv(_rows(12, label=lambda i: "abcd"[i % 4])),
                                   "", (40, 12), "review number 5 was good", {"accuracy", "macro_f1"}),
}


def test_inputs_that_must_work_preprocess_as_written_and_train(tmp_path):
    """Inputs a user has every right to give, each declared as its own task of one run: every file is cached
    as written (BOM stripped, quoted newlines kept, latin-1 decoded), the run trains and evaluates every task
    (the multi-class one with its default metrics, accuracy + macro F1)."""
    import pyarrow.dataset as pads

    import train

    tasks = {}
    for case, (fmt, train_bytes, dev_bytes, extra, _, _, _) in WORKING.items():
        (tmp_path / f"{case}.train.{fmt}").write_bytes(train_bytes)
        (tmp_path / f"{case}.dev.{fmt}").write_bytes(dev_bytes)
        names = "[a, b, c, d]" if case == "multiclass_default_metrics" else "[neg, pos]"
        tasks[case] = (f"{case}: {{define: {{kind: classification, format: {fmt}, files: {{train: "
                       f"{tmp_path / f'{case}.train.{fmt}'}, validation: {tmp_path / f'{case}.dev.{fmt}'}}}, "
                       f"columns: {{text: text, label: label}}, label_names: {names}{extra}}}}}")
    steps = len(WORKING)
    argv = ["tasks={" + ", ".join(tasks.values()) + "}", "name=works", "model.name=tiny-bert", "train.num_workers=1",
            "train.cpus_per_worker=1", f"train.steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
            "train.batch_size=8", "train.log_every=1", "train.warmup_steps=0", "sampling.strategy=proportional",
            f"train.storage_path={tmp_path / 'runs'}", f"tracking.uri={mlflow_uri(tmp_path)}",
            f"data.cache_dir={tmp_path / 'cache'}"]
    assert train.main(argv) == 0

    record = json.loads(next((tmp_path / "runs").glob("works-*/run.json")).read_text())
    assert record["result"]["steps"] == steps
    for case, (_, _, _, _, kept, text, metrics) in WORKING.items():
        folder = next((tmp_path / "cache" / case).glob("*/manifest.json")).parent
        manifest = json.loads((folder / "manifest.json").read_text())
        assert (manifest["counts"]["train"]["kept"], manifest["counts"]["validation"]["kept"]) == kept, (case, manifest)
        cached = [t for split in ("train", "validation") for t in
                  pads.dataset(str(folder / f"split={split}"), format="parquet").to_table(columns=["text"])["text"].to_pylist()]
        assert text in cached and not any(t.startswith("\ufeff") for t in cached), case
        assert set(record["result"]["dev_metrics"][case]) == metrics, case
