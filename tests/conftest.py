"""Shared fixtures: one Ray instance per test session, the shared GLUE folder, a session cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = ROOT.parent / "shared" / "data" / "glue"

# The jobs' local Ray settings, set before the session's Ray starts (its processes inherit them).
from pipeline.runtime import LOCAL_ENV  # noqa: E402

for _key, _value in LOCAL_ENV.items():
    os.environ.setdefault(_key, _value)


def pytest_collection_modifyitems(config, items):
    """Tests that start their own cluster run last: by then the session's Ray can be shut down (two Ray
    instances on one machine confuse Ray Train's placement-group cleaner)."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)


_STORE_TEMPLATE: list[Path] = []


def mlflow_uri(folder: Path) -> str:
    """`sqlite:///<folder>/mlflow.db`, a real MLflow store whose tables exist already: a new sqlite store
    runs MLflow's ~50 schema migrations (about 3 s here), done once per session and copied per test."""
    import shutil
    import tempfile

    db = Path(folder) / "mlflow.db"
    if not db.exists():
        if not _STORE_TEMPLATE:
            from mlflow.tracking import MlflowClient
            template = Path(tempfile.mkdtemp(prefix="mlflow-template-")) / "mlflow.db"
            MlflowClient(f"sqlite:///{template}").search_experiments()  # creates and migrates the schema
            _STORE_TEMPLATE.append(template)
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_STORE_TEMPLATE[0], db)
    return f"sqlite:///{db}"


def serve_predictions(model_uri: str, tracking_uri: str, records: list[dict], cwd: Path) -> list[dict]:
    """`mlflow models serve` of a registered model on 127.0.0.1 (local env), one REST request with `records`,
    the server stopped again: the reply's predictions."""
    import json
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bindir = str(Path(sys.executable).parent)  # the server execs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    server = subprocess.Popen([str(Path(bindir) / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, reply = time.monotonic() + 240, None
        body = json.dumps({"dataframe_records": records}).encode()
        while time.monotonic() < deadline and server.poll() is None:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                                 headers={"Content-Type": "application/json"})
                reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
                break
            except OSError:
                time.sleep(2)
        assert reply is not None, (server.stdout.read()[-4000:] if server.poll() is not None else "server did not answer")
        return reply["predictions"]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE TSVs not found at {GLUE_DIR} (they exist beside the repo in this project's CI)")
    return GLUE_DIR


@pytest.fixture(scope="session")
def ray_session():
    """Ray, started once for the whole session (2 CPUs), or the cluster at $RAY_ADDRESS. The dashboard (on 127.0.0.1) serves the State
    API, which Ray Train's placement-group cleaner needs to free a killed driver's worker groups."""
    import ray

    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if ray.is_initialized():
        pass
    elif os.environ.get("RAY_ADDRESS"):  # a running cluster (`ray start --head`), e.g. shared with a long job
        ray.init(log_to_driver=False, runtime_env=env)
    else:
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False, runtime_env=env)
    from ray.data import DataContext
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One preprocessed-data cache for the session: tasks built once are reused by later tests."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _keep_mlflow_uri():
    """Jobs called in-process may set MLflow's tracking URI (mlflow.set_tracking_uri also sets
    $MLFLOW_TRACKING_URI): restored after each test, so later subprocesses use their own default store."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(autouse=True)
def _quiet_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


TINY_TASKS = ("{rotten_tomatoes: {max_rows: {train: 256, validation: 50}}, bbc_news: {max_rows: {train: 256, validation: 45}}, "
              "xsum: {max_rows: {train: 128, validation: 12}}}")


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory, cache_dir, ray_session):
    """One tiny ZeRO-3 run on 2 workers (two classification tasks and XSum) with MLflow tracking and the
    paper's gradcos weighting, shared by the export, evaluation and registry tests and by the check that
    gradcos reads ZeRO-3's partitioned gradients through the loop: (config, TrainResult, its temp folder)."""
    from pipeline.config import load_config
    from pipeline.train.driver import train_driver

    tmp = tmp_path_factory.mktemp("zero3")
    cfg = load_config(None, [
        "name=x", "model.name=tiny-bert", "model.max_target_length=16", f"tasks={TINY_TASKS}",
        "train.num_workers=2", "train.cpus_per_worker=0.5", "train.zero_stage=3", "train.steps=10",
        "train.eval_every=10", "train.checkpoint_every=10", "train.lr=2e-3", "train.eval_batch_size=16",
        "train.weighting=gradcos", "train.log_every=2",
        f"train.storage_path={tmp / 'runs'}", f"tracking.uri={mlflow_uri(tmp)}", f"data.cache_dir={cache_dir}"])
    return cfg, train_driver(cfg, log=lambda _: None), tmp
