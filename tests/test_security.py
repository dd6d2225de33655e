"""Security: servers on 127.0.0.1 unless configured otherwise (the cluster test checks the live sockets
and Ray's token auth), weights only through safetensors or `torch.load(weights_only=True)`, YAML only
through `safe_load`, and the values of secret-looking config keys never in MLflow, run files or output."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from conftest import mlflow_uri

ROOT = Path(__file__).resolve().parents[1]
CODE = [p for d in ("pipeline", "jobs", "cluster", "tests") for p in sorted((ROOT / d).rglob("*.py"))]


def _calls(name: str):
    """(file, line, call node) of every call to `name` (e.g. "torch.load") in the project's Python."""
    for path in CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                yield path.relative_to(ROOT), node.lineno, node


def test_servers_default_to_localhost():
    """No code binds every interface; the local cluster's host and the test Ray's dashboard are 127.0.0.1.
    (Kubernetes manifests bind 0.0.0.0 inside the pod, exposed only through a ClusterIP Service.)"""
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in CODE if p.name != "test_security.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if "0.0.0.0" in line]
    assert offenders == []
    cluster = (ROOT / "cluster" / "local" / "cluster.py").read_text()
    assert re.search(r'host: str = os.environ.get\("MTL_HOST", "127\.0\.0\.1"\)|"127\.0\.0\.1"', cluster)
    for path, line, call in _calls("ray.init"):
        host = {k.arg: ast.unparse(k.value) for k in call.keywords}.get("dashboard_host", "'127.0.0.1'")
        assert host == "'127.0.0.1'", f"{path}:{line}"  # Ray's own default is 127.0.0.1 as well


def test_torch_load_is_always_weights_only():
    found = list(_calls("torch.load"))
    assert found, "the scan finds torch.load calls"
    for path, line, call in found:
        kwargs = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert kwargs.get("weights_only") == "True", f"{path}:{line}: torch.load without weights_only=True"
    assert not list(_calls("pickle.load")) and not list(_calls("pickle.loads"))


def test_saved_models_are_safetensors_only(tmp_path):
    from pipeline.model.multitask import Head, build_model
    from pipeline.model.refs import load_tokenizer
    model = build_model("tiny-bert", [Head("a", "classification", 2)])
    folder = model.save(tmp_path / "m", load_tokenizer("tiny-bert"), metadata={})
    weights = [p.name for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert weights and all(w.endswith(".safetensors") for w in weights), weights


def test_checkpoint_pickle_that_runs_code_is_refused_before_deepspeed_sees_it(tmp_path):
    """A checkpoint whose pickle would run a command (swapped in on shared storage, its manifest rewritten to
    match) fails verification without running it; resume would fall back to the previous checkpoint."""
    import os

    import torch

    from pipeline.train.checkpoints import verify, write_manifest

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    folder = tmp_path / "step_0000010"
    (folder / "ds").mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"step": 10, "world": 1}))
    torch.save({"module": {}, "client": Payload()}, folder / "ds" / "mp_rank_00_model_states.pt")
    write_manifest(folder, 0)
    problem = verify(folder)
    assert problem and "mp_rank_00_model_states.pt does not load with weights_only=True" in problem, problem
    assert not (tmp_path / "pwned").exists()


def test_yaml_is_only_read_with_safe_load():
    for name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
        assert not list(_calls(name)), name
    assert list(_calls("yaml.safe_load"))


def test_credentials_in_the_tracking_uri_are_refused(monkeypatch):
    from pipeline.config import load_config
    from pipeline.errors import PipelineError
    from pipeline.tracking import tracking_uri
    with pytest.raises(PipelineError) as info:
        load_config(None, ["tasks={sst2: {}}", "tracking.uri=https://alice:hunter2@mlflow.example.com"])
    (line,) = [str(p) for p in info.value.problems]
    assert line.startswith("tracking.uri: holds credentials") and "MLFLOW_TRACKING_PASSWORD" in line
    assert "hunter2" not in line
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:hunter2@mlflow.example.com")
    with pytest.raises(PipelineError, match=r"^\$MLFLOW_TRACKING_URI: holds credentials"):
        tracking_uri(None)


def test_secret_keys_are_dropped_from_params_and_redacted_in_copies():
    from pipeline.tracking import flatten_params, redact
    tree = {"a": {"api_key": "k1", "Password": "k2", "auth_token": "k3", "secrets": ["k4"], "client_credential": "k5",
                  "access_key": "k6", "b": 1, "tokenizer": "kept"}}
    assert flatten_params(tree) == {"a.b": "1", "a.tokenizer": "kept"}
    assert redact(tree) == {"a": {"api_key": "***", "Password": "***", "auth_token": "***", "secrets": "***",
                                  "client_credential": "***", "access_key": "***", "b": 1, "tokenizer": "kept"}}


def test_a_secret_value_in_the_config_never_reaches_mlflow_files_or_output(tmp_path, cache_dir, ray_session, capfd):
    """A real run whose config holds a secret-looking key (a row filter on a column named `api_token`):
    the value is in no MLflow param, tag, metric name or artifact, in no file of the run, and not printed."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from pipeline.train.driver import train_driver

    secret = "sk-live-5f3a9e-DO-NOT-LOG"
    rows = "".join(f"text {i} {'good' if i % 2 else 'bad'}\t{'pos' if i % 2 else 'neg'}\t{secret if i % 3 else 'other'}\n"
                   for i in range(90))
    (tmp_path / "mine.tsv").write_text("text\tlabel\tapi_token\n" + rows)
    task = (f"{{mine: {{define: {{kind: classification, format: tsv, files: {{train: {tmp_path / 'mine.tsv'}}}, "
            f"carve_from: train, carve: {{train: 0.8, validation: 0.2}}, columns: {{text: text, label: label}}, label_names: [neg, pos], "
            f"where: {{api_token: {secret}}}}}}}}}")
    cfg = load_config(None, ["name=sec", "model.name=tiny-bert", f"tasks={task}", "train.num_workers=1",
                             "train.cpus_per_worker=1", "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2",
                             "train.batch_size=8", f"train.storage_path={tmp_path / 'runs'}",
                             f"tracking.uri={mlflow_uri(tmp_path)}", f"data.cache_dir={cache_dir}"])
    result = train_driver(cfg)  # logs to stdout, captured below
    assert result.steps == 2

    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(result.run_id)
    assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if secret in v or secret in k]
    assert "tasks.mine.define.where.api_token" not in run.data.params
    assert "tasks.mine.define.columns.text" in run.data.params  # the rest of the config is there
    logged = json.loads(Path(client.download_artifacts(result.run_id, "config/resolved_config.json", str(tmp_path))).read_text())
    assert logged["tasks"]["mine"]["define"]["where"] == {"api_token": "***"}
    leaked = [str(p) for p in Path(result.run_dir).rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaked == []
    out = capfd.readouterr()
    assert secret not in out.out and secret not in out.err
