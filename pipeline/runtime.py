"""Process set-up shared by the jobs: connect to (or start) Ray, and argument parsing."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


LOCAL_ENV = {
    "TOKENIZERS_PARALLELISM": "false",  # Ray workers already use every core
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",  # worker start can exceed the 60 s default on small machines
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # one machine: no node is preempted (and its actor logs an error line)
}
# For a Ray started here, unless --verbose: what its worker processes print too (they inherit the environment).
QUIET_LOCAL_ENV = {
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
    "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("ray_data_logging.yaml")),  # console at WARNING
}


VERBOSE = "MTL_VERBOSE"  # "1": library logs (Ray Data, Ray Train, DeepSpeed, transformers) on the console too


def quiet_libraries() -> None:
    """Library chatter off the console unless $MTL_VERBOSE=1 (`--verbose`): Ray Data's and Ray Train's INFO
    lines, MLflow's store set-up, transformers' load reports and progress bars, deprecation warnings.
    Warnings of real problems and errors still print; the INFO lines stay in Ray's log files
    (/tmp/ray/session_latest/logs: ray-data.log, train/). Called in the driver and at the start of every
    training worker."""
    import logging
    import warnings
    if os.environ.get(VERBOSE) == "1":
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in ("ray.train", "ray.tune", "mlflow", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:  # Ray Train's "Reporting training result ..." logger is named by its file path, outside "ray.train"
        from ray.train.v2._internal.execution import context as train_context
        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray version: the line just shows
        pass
    # Ray Data sets up its logger when imported (its file handler keeps every level): raise only its console's.
    import ray.data  # noqa: F401
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.WARNING)


KEEP_FREED_MEMORY = "MTL_KEEP_FREED_MEMORY"  # "0": leave glibc's malloc at its defaults in training processes
ARENA_MAX = "MALLOC_ARENA_MAX"  # glibc: how many malloc arenas a process's threads share


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Keep freed memory in the process instead of handing it back to the OS (glibc's malloc only; a no-op
    elsewhere and with $MTL_KEEP_FREED_MEMORY=0). By default glibc serves large blocks (activations, gradient
    buckets: megabytes each) with a fresh mmap and unmaps them when freed, so every step faults in and zeroes
    the same memory again: measured on MiniLM (tests/bench/results/train_cpu_sampling.md), about 76k page faults
    per second in the DeepSpeed processes, job and torchrun alike (9% of a core in the kernel), against 24k in a
    plain PyTorch loop. With the mmap threshold at glibc's
    maximum (32 MiB) and the heap trimmed only beyond `limit` bytes, the blocks are reused. Memory held stays
    at the step's peak, which training reaches every step anyway. Returns whether it was applied."""
    import ctypes
    import ctypes.util
    if os.environ.get(KEEP_FREED_MEMORY) == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only (musl has no such tunables)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, limit))


def malloc_env() -> dict[str, str]:
    """Environment variables for a training process started from here, so that `keep_freed_memory` also holds
    when the training loop runs on a thread other than the process's main one (Ray Train runs it on one): glibc
    gives each further thread its own arena, made of 64 MiB heaps that it unmaps as soon as one is free, whatever
    the trim threshold, so every step faults those pages in again. With MALLOC_ARENA_MAX=1 every thread allocates
    from the main heap. Measured in the job's worker (MiniLM, ZeRO-1, 1 worker): 90k page faults per second
    without, 42k with, as many as the same loop on its process's main thread (torchrun);
    tests/bench/results/train_arena/README.md. The variable is read when the process starts, hence an
    environment variable and not a `mallopt` call. Empty with $MTL_KEEP_FREED_MEMORY=0; a MALLOC_ARENA_MAX
    set here already is passed on as it is."""
    if os.environ.get(KEEP_FREED_MEMORY) == "0":
        return {}
    return {ARENA_MAX: os.environ.get(ARENA_MAX, "1")}


def quiet_worker() -> None:
    """Ray's `worker_process_setup_hook` for drivers that join a running cluster: before any task runs, Ray
    Data's console goes to WARNING (pipeline/ray_data_logging.yaml, found next to this module on the
    worker's own machine). Standard library only: every worker process of the job runs it."""
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml")))


def init_ray(verbose: bool = False) -> None:
    """Join the cluster this job was submitted to (`ray job submit`, RAY_ADDRESS, `ray start`), or
    start a local one on this machine with its dashboard on 127.0.0.1. `verbose`: every library log line
    on the console (otherwise Ray's INFO lines stay in its log files)."""
    import ray

    if verbose:
        os.environ[VERBOSE] = "1"
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):  # starting Ray here: its workers inherit this
        for key, value in {**LOCAL_ENV, **({} if verbose else QUIET_LOCAL_ENV)}.items():
            os.environ.setdefault(key, value)
    quiet_libraries()
    if ray.is_initialized():
        return
    runtime_env = None
    if os.environ.get("RAY_ADDRESS") and not submitted_job() and not verbose:
        # A driver joining a running cluster directly (not `ray job submit`, whose runtime env does this):
        # its workers get the same quiet console as those of a Ray started here.
        runtime_env = {"worker_process_setup_hook": "pipeline.runtime.quiet_worker",
                       "env_vars": {"PYTHONWARNINGS": QUIET_LOCAL_ENV["PYTHONWARNINGS"], "TOKENIZERS_PARALLELISM": "false"}}
    ray.init(logging_config=None if verbose else ray.LoggingConfig(log_level="WARNING"), runtime_env=runtime_env)
    res = ray.cluster_resources()
    print(f"ray: connected to a cluster with {res.get('CPU', 0):g} CPUs and {res.get('GPU', 0):g} GPUs",
          file=sys.stderr, flush=True)


def submitted_job() -> bool:
    """True inside a `ray job submit` entrypoint (Ray's job supervisor sets this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def output_dir(path: str | os.PathLike):
    """Where a job writes its result files. A relative path inside a submitted job would land in the
    job's temporary working dir (deleted with it): there it is placed under $MTL_HOME/results instead,
    and said so."""
    from pathlib import Path

    from pipeline.model.refs import HOME
    out = Path(path).expanduser()
    if not out.is_absolute() and submitted_job():
        out = HOME / "results" / out
        print(f"results go to {out} (a relative --out inside a submitted job is placed under $MTL_HOME/results)",
              file=sys.stderr, flush=True)
    return out


def default_storage() -> str:
    """Where runs live unless configured: $MTL_HOME/runs (train.storage_path's default)."""
    from pipeline.model.refs import HOME
    return str(HOME / "runs")


def job_parser(doc: str, *, command: list[str] | None = None) -> argparse.ArgumentParser:
    """Parser with the shared `--config` and `key=value` overrides; the job's docstring is the help text.
    `command`: choices of a leading positional (e.g. which benchmark)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if command:
        parser.add_argument("name", choices=command, help="which one to run")
    parser.add_argument("--config", default=os.path.join("jobs", "configs", "default.yaml"),
                        help="YAML config (default: %(default)s)")
    parser.add_argument("--verbose", action="store_true",
                        help="show library logs too (Ray Data, Ray Train, DeepSpeed, transformers); they always go to "
                             "Ray's log files under /tmp/ray/session_latest/logs")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, values parsed as YAML: model.max_length=64 tasks.sst2.weight=2")
    return parser
