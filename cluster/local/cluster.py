"""A real local cluster for `ray job submit`: a Ray head and an MLflow tracking server, on 127.0.0.1.

    cluster/local/start.sh     # start both (idempotent: what is already up is left alone)
    cluster/local/status.sh    # what is running, where, and where its logs are
    cluster/local/stop.sh      # stop both: every process they started, nothing else
    cluster/local/node.sh add  # one more Ray node on this machine (RAY_NODE_CPUS CPUs): a second "machine"
    cluster/local/node.sh kill # SIGKILL the newest extra node and its workers: a machine lost mid-run

Then, from the repository root:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env cluster/runtime_env.yaml -- python jobs/train.py --config jobs/configs/default.yaml

Jobs on this cluster log to the MLflow server (the head is started with MLFLOW_TRACKING_URI pointing
at it) and keep runs and data under $MTL_HOME (default ~/.cache/mtl-pipeline).

Settings (environment variables, defaults in brackets):
    MTL_HOME            [~/.cache/mtl-pipeline]     runs, data cache; the cluster's folder below it
    MTL_CLUSTER_DIR     [$MTL_HOME/cluster]         state, logs/, the MLflow store and artifacts
    RAY_PORT            [6379]                      GCS port; also names Ray's temp dir /tmp/mtl-ray-<port>
    RAY_DASHBOARD_PORT  [8265]                      dashboard and job server
    RAY_CLIENT_PORT     [10001]                     Ray client server
    RAY_NUM_CPUS / RAY_NUM_GPUS  [detected]         resources the head advertises
    RAY_START_ARGS      []                          extra `ray start` arguments (e.g. worker port ranges)
    RAY_WORKER_NODES    [0]                         extra Ray nodes on this machine, started with the head
    RAY_NODE_CPUS       [1]                         CPUs of each extra node
    MLFLOW_PORT         [5000]                      MLflow tracking server
    MTL_BIND_HOST       [127.0.0.1]                 address every server binds to
    MTL_START_TIMEOUT_S [300]                       how long each server may take to answer (a busy machine is slow)

Ray's token authentication is on (RAY_AUTH_MODE=token; token in ~/.ray/auth_token, created if missing):
clients such as `ray job submit` need RAY_AUTH_MODE=token in their environment.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Settings:
    home: Path
    folder: Path
    ray_port: int
    dashboard_port: int
    client_port: int
    mlflow_port: int
    host: str
    num_cpus: str | None
    num_gpus: str | None
    extra_args: list[str]
    worker_nodes: int = 0
    node_cpus: str = "1"
    start_timeout_s: float = 300.0

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ
        home = Path(env.get("MTL_HOME") or Path.home() / ".cache" / "mtl-pipeline").expanduser().resolve()
        folder = Path(env.get("MTL_CLUSTER_DIR") or home / "cluster").expanduser().resolve()
        return cls(home, folder, int(env.get("RAY_PORT", 6379)), int(env.get("RAY_DASHBOARD_PORT", 8265)),
                   int(env.get("RAY_CLIENT_PORT", 10001)), int(env.get("MLFLOW_PORT", 5000)),
                   env.get("MTL_BIND_HOST", "127.0.0.1"), env.get("RAY_NUM_CPUS"), env.get("RAY_NUM_GPUS"),
                   shlex.split(env.get("RAY_START_ARGS", "")), int(env.get("RAY_WORKER_NODES", 0)),
                   env.get("RAY_NODE_CPUS", "1"), float(env.get("MTL_START_TIMEOUT_S", 300)))

    @property
    def ray_temp(self) -> Path:  # short: Ray's unix sockets live below it (path limit ~107 bytes)
        return Path(f"/tmp/mtl-ray-{self.ray_port}")

    @property
    def logs(self) -> Path:
        return self.folder / "logs"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def mlflow_pid_file(self) -> Path:
        return self.folder / "mlflow.pid"


def tool(name: str) -> str:
    """A console script of the Python running this file (the project's venv or conda env)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        sys.exit(f"error: `{name}` not found next to {sys.executable} or on PATH — fix: install the project "
                 f"(`make setup`) and run this script with its Python")
    return found


def say(message: str) -> None:
    print(message, flush=True)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status < 500
    except urllib.error.HTTPError as err:  # the server answered (e.g. 401 without the Ray token)
        return err.code < 500
    except (OSError, ValueError):
        return False


def wait_for(check, what: str, timeout_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tail = ""
    if log is not None and log.is_file():
        tail = "\n  last lines of " + str(log) + ":\n    " + "\n    ".join(log.read_text(errors="replace").splitlines()[-15:])
    sys.exit(f"error: {what} did not come up within {timeout_s:.0f} s{tail}")


# ---------------------------------------------------------------------------------------------- Ray
def ray_processes(s: Settings) -> list:
    """Every live process of this cluster: Ray's daemons name its temp dir on their command line (the
    client server its port); workers (whose title Ray rewrites) are found as their descendants."""
    import psutil

    marker = str(s.ray_temp)
    client = (f"--port={s.client_port}", "ray.util.client.server")  # the one daemon not naming the temp dir
    roots = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if proc.pid != os.getpid() and (any(marker in part for part in cmdline)
                                            or all(c in cmdline for c in client)):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found = {p.pid: p for p in roots}
    for proc in roots:
        try:
            found.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def ray_env(s: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # `python` in job entrypoints
        "RAY_AUTH_MODE": "token",
        "MLFLOW_TRACKING_URI": s.mlflow_url,
        "MTL_HOME": str(s.home),
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": env.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300"),
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # one machine: no node is preempted (its actor logs an error line)
        # Every process of the cluster inherits this from its raylet: Ray's own state-API clients inside workers
        # (Ray Train's placement-group cleaner, for one) then find this cluster even when another Ray instance
        # runs on the machine, instead of failing with "Found multiple active Ray instances".
        "RAY_ADDRESS": f"{s.host}:{s.ray_port}",
    })
    return env


def agent_port() -> int:
    """The node's dashboard agent port (it runs submitted jobs): Ray's fixed default 52365 when free, else a
    free one — every Ray node on one machine (a second cluster, extra nodes) needs its own, and a node whose
    agent cannot bind refuses jobs ("No available agent to submit job")."""
    import socket
    for port in (52365, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free port for the dashboard agent")


def ray_up(s: Settings) -> bool:
    return any("gcs_server" in " ".join(p.cmdline()) for p in ray_processes(s) if _alive(p))


def _alive(proc) -> bool:
    import psutil
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_ray(s: Settings) -> None:
    if ray_up(s):
        say(f"ray:    already running (GCS {s.host}:{s.ray_port}, dashboard {s.dashboard_url})")
        return
    env = ray_env(s)
    token = Path.home() / ".ray" / "auth_token"
    if not token.is_file() and not env.get("RAY_AUTH_TOKEN"):
        subprocess.run([tool("ray"), "get-auth-token", "--generate"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    cmd = [tool("ray"), "start", "--head", "--node-ip-address", s.host, "--port", str(s.ray_port),
           "--dashboard-host", s.host, "--dashboard-port", str(s.dashboard_port),
           "--ray-client-server-port", str(s.client_port), "--temp-dir", str(s.ray_temp), "--disable-usage-stats"]
    agent = agent_port()
    cmd += ["--dashboard-agent-listen-port", str(agent)]
    if s.num_cpus:
        cmd += ["--num-cpus", s.num_cpus]
    if s.num_gpus:
        cmd += ["--num-gpus", s.num_gpus]
    cmd += s.extra_args
    say("ray:    " + " ".join(shlex.quote(c) for c in cmd))
    log = s.logs / "ray-start.log"
    with open(log, "w") as fh:
        done = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"error: `ray start` failed (exit {done.returncode}); see {log}:\n"
                 + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    wait_for(lambda: http_ok(f"{s.dashboard_url}/api/version"), "the Ray dashboard", s.start_timeout_s, log)
    # jobs run through the head's dashboard agent: up before this script says so (the job server waits only 10 s)
    wait_for(lambda: http_ok(f"http://{s.host}:{agent}/api/healthz"), "the Ray dashboard agent", s.start_timeout_s, log)
    link = s.logs / "ray"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(s.ray_temp / "session_latest" / "logs")
    say(f"ray:    up — dashboard and job server {s.dashboard_url}, GCS {s.host}:{s.ray_port}")


def raylets(s: Settings) -> tuple[list, list]:
    """(head raylet, worker-node raylets oldest first) of this cluster: each Ray node has one raylet."""
    procs = [p for p in ray_processes(s) if _alive(p) and _name(p) == "raylet"]
    head = [p for p in procs if "--head" in p.cmdline()]
    return head, sorted((p for p in procs if p not in head), key=lambda p: p.create_time())


def add_node(s: Settings) -> None:
    """One more Ray node on this machine (`ray start --address`): its own raylet, object store and workers,
    `RAY_NODE_CPUS` CPUs — what a second machine joining the cluster looks like to Ray."""
    if not ray_up(s):
        sys.exit(f"error: no cluster head is running on {s.host}:{s.ray_port} — fix: cluster/local/start.sh first")
    before = len(raylets(s)[1])
    # Its own temp dir (named after the head's, so ray_processes finds it): nodes sharing one would unpack each
    # job's working_dir into the same runtime_resources folder, replacing the files under a running driver.
    temp = f"{s.ray_temp}-n{int(time.time() * 10) % 1_000_000}"
    cmd = [tool("ray"), "start", "--address", f"{s.host}:{s.ray_port}", "--node-ip-address", s.host,
           "--temp-dir", temp, "--num-cpus", s.node_cpus, "--disable-usage-stats",
           "--dashboard-agent-listen-port", str(agent_port()), *s.extra_args]
    log = s.logs / "ray-node.log"
    with open(log, "a") as fh:
        done = subprocess.run(cmd, env=ray_env(s), stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"error: `ray start --address` failed (exit {done.returncode}); see {log}")
    wait_for(lambda: len(raylets(s)[1]) > before, "the new node's raylet", s.start_timeout_s, log)
    say(f"node:   added ({s.node_cpus} CPU) — {before + 2} nodes in the cluster")


def kill_node(s: Settings) -> None:
    """SIGKILL the newest worker node's raylet and everything under it (its training workers included): a
    machine lost mid-run, as Ray sees it. The head is never chosen."""
    import psutil

    nodes = raylets(s)[1]
    if not nodes:
        sys.exit("error: no worker node to kill — fix: start one with RAY_WORKER_NODES=1 or cluster/local/node.sh add")
    raylet = nodes[-1]
    node_id = next((a.split("=", 1)[1] for a in raylet.cmdline() if a.startswith("--node_id=")), "?")
    victims = [raylet, *raylet.children(recursive=True)]
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)
    say(f"node:   killed {node_id[:12]} ({len(victims)} processes) — {len(nodes)} nodes left in the cluster")


def stop_ray(s: Settings, grace_s: float = 15.0) -> int:
    import psutil

    procs = [p for p in ray_processes(s) if _alive(p)]
    gcs = [p for p in procs if _name(p) == "gcs_server"]
    alive: list = []
    for wave in ([p for p in procs if p not in gcs], gcs):  # the GCS last: the others report to it as they exit
        for p in wave:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        alive += psutil.wait_procs(wave, timeout=grace_s)[1]
    if alive:
        say(f"ray:    {len(alive)} processes still up after {grace_s:g} s: killing "
            + ", ".join(sorted({_name(p) for p in alive})))
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


def _name(proc) -> str:
    try:
        return proc.name()
    except Exception:
        return str(proc.pid)


# ------------------------------------------------------------------------------------------- MLflow
def mlflow_pid(s: Settings) -> int | None:
    import psutil
    try:
        pid = int(s.mlflow_pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if psutil.pid_exists(pid) and _alive(psutil.Process(pid)) else None


def mlflow_up(s: Settings) -> bool:
    return http_ok(f"{s.mlflow_url}/health")


def start_mlflow(s: Settings):
    """Launch the server; returns a function that waits until it answers (Ray starts meanwhile)."""
    if mlflow_pid(s) and mlflow_up(s):
        say(f"mlflow: already running at {s.mlflow_url}")
        return lambda: None
    if mlflow_up(s):
        sys.exit(f"error: something else already answers on {s.mlflow_url} — fix: stop it, or set MLFLOW_PORT")
    store = s.folder / "mlflow"
    (store / "artifacts").mkdir(parents=True, exist_ok=True)
    cmd = [tool("mlflow"), "server", "--host", s.host, "--port", str(s.mlflow_port),
           "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
           "--artifacts-destination", str(store / "artifacts"), "--serve-artifacts", "--workers", "2"]
    say("mlflow: " + " ".join(shlex.quote(c) for c in cmd))
    log = s.logs / "mlflow.log"
    with open(log, "a") as fh:  # its own session: stop.sh ends the whole group (uvicorn workers included)
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "PATH": f"{Path(sys.executable).parent}"
                                                                                   f"{os.pathsep}{os.environ.get('PATH', '')}"})
    s.mlflow_pid_file.write_text(str(proc.pid))

    def wait() -> None:
        wait_for(lambda: mlflow_up(s) or proc.poll() is not None, "the MLflow server", s.start_timeout_s, log)
        if proc.poll() is not None:
            sys.exit(f"error: the MLflow server exited ({proc.returncode}); see {log}:\n"
                     + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        say(f"mlflow: up — {s.mlflow_url} (store {store / 'mlflow.db'}, artifacts {store / 'artifacts'})")
    return wait


def stop_mlflow(s: Settings, grace_s: float = 15.0) -> int:
    import psutil
    pid = mlflow_pid(s)
    if pid is None:
        s.mlflow_pid_file.unlink(missing_ok=True)
        return 0
    group = [p for p in psutil.process_iter() if _pgid(p.pid) == pid]
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    _, alive = psutil.wait_procs(group, timeout=grace_s)
    if alive:
        say(f"mlflow: {len(alive)} processes still up after {grace_s:g} s: killing "
            + ", ".join(sorted({_name(p) for p in alive})))
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        psutil.wait_procs(alive, timeout=5)
    s.mlflow_pid_file.unlink(missing_ok=True)
    return len(group)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


# ------------------------------------------------------------------------------------------ commands
def start(s: Settings) -> None:
    s.logs.mkdir(parents=True, exist_ok=True)
    mlflow_ready = start_mlflow(s)
    start_ray(s)
    for _ in range(s.worker_nodes - len(raylets(s)[1])):  # extra nodes on this machine (RAY_WORKER_NODES)
        add_node(s)
    mlflow_ready()  # before returning: jobs submitted as soon as this script ends can log
    (s.folder / "cluster.json").write_text(json.dumps(
        {"dashboard": s.dashboard_url, "gcs": f"{s.host}:{s.ray_port}", "mlflow": s.mlflow_url,
         "ray_temp_dir": str(s.ray_temp), "logs": str(s.logs), "mtl_home": str(s.home)}, indent=2))
    say("")
    say(f"Ray dashboard:  {s.dashboard_url}")
    say(f"MLflow:         {s.mlflow_url}")
    say(f"logs:           {s.logs}  (ray/ -> Ray's session logs, mlflow.log)")
    say("submit a job:   RAY_AUTH_MODE=token ray job submit --address " + s.dashboard_url
        + " --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/train.py --config jobs/configs/default.yaml")


def stop(s: Settings) -> None:
    n_ray = stop_ray(s)
    n_mlflow = stop_mlflow(s)
    say(f"ray:    {'stopped (' + str(n_ray) + ' processes)' if n_ray else 'not running'}")
    say(f"mlflow: {'stopped (' + str(n_mlflow) + ' processes)' if n_mlflow else 'not running'}")


def status(s: Settings) -> int:
    ray_ok, mlflow_ok = ray_up(s), mlflow_up(s)
    say(f"ray:    {'up' if ray_ok else 'down'} — dashboard {s.dashboard_url}, GCS {s.host}:{s.ray_port}, "
        f"{len(ray_processes(s))} processes")
    if ray_ok:
        out = subprocess.run([tool("ray"), "status", "--address", f"{s.host}:{s.ray_port}"], env=ray_env(s),
                             capture_output=True, text=True, timeout=60)
        say("        " + "\n        ".join(line for line in out.stdout.splitlines() if line.strip()))
    say(f"mlflow: {'up' if mlflow_ok else 'down'} — {s.mlflow_url}")
    say(f"logs:   {s.logs}")
    return 0 if ray_ok and mlflow_ok else 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["node"] and argv[1:] in (["add"], ["kill"]):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        s = Settings.from_env()
        (add_node if argv[1] == "add" else kill_node)(s)
        return 0
    if len(argv) != 1 or argv[0] not in {"start", "stop", "status"}:
        print(__doc__)
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `status.sh | head` ends quietly
    s = Settings.from_env()
    if argv[0] == "start":
        start(s)
        return 0
    if argv[0] == "stop":
        stop(s)
        return 0
    return status(s)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
