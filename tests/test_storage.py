"""Run storage on a folder or a pyarrow URI, where new experiments keep their artifacts, and where a
submitted job's results go."""

from __future__ import annotations

import json
import os
import time

import pytest

from pipeline import storage
from pipeline.config import load_config
from pipeline.errors import PipelineError


@pytest.mark.parametrize("as_uri", [False, True], ids=["folder", "file-uri"])
def test_storage_round_trip(tmp_path, as_uri):
    base = f"file://{tmp_path}/runs" if as_uri else str(tmp_path / "runs")
    assert storage.is_uri(base) == as_uri
    assert storage.subdirs(base) == []  # missing base: nothing, no error
    storage.write_text(storage.join(base, "r1", "run.json"), '{"a": 1}')
    assert storage.is_file(storage.join(base, "r1", "run.json")) and storage.is_dir(storage.join(base, "r1"))
    assert json.loads(storage.read_text(storage.join(base, "r1", "run.json"))) == {"a": 1}
    storage.write_text(storage.join(base, "r1", "run.json"), '{"a": 2}')  # replaced whole
    assert json.loads(storage.read_text(storage.join(base, "r1", "run.json"))) == {"a": 2}
    (tmp_path / "runs" / "r1" / "model").mkdir()
    (tmp_path / "runs" / "r1" / "model" / "w.bin").write_bytes(b"\x00\x01")
    with storage.local_copy(storage.join(base, "r1", "model")) as local:
        assert (local / "w.bin").read_bytes() == b"\x00\x01"
        copied = local
    assert copied.exists() != as_uri  # a temporary copy is removed, the local folder itself is not
    assert [n for n, _ in storage.subdirs(base)] == ["r1"]
    assert not [p for p in (tmp_path / "runs" / "r1").iterdir() if ".tmp-" in p.name]  # no temp file left
    storage.remove_dir(storage.join(base, "r1"))  # a run folder, removed with its contents
    assert not (tmp_path / "runs" / "r1").exists() and storage.subdirs(base) == []
    storage.remove_dir(storage.join(base, "r1"))  # already gone: no error


@pytest.mark.parametrize("as_uri", [False, True], ids=["folder", "file-uri"])
def test_resume_finds_runs_in_folders_and_uris(tmp_path, as_uri):
    from pipeline.train.driver import _run_dir

    base = f"file://{tmp_path}" if as_uri else str(tmp_path)
    cfg = load_config(None, ["name=demo", "tasks={rotten_tomatoes: {}}", f"train.storage_path={base}"])
    with pytest.raises(PipelineError, match="no run of 'demo'"):
        _run_dir(cfg, True)
    for i, name in enumerate(["demo-aaaa", "demo-bbbb"]):
        storage.write_text(storage.join(base, name, "run.json"), json.dumps({"run_name": name, "run_id": f"id{i}"}))
        os.utime(tmp_path / name / "run.json", (time.time() + i * 10,) * 2)
    (tmp_path / "other-cccc").mkdir()
    name, folder, previous = _run_dir(cfg, True)
    assert name == "demo-bbbb" and previous["run_id"] == "id1" and folder == storage.join(base, "demo-bbbb")
    name, folder, previous = _run_dir(cfg, "demo-aaaa")
    assert previous["run_id"] == "id0"
    with pytest.raises(PipelineError, match="demo-aaaa, demo-bbbb, other-cccc"):
        _run_dir(cfg, "demo-zzzz")
    name, folder, previous = _run_dir(cfg, False)
    assert previous is None and name.startswith("demo-") and folder.startswith(base)


def test_sqlite_experiments_keep_artifacts_beside_the_store(tmp_path, monkeypatch):
    """A new experiment in a sqlite store keeps its artifacts next to the database file, whatever the
    working directory of the process that created it (a submitted job's or Tune trial's is temporary)."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import artifact_location, experiment_id

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    elsewhere = tmp_path / "job-working-dir"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    client = MlflowClient(uri)
    exp = experiment_id(client, "my exp/1", uri)
    assert experiment_id(client, "my exp/1", uri) == exp  # found, not created twice
    run = client.create_run(exp)
    client.log_text(run.info.run_id, "hello", "notes/a.txt")
    assert (tmp_path / "store" / "mlruns" / "my_exp_1").is_dir()
    assert list((tmp_path / "store" / "mlruns").rglob("a.txt")) and not list(elsewhere.rglob("a.txt"))
    assert artifact_location("http://127.0.0.1:5000", "x") is None  # a server decides for itself


def test_relative_outputs_of_submitted_jobs_go_under_mtl_home(tmp_path, monkeypatch):
    from pipeline import runtime
    from pipeline.model import refs

    monkeypatch.setattr(refs, "HOME", tmp_path / "home")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert str(runtime.output_dir("eval_results")) == "eval_results"
    assert runtime.output_dir(tmp_path / "abs") == tmp_path / "abs"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets for an entrypoint
    assert runtime.output_dir("eval_results") == tmp_path / "home" / "results" / "eval_results"
    assert runtime.output_dir(tmp_path / "abs") == tmp_path / "abs"
