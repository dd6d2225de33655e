"""MLflow, owned by the driver (DESIGN.md): the driver creates or resumes the run and passes its id
to the workers; rank 0 logs into that run id; other ranks never touch MLflow.

A tracking outage is loud but not fatal: metrics that fail to send are kept and sent with the next
batch, and training goes on — unless `tracking.required` is set, in which case an unreachable
server stops the job before training starts.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from pipeline.train.rundir import SPOOL  # in the run folder: metrics the server never received

SECRET_KEY = re.compile(r"(?i)(token|password|passwd|secret|api_?key|access_?key|credential)s?$")
MAX_PENDING = 200_000  # metrics kept while the server is away


def tracking_uri(configured: str | None) -> str:
    """Configured URI, else $MLFLOW_TRACKING_URI, else an absolute sqlite file in the working dir
    (absolute, so Ray workers with another working directory log into the same store). A URI with
    credentials in it is refused: it would end up in logs, params and run.json."""
    from pipeline.config import CREDENTIALS_IN_URI, credentials_problem
    from pipeline.errors import PipelineError
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri and CREDENTIALS_IN_URI.match(uri):
        raise PipelineError(credentials_problem("tracking.uri" if configured else "$MLFLOW_TRACKING_URI"))
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def redact(tree: Any) -> Any:
    """A copy of a config tree with the values of secret-looking keys replaced by "***" (for the config
    copies a run keeps: run.json, the resolved_config.json artifact)."""
    if isinstance(tree, Mapping):
        return {k: "***" if SECRET_KEY.search(str(k)) else redact(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    return tree


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted params from a nested config; secret-looking keys are left out entirely."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if SECRET_KEY.search(str(key)):
            continue
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, f"{dotted}."))
        else:
            out[dotted] = str(value)[:6000]
    return out


def warn(message: str) -> None:
    print(f"\n!!! MLflow: {message}\n", file=sys.stderr, flush=True)


def check_reachable(uri: str, timeout_s: float = 10.0) -> str | None:
    """None when the tracking store answers, else the reason."""
    from mlflow.tracking import MlflowClient
    fast = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s))}
    saved = {k: os.environ.get(k) for k in fast}
    os.environ.update(fast)  # fail in seconds, not minutes; restored below for everything else
    try:
        MlflowClient(uri).search_experiments(max_results=1)
        return None
    except Exception as err:  # any failure means "not usable"; the reason is shown to the user
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go. For a sqlite store: a folder beside the database file,
    so artifacts follow the store instead of landing in the creating process's working directory
    (a submitted job's or Tune trial's temporary one). Servers and other stores: None (their default,
    e.g. the server's --artifacts-destination)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):]).expanduser()
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (db.resolve().parent / "mlruns" / folder).as_uri()


def experiment_id(client, name: str, uri: str) -> str:
    """The id of experiment `name`, created (with `artifact_location`) when missing."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri, name))


def open_tracking(uri: str, required: bool, doing: str = "training"):
    """An MlflowClient on `uri`, or None (with a loud warning) when the store cannot be reached; with
    `required` an unreachable store is an error instead."""
    from pipeline.errors import PipelineError
    reason = check_reachable(uri)
    if reason:
        if required:
            raise PipelineError.one("tracking.uri", f"MLflow at {uri} cannot be reached ({reason})",
                                    "start the tracking server, fix tracking.uri, or set tracking.required=false")
        warn(f"{uri} cannot be reached ({reason}); {doing} without tracking")
        return None
    from mlflow.tracking import MlflowClient
    return MlflowClient(uri)




class RunLogger:
    """Rank 0's handle on the driver's run: metrics by step, kept across tracking outages.

    A failed send keeps the metrics (with their steps and timestamps) and training goes on. While the
    server is away, sending is retried at most every `retry_s` seconds and each attempt fails fast (no
    MLflow retries with backoff, which would stall the step for minutes): an outage costs training one
    quick failed request per interval. When the server answers again, everything kept is sent in
    order. `flush_or_spool()` (at checkpoints and at the end) writes what the server still refuses to
    `<run dir>/tracking_spool.jsonl`, which the driver sends (`replay_spool`) once the server answers."""

    def __init__(self, uri: str | None, run_id: str | None, run_dir: str | None = None, retry_s: float = 15.0):
        self.run_id, self.run_dir, self.retry_s = run_id, run_dir, retry_s
        self.client = None
        self.pending: list = []
        self.tags: dict[str, str] = {}
        self.failures = 0
        self.next_try = 0.0
        if uri and run_id:
            from mlflow.tracking import MlflowClient
            # This process (a training worker) talks to MLflow through this object only.
            os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
            self.client = MlflowClient(uri)

    def set_tag(self, key: str, value: str) -> None:
        if self.client is not None:
            self.tags[key] = value
            self.flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.pending = self.pending[-MAX_PENDING:]
        if time.monotonic() >= self.next_try:
            self.flush()

    def flush(self) -> bool:
        """Send everything kept; True when nothing is left."""
        from mlflow.entities import RunTag
        try:
            if self.tags:
                self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in self.tags.items()])
                self.tags = {}
            while self.pending:  # in MLflow's batch size; what was sent is dropped at once
                self.client.log_batch(self.run_id, metrics=self.pending[:1000])
                self.pending = self.pending[1000:]
            if self.failures:
                warn(f"tracking is back after {self.failures} failed attempts; the buffered metrics were sent")
            self.failures = 0
            return True
        except Exception as err:
            self.failures += 1
            self.next_try = time.monotonic() + self.retry_s
            if self.failures == 1 or self.failures % 20 == 0:
                warn(f"cannot log to run {self.run_id} ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                     f"training goes on, {len(self.pending)} metrics kept, next attempt in {self.retry_s:g}s")
            return False

    def flush_or_spool(self) -> None:
        """Send what is kept; what the server still refuses goes to the run folder's spool (called at
        every checkpoint and at the end, so metrics up to a checkpoint survive a worker's death)."""
        if self.client is None or self.flush() or not self.run_dir:
            return
        from pipeline import storage
        lines = [json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step})
                 for m in self.pending]
        spool = storage.join(self.run_dir, SPOOL)
        previous = storage.read_text(spool) if storage.is_file(spool) else ""
        storage.write_text(spool, previous + "".join(line + "\n" for line in lines))
        self.pending = []
        warn(f"{len(lines)} metrics the server did not take are kept in {spool}; they are sent when the run ends "
             "or is resumed with the server up")


def replay_spool(client, run_id: str, run_dir: str) -> int:
    """Send the metrics a worker could not deliver (`RunLogger.close`) and delete the spool; the number sent."""
    from mlflow.entities import Metric

    from pipeline import storage
    spool = storage.join(run_dir, SPOOL)
    if not storage.is_file(spool):
        return 0
    metrics = [Metric(**json.loads(line)) for line in storage.read_text(spool).splitlines() if line.strip()]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    storage.remove(spool)
    return len(metrics)
