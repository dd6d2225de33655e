"""How a training run that stops early tells its user what happened and how to continue.

Two ways a run ends before its last step, both leaving it resumable (`--resume RUN`):
- an evaluation metric raises: every rank checkpoints that step with its evaluation pending, rank 0 writes
  `<run dir>/failure.json` (step, task, metric, error) and the workers end normally; the driver turns
  the record into one `PipelineError` line (exit 2: the config must change) and marks the MLflow run FAILED;
- anything else (a worker process dies past `train.max_failures`, an exception in the loop): the driver
  writes the traceback to `<run dir>/failure.log` and raises `RunFailed`, whose message is one line:
  what died, the step of the last checkpoint, and the exact command that continues the run.
"""

from __future__ import annotations

import json
import shlex
import traceback

from pipeline import storage
from pipeline.train.rundir import FAILURE_LOG, FAILURE_RECORD, RunDir


class RunFailed(RuntimeError):
    """A training run stopped by a fault; the message is one line with the --resume command."""


def write_failure(run_dir: str, record: dict) -> None:
    storage.write_text(storage.join(run_dir, FAILURE_RECORD), json.dumps(record, indent=2))


def take_failure(run_dir: str) -> dict | None:
    """The record a worker left for this attempt (then removed, so a resumed run starts clean)."""
    path = storage.join(run_dir, FAILURE_RECORD)
    if not storage.is_file(path):
        return None
    record = json.loads(storage.read_text(path))
    storage.remove(path)
    return record


def clear_failure(run_dir: str) -> None:
    path = storage.join(run_dir, FAILURE_RECORD)
    if storage.is_file(path):
        storage.remove(path)


def last_checkpoint_step(run_dir: str) -> int | None:
    """The step of the newest `step_*` checkpoint folder of the run (what `--resume` starts from)."""
    steps = RunDir(run_dir).checkpoint_steps()
    return max(steps) if steps else None


def resume_command(config_path: str | None, run_name: str, overrides: list[str] | None = None) -> str:
    parts = ["python", "jobs/train.py", "--config", config_path or "<your config>", "--resume", run_name]
    return shlex.join(parts + list(overrides or []))


def what_died(err: BaseException) -> str:
    """One line on the cause: the failing worker(s) and their error, not the whole traceback."""
    failures = getattr(err, "worker_failures", None)  # Ray Train's WorkerGroupError: {rank: exception}
    if failures:  # a dead process first: its peers' errors ("Connection reset by peer") are consequences
        rank, first = sorted(failures.items(), key=lambda kv: ("ActorDied" not in type(kv[1]).__name__
                                                               and "ActorError" not in type(kv[1]).__name__, kv[0]))[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        return f"training worker rank {rank} failed{more}: {_first_line(first)}"
    cause = err.__cause__ or err
    return _first_line(cause)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # Ray wraps causes in long banners; the last "SomeError: ..." line names the real one.
    named = [line for line in lines if ": " in line and line.split(":", 1)[0].replace(".", "").isidentifier()
             and line.split(":", 1)[0].split(".")[-1][:1].isupper()]
    text = (named[-1] if named else lines[0] if lines else "") [:300]
    return f"{type(err).__name__}: {text}" if text and not text.startswith(type(err).__name__) else text or type(err).__name__


def log_failure(run_dir: str, err: BaseException) -> str:
    """The full traceback into `<run dir>/failure.log`; returns that path."""
    path = storage.join(run_dir, FAILURE_LOG)
    try:
        storage.write_text(path, "".join(traceback.format_exception(err)))
    except Exception:  # noqa: BLE001 - the storage may be what failed; the one-line message still goes out
        return "(could not write the traceback to the run folder)"
    return path
