"""Process set-up shared by the jobs: connect to (or start) Ray, and argument parsing."""

from __future__ import annotations

import argparse
import os
import sys


LOCAL_ENV = {
    "TOKENIZERS_PARALLELISM": "false",  # Ray workers already use every core
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",  # worker start can exceed the 60 s default on small machines
}


def init_ray() -> None:
    """Join the cluster this job was submitted to (`ray job submit`, RAY_ADDRESS, `ray start`), or
    start a local one on this machine with its dashboard on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS"):  # starting Ray here: its workers inherit this environment
        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)
    ray.init()
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
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, values parsed as YAML: model.max_length=64 tasks.sst2.weight=2")
    return parser
