"""The cluster path end to end: `cluster/local/start.sh` (a real Ray head and MLflow server on 127.0.0.1),
`ray job submit` of the train job exactly as the README shows (in its --smoke form: the main job's CI
check) and (slow tier) of the evaluate job, the run found through the
MLflow server's REST API with its metrics and model artifact, then `stop.sh` and nothing left running.

Isolated from the test session's own Ray (two Ray instances on one machine confuse Ray Train's
placement-group cleaner): the `cluster` marker runs these tests last, after
that Ray is shut down, on free ports, with their own temp dirs and MTL_HOME."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"$ {' '.join(cmd)}\n{done.stdout}\n{done.stderr}")
    return done


def _rest(base: str, path: str, params: dict | None = None, body: dict | None = None) -> dict:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    import psutil

    try:  # the session's Ray instance (if any test started one) is gone before this cluster starts
        import ray
        ray.shutdown()
    except Exception:
        pass
    tmp = tmp_path_factory.mktemp("cluster")
    before = {p.pid for p in psutil.process_iter()}
    ports = {"RAY_PORT": _free_port(), "RAY_DASHBOARD_PORT": _free_port(), "RAY_CLIENT_PORT": _free_port(),
             "MLFLOW_PORT": _free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    env.update({k: str(v) for k, v in ports.items()})
    env.update({"MTL_HOME": str(tmp / "home"), "MTL_CLUSTER_DIR": str(tmp / "cluster"), "RAY_NUM_CPUS": "2",
                "MTL_PYTHON": sys.executable, "RAY_AUTH_MODE": "token",
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    started = _run(["bash", "cluster/local/start.sh"], env, timeout=900)
    info = {"env": env, "tmp": tmp, "ports": ports, "start": started, "before": before,
            "dashboard": f"http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}",
            "mlflow": f"http://127.0.0.1:{ports['MLFLOW_PORT']}", "ray_temp": f"/tmp/mtl-ray-{ports['RAY_PORT']}"}
    try:
        yield info
    finally:
        stopped = _run(["bash", "cluster/local/stop.sh"], env, timeout=120)
        info["stop"] = stopped
        leftovers = [p for p in psutil.process_iter(["cmdline"])
                     if any(info["ray_temp"] in part or str(tmp) in part for part in (p.info["cmdline"] or []))]
        for p in leftovers:  # never leave processes behind, even when the assertions below fail
            p.kill()
        info["leftovers"] = leftovers


def test_jobs_submitted_to_the_local_cluster_track_into_the_mlflow_server(local_cluster):
    env, tmp = local_cluster["env"], local_cluster["tmp"]
    assert local_cluster["start"].returncode == 0, local_cluster["start"].stderr
    out = local_cluster["start"].stdout
    assert local_cluster["dashboard"] in out and local_cluster["mlflow"] in out
    assert (tmp / "cluster" / "logs" / "mlflow.log").is_file() and (tmp / "cluster" / "logs" / "ray").is_dir()

    again = _run(["bash", "cluster/local/start.sh"], env)  # idempotent: nothing new started
    assert again.returncode == 0 and again.stdout.count("already running") == 2, again.stdout
    status = _run(["bash", "cluster/local/status.sh"], env, timeout=120)
    assert status.returncode == 0 and "ray:    up" in status.stdout and "mlflow: up" in status.stdout

    # Security: the dashboard/job server and MLflow listen on 127.0.0.1 only, and Ray's token auth is on
    # (a request without the token is refused).
    import psutil
    for name in ("RAY_DASHBOARD_PORT", "MLFLOW_PORT"):
        port = local_cluster["ports"][name]
        binds = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert binds == {"127.0.0.1"}, (name, binds)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{local_cluster['dashboard']}/api/jobs/", timeout=30)
    assert refused.value.code in (401, 403)

    storage = f"file://{tmp / 'store'}"  # run storage through a pyarrow filesystem URI
    submission = f"cluster-it-{uuid.uuid4().hex[:6]}"
    # The README's cluster command on the main job, in its CI form (--smoke: real MiniLM, three tasks, 8 steps).
    train = _run([str(BIN / "ray"), "job", "submit", "--address", local_cluster["dashboard"], "--submission-id", submission,
                  "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--",
                  "python", "jobs/train.py", "--config", "jobs/configs/default.yaml", "--smoke",
                  "name=cluster-it", "train.cpus_per_worker=0.5", f"train.storage_path={storage}"], env, timeout=600)
    job = _run([str(BIN / "ray"), "job", "status", submission, "--address", local_cluster["dashboard"],
                "--log-style", "record"], env)
    assert f"Job '{submission}' succeeded" in job.stdout + job.stderr, f"{train.stdout[-4000:]}\n{train.stderr[-2000:]}"
    # the run, its metrics and its model artifact, through the server's REST API
    api = local_cluster["mlflow"] + "/api/2.0/mlflow"
    experiment = _rest(api, "/experiments/get-by-name", {"experiment_name": "cluster-it"})["experiment"]
    runs = _rest(api, "/runs/search", body={"experiment_ids": [experiment["experiment_id"]]})["runs"]
    (run,) = [r for r in runs if r["info"]["run_name"].startswith("cluster-it-")]
    assert run["info"]["status"] == "FINISHED"
    run_id = run["info"]["run_id"]
    assert f"MLflow run id: {run_id}" in train.stdout and "best dev score" in train.stdout, train.stdout[-3000:]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    # the dev table the job printed is the run's last evaluation, as the server holds it
    table = train.stdout.split("metric")[-1]
    rows = [l.split() for l in table.splitlines() if l.startswith(("rotten_tomatoes ", "bbc_news ", "xsum "))]
    assert {r[0] for r in rows} == {"rotten_tomatoes", "bbc_news", "xsum"}, train.stdout[-3000:]
    for task, metric, value in ((r[0], r[1], float(r[2])) for r in rows):
        assert value == pytest.approx(metrics[f"dev/{task}/{metric}"], abs=5e-5), (task, metric, value)
    # accuracy over the 32 dev rows --smoke gives each task: a whole number of correct rows out of 32
    correct = metrics["dev/rotten_tomatoes/accuracy"] * 32
    assert abs(correct - round(correct)) < 1e-6
    assert sum(metrics[f"steps/{t}"] for t in ("rotten_tomatoes", "bbc_news", "xsum")) == 8
    history = _rest(api, "/metrics/get-history", {"run_id": run_id, "metric_key": "loss/total"})["metrics"]
    assert sorted(m["step"] for m in history) == [4, 8]  # log_every 4
    files = {f["path"] for f in _rest(api, "/artifacts/list", {"run_id": run_id, "path": "model"})["files"]}
    assert {"model/mtl_model.json", "model/heads.safetensors", "model/backbone", "model/tokenizer"} <= files, files
    with urllib.request.urlopen(f"{local_cluster['mlflow']}/get-artifact?"
                                + urllib.parse.urlencode({"path": "model/mtl_model.json", "run_uuid": run_id})) as r:
        meta = json.loads(r.read())
    assert meta["run_name"] == run["info"]["run_name"] and {"rotten_tomatoes", "bbc_news", "xsum"} <= set(meta["tasks"])

    # artifacts live in the server's artifact store, not in the job's (temporary) working dir
    served = list((tmp / "cluster" / "mlflow" / "artifacts").rglob("mtl_model.json"))
    assert served, "the model artifact is not in the MLflow server's artifacts destination"
    packages = [p for p in Path(local_cluster["ray_temp"], "session_latest", "runtime_resources", "working_dir_files").glob("*")
                if p.is_dir()]
    assert packages and all((p / "jobs" / "train.py").is_file() for p in packages)
    assert not [p for p in packages if (p / ".venv").exists() or (p / "mlruns").exists() or (p / "mlflow.db").exists()]
    # checkpoints and models in the configured storage URI
    run_dir = tmp / "store" / run["info"]["run_name"]
    assert (run_dir / "run.json").is_file() and (run_dir / "final_model" / "mtl_model.json").is_file()
    assert [p.name for p in run_dir.glob("step_*")] == ["step_0000008"]  # --smoke checkpoints at its last step

    local_cluster["trained"] = {"run": run, "storage": storage, "experiment": experiment, "metrics": metrics}


def test_a_driver_joining_the_cluster_directly_gets_quiet_workers(local_cluster):
    """`RAY_ADDRESS=... python jobs/...` (no `ray job submit`): the job's workers set Ray Data's console to
    WARNING before any task runs (worker_process_setup_hook), as the workers of a Ray the jobs start do."""
    env = {**local_cluster["env"], "RAY_ADDRESS": f"127.0.0.1:{local_cluster['ports']['RAY_PORT']}"}
    probe = ("import json, logging, os, ray\n"
             "from pipeline.runtime import init_ray\n"
             "init_ray()\n"
             "@ray.remote\n"
             "def worker():\n"
             "    import ray.data\n"
             "    from ray.util.state import list_actors\n"
             "    return (os.environ.get('RAY_DATA_LOGGING_CONFIG'), [h.level for h in logging.getLogger('ray.data').handlers],\n"
             "            os.environ.get('RAY_ADDRESS'), len(list_actors(limit=10)))\n"
             "print(json.dumps(ray.get(worker.remote())))\n")
    done = _run([sys.executable, "-c", probe], env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    path, levels, address, _ = json.loads(done.stdout.strip().splitlines()[-1])
    assert path == str(ROOT / "pipeline" / "ray_data_logging.yaml")
    assert 30 in levels  # the console handler at WARNING (the file handler keeps every level)
    # every process of the cluster knows its cluster (from its raylet): Ray's state API inside a worker (as Ray
    # Train's placement-group cleaner uses it) works even with the test session's own Ray on the machine
    assert address == env["RAY_ADDRESS"]


@pytest.mark.slow  # default tier: the evaluate job in process, on a run by name in a storage URI (tests/test_evaluate.py)
def test_evaluate_job_submitted_to_the_cluster_scores_the_run_by_name(local_cluster):
    """A second job on the same cluster: evaluate the train job's run by name from the storage URI, recorded in
    MLflow; its results land in MTL_HOME, not in the job's temporary working dir."""
    if "trained" not in local_cluster:
        pytest.skip("needs the train job of test_jobs_submitted_to_the_local_cluster_track_into_the_mlflow_server")
    env, tmp = local_cluster["env"], local_cluster["tmp"]
    run, storage, experiment, metrics = (local_cluster["trained"][k] for k in ("run", "storage", "experiment", "metrics"))
    api = local_cluster["mlflow"] + "/api/2.0/mlflow"
    run_id = run["info"]["run_id"]
    evaluate = _run([str(BIN / "ray"), "job", "submit", "--address", local_cluster["dashboard"],
                     "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--",
                     "python", "jobs/evaluate.py", "--model", run["info"]["run_name"], "--storage-path", storage,
                     "--tasks", "rotten_tomatoes", "--out", "eval_it"], env, timeout=300)
    assert "multi-task score (validation)" in evaluate.stdout, evaluate.stdout[-3000:] + evaluate.stderr[-2000:]
    assert (tmp / "home" / "results" / "eval_it" / "results.json").is_file()  # not in the job's working dir
    evals = _rest(api, "/runs/search", body={"experiment_ids": [experiment["experiment_id"]],
                                             "filter": "tags.`mtl.kind` = 'evaluation'"})["runs"]
    assert len(evals) == 1
    scored = json.loads((tmp / "home" / "results" / "eval_it" / "results.json").read_text())
    logged = {m["key"]: m["value"] for m in evals[0]["data"]["metrics"]}
    assert logged["validation/rotten_tomatoes/accuracy"] == pytest.approx(metrics["dev/rotten_tomatoes/accuracy"], abs=1e-6)
    assert scored["run_id"] == run_id


def test_stop_leaves_nothing_running(local_cluster, request):
    """Runs after the job test (same module): stop.sh, then no process of the cluster and no open port."""
    import psutil

    env = local_cluster["env"]
    stopped = _run(["bash", "cluster/local/stop.sh"], env, timeout=120)
    assert stopped.returncode == 0 and "ray:    stopped" in stopped.stdout and "mlflow: stopped" in stopped.stdout
    mine = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    new = [p for p in psutil.process_iter(["cmdline", "name"]) if p.pid not in local_cluster["before"] | mine]
    left = [(p.pid, p.info["name"], " ".join(p.info["cmdline"] or [])[:200]) for p in new
            if p.info["cmdline"] and any(w in " ".join(p.info["cmdline"]) for w in ("ray", "mlflow", "gunicorn", "uvicorn"))]
    assert not left, f"processes the cluster started are still running: {left}"
    assert not any(_listening(p) for p in local_cluster["ports"].values())
    again = _run(["bash", "cluster/local/stop.sh"], env)
    assert again.returncode == 0 and "ray:    not running" in again.stdout and "mlflow: not running" in again.stdout
    status = _run(["bash", "cluster/local/status.sh"], env, timeout=60)
    assert status.returncode == 1 and "ray:    down" in status.stdout
