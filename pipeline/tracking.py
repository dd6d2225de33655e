"""Every MLflow run's lifecycle, in one place: training runs (`TrainingRun`, created or resumed by the
driver, which passes the id to the workers; rank 0 logs into it through `RunLogger`; other ranks never
touch MLflow), Tune experiments (`TuneParent`: one parent run, one nested child per trial), evaluation
runs (`log_evaluation`), the comparison's runs (`log_baseline_run`, `log_comparison`) and what reads them
back (`metric_history`). The model registry is pipeline/registry.py. jobs/ make no MLflow calls.

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

from pipeline.train.rundir import BEST_MODEL, FINAL_MODEL, SPOOL, RunDir  # SPOOL: metrics the server never took

MODEL_ARTIFACT_S = "end/model_artifact_s"  # the final model's upload to the run's artifacts, after the workers end
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


def log_params(client, run_id: str, params: Mapping[str, str]) -> None:
    """Params in MLflow's batch size (100 per request)."""
    from mlflow.entities import Param
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def _quietly(action, *args) -> None:
    """For the end of a failed run: the original error matters more than a tracking server that is away."""
    try:
        action(*args)
    except Exception:  # noqa: BLE001
        pass


class TrainingRun:
    """The driver's MLflow run of one training run: created (or resumed, RUNNING again), described at the
    start (params, data sources, config), finished (spooled metrics, final model, FINISHED) or failed
    (a one-line `mtl.failure` tag, FAILED or KILLED). With tracking unreachable and not required, every
    method does nothing and `run_id` is None."""

    def __init__(self, client, run_id: str | None):
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, cfg, run_name: str, previous: dict | None, uri: str, parent_run_id: str | None = None) -> "TrainingRun":
        client = open_tracking(uri, cfg.tracking.required)
        if client is None:
            return cls(None, None)
        if previous and previous.get("run_id"):
            client.update_run(previous["run_id"], status="RUNNING")
            return cls(client, previous["run_id"])
        tags = {"mtl.run_name": run_name}
        if parent_run_id:  # a Tune trial: nested under the experiment's parent run
            tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id(client, cfg.tracking.experiment or cfg.name, uri), run_name=run_name, tags=tags)
        return cls(client, run.info.run_id)

    def describe(self, cfg, prepared: Mapping, weights: Mapping[str, float], ratios: Mapping[str, float],
                 config_path: str | None, run_dir: str) -> None:
        """Params (the flattened config, normalised weights and ratios), each task's data source and cache key
        as tags and dataset inputs, the config file and the resolved config (secrets redacted)."""
        if self.client is None:
            return
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag, RunTag

        from pipeline.config import config_to_dict
        client, run_id = self.client, self.run_id
        params = flatten_params(config_to_dict(cfg))
        params.update({f"weight.{t}": f"{w:.6g}" for t, w in weights.items()})
        params.update({f"ratio.{t}": f"{r:.6g}" for t, r in ratios.items()})
        log_params(client, run_id, params)
        tags = [RunTag("mtl.run_dir", run_dir)]
        inputs = []
        for name, task in prepared.items():
            tags += [RunTag(f"data.{name}.source", task.manifest["source"][:5000]),
                     RunTag(f"data.{name}.cache_key", task.manifest["key"])]
            with warnings.catch_warnings():  # "can be interpreted in multiple ways": both readings are the local folder
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(str(task.path))
            dataset = MetaDataset(source, name=name, digest=task.manifest["key"])
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "train")]))
        client.log_batch(run_id, tags=tags)
        log_inputs(client, run_id, inputs)
        if config_path:
            client.log_artifact(run_id, config_path, "config")
        client.log_text(run_id, json.dumps(redact(config_to_dict(cfg)), indent=2), "config/resolved_config.json")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """The driver's own measurements (start-up and end times); never fails the run."""
        if self.client is not None and metrics:
            import time

            from mlflow.entities import Metric
            now = int(time.time() * 1000)
            _quietly(self.client.log_batch, self.run_id, [Metric(k, float(v), now, step) for k, v in metrics.items()])

    def finish(self, run_dir: str, log, step: int | None = None) -> None:
        """Metrics a worker could not deliver, the final model, FINISHED. The training result is safe in
        `run_dir` whatever happens here: if the server is away, say what did not reach it and how to send it.
        `step`: log the model upload's seconds (`end/model_artifact_s`, a fixed cost of every run) at it."""
        if self.client is None:
            return
        from pipeline import storage
        from pipeline.train.failure import resume_command
        client, run_id = self.client, self.run_id
        try:
            sent = replay_spool(client, run_id, run_dir)
            if sent:
                log(f"sent {sent} metrics kept during a tracking outage")
            final = RunDir(run_dir).model(FINAL_MODEL)
            if storage.is_dir(final):
                began = time.time()
                with storage.local_copy(final) as folder:
                    client.log_artifacts(run_id, str(folder), "model")
                if step is not None:
                    client.log_metric(run_id, MODEL_ARTIFACT_S, time.time() - began, step=step)
            client.set_tag(run_id, "mtl.best_model", RunDir(run_dir).model(BEST_MODEL))
            client.set_terminated(run_id, status="FINISHED")
        except Exception as err:  # the server went away at the very end
            warn(f"the run finished but MLflow could not be updated ({type(err).__name__}: {str(err).splitlines()[0][:160]}): "
                 f"its models are in {run_dir}; run `{resume_command(None, RunDir(run_dir).name)}` with the server up "
                 "to send the kept metrics and the model")

    def fail(self, status: str, line: str) -> None:
        """How the run ended, in one line (tag `mtl.failure`), and its status (FAILED or KILLED)."""
        if self.client is not None:
            _quietly(self.client.set_tag, self.run_id, "mtl.failure", line[:5000])
            _quietly(self.client.set_terminated, self.run_id, status)


def log_inputs(client, run_id: str, inputs: list, attempts: int = 3) -> None:
    """`client.log_inputs`, retried when a concurrent run registered the same dataset first: MLflow's SQL
    store looks the dataset up, then inserts it, so two Tune trials of one experiment starting together can
    both insert it and one fails on the table's unique key (measured in CI: a trial lost to it). The retry
    finds the dataset the other run inserted and links it."""
    from mlflow.exceptions import MlflowException
    for attempt in range(attempts):
        try:
            return client.log_inputs(run_id, datasets=inputs)
        except MlflowException as err:
            race = "UNIQUE constraint" in str(err) or "Duplicate entry" in str(err)
            if not race or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def read_run_text(uri: str, run_id: str, path: str) -> str | None:
    """A text artifact of a run (None when the run or the file is not there)."""
    import mlflow.artifacts
    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}", tracking_uri=uri)
    except Exception:
        return None


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric of a run, by step."""
    from mlflow.tracking import MlflowClient
    return [(m.step, m.value) for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


def run_metrics(uri: str, run_id: str) -> dict[str, float]:
    """The latest value of every metric of a run."""
    from mlflow.tracking import MlflowClient
    return dict(MlflowClient(uri).get_run(run_id).data.metrics)


def _standalone_run(client, experiment: str, run_name: str, tags: Mapping[str, str], metrics: list,
                    params: Mapping[str, str] | None = None, artifacts: list[tuple[Path, str | None]] = ()) -> str:
    """A run that starts and ends here (an evaluation, a baseline, a comparison): its id."""
    run_id = client.create_run(experiment, run_name=run_name, tags=dict(tags)).info.run_id
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    if params:
        log_params(client, run_id, params)
    for path, folder in artifacts:
        client.log_artifact(run_id, str(path), folder)
    client.set_terminated(run_id)
    return run_id


def log_evaluation(uri: str, reference: str, run_id: str | None, results, score: float, files: list[Path],
                   submission: list[Path] = ()) -> str | None:
    """An evaluation's MLflow run: in the evaluated run's experiment (else `evaluations`), tagged with the run
    it evaluates, with `<split>/<task>/<metric>` metrics and the result files; its id (None when the store is
    unreachable: the files are the record then)."""
    client = open_tracking(uri, required=False, doing=f"the evaluation (results in {files[0].parent})")
    if client is None:
        return None
    from mlflow.entities import Metric
    experiment = None
    if run_id:
        try:
            experiment = client.get_run(run_id).info.experiment_id
        except Exception:
            experiment = None
    experiment = experiment or experiment_id(client, "evaluations", uri)
    tags = {"mtl.kind": "evaluation", "mtl.model": reference}
    if run_id:
        tags["mtl.evaluates_run"] = run_id
    now = int(time.time() * 1000)
    metrics = [Metric(f"{r.split}/{r.task}/{m}", v, now, 0) for r in results for m, v in r.metrics.items()]
    if score == score:
        metrics.append(Metric("validation/score", score, now, 0))
    return _standalone_run(client, experiment, f"eval-{Path(reference).name}", tags, metrics,
                           artifacts=[(f, None) for f in files] + [(f, "glue_submission") for f in submission])


class ComparisonTracking:
    """The comparison job's runs: one per Bi-LSTM baseline, a loss plot on every trained model's run, and the
    comparison run with the table. `None`-safe: `open` returns None when the store is unreachable."""

    def __init__(self, client, experiment: str, uri: str):
        self.client, self.experiment, self.uri = client, experiment, uri

    @classmethod
    def open(cls, uri: str, required: bool, experiment: str) -> "ComparisonTracking | None":
        client = open_tracking(uri, required, doing="the Bi-LSTM baselines and the comparison")
        return None if client is None else cls(client, experiment_id(client, experiment, uri), uri)

    def baseline(self, task: str, steps: int, losses: list[tuple[int, float]], metrics: Mapping[str, float],
                 params: Mapping[str, str]) -> str:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        logged = [Metric(f"loss/{task}", v, now, s) for s, v in losses] + \
                 [Metric(f"dev/{task}/{m}", v, now, steps) for m, v in metrics.items()]
        return _standalone_run(self.client, self.experiment, f"bilstm-{task}",
                               {"mtl.kind": "baseline-bilstm", "mtl.task": task}, logged, params)

    def loss_curves(self, run_id: str) -> dict[str, list[tuple[int, float]]]:
        """Each task's training loss, (step, value) by step, as the run logged it."""
        return {k.removeprefix("loss/"): metric_history(self.uri, run_id, k)
                for k in sorted(run_metrics(self.uri, run_id)) if k.startswith("loss/") and k != "loss/total"}

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of one metric of a run, by step."""
        return metric_history(self.uri, run_id, key)

    def log_figure(self, run_id: str, figure, name: str) -> None:
        self.client.log_figure(run_id, figure, name)

    def comparison(self, name: str, files: list[Path], linked: Mapping[str, list[str]] | None = None) -> str:
        """The comparison run with its files; `linked` (row -> the MLflow runs of its models, every seed) is kept
        as `linked_runs.json`, and each linked run gets the tag `mtl.comparison` = this run's id."""
        run_id = _standalone_run(self.client, self.experiment, f"compare-{name}", {"mtl.kind": "comparison"}, [],
                                 artifacts=[(f, None) for f in files])
        if linked:
            self.client.log_dict(run_id, dict(linked), "linked_runs.json")
            from mlflow.exceptions import MlflowException
            missing = []
            for ids in linked.values():
                for linked_id in ids:
                    try:
                        self.client.set_tag(linked_id, "mtl.comparison", run_id)
                    except MlflowException:  # a model trained against another tracking store
                        missing.append(linked_id)
            if missing:
                print(f"warning: {len(missing)} linked model run(s) are not in {self.uri} (trained against another "
                      f"tracking store?), e.g. {missing[0]}: not tagged; linked_runs.json lists them",
                      file=sys.stderr, flush=True)
        return run_id


class TuneParent:
    """A Tune experiment's parent MLflow run (trials' runs are nested under it by `TrainingRun.open`):
    started with the spec as params, reopened on --resume, FAILED when the search raises, and at the end
    closed with the summary files, metrics, the best trial and what was registered. `None`-safe like
    `ComparisonTracking`: `start` and `reopen` return None when the store is unreachable."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def start(cls, uri: str, required: bool, name: str, params: Mapping[str, str], base_config: dict) -> "TuneParent | None":
        client = open_tracking(uri, required, "tuning")
        if client is None:
            return None
        run_id = client.create_run(experiment_id(client, name, uri), run_name=name, tags={"mtl.kind": "tune"}).info.run_id
        log_params(client, run_id, params)
        client.log_text(run_id, json.dumps(base_config, indent=2), "config/base_config.json")
        return cls(client, run_id)

    @classmethod
    def reopen(cls, uri: str, required: bool, run_id: str | None, *, resume: bool = True) -> "TuneParent | None":
        """The parent run again: on --resume (RUNNING again; an unreachable store warns, or stops the job
        when required) or to write the summary (None, quietly, when the store is unreachable)."""
        if not run_id:
            return None
        if resume:
            client = open_tracking(uri, required, "tuning")
        else:
            from mlflow.tracking import MlflowClient
            client = None if check_reachable(uri) else MlflowClient(uri)
        if client is None:
            return None
        if resume:
            client.update_run(run_id, status="RUNNING")
        return cls(client, run_id)

    def failed(self) -> None:
        _quietly(self.client.set_terminated, self.run_id, "FAILED")

    def children(self) -> dict[str, Any]:
        """The trials' runs by their run name."""
        experiment = self.client.get_run(self.run_id).info.experiment_id
        runs = self.client.search_runs([experiment], f"tags.mlflow.parentRunId = '{self.run_id}'", max_results=10000)
        return {run.data.tags.get("mtl.run_name"): run for run in runs}

    def close_child(self, child, status: str, end_time: float | None = None) -> None:
        """A trial the scheduler stopped is KILLED (its driver may have marked it FAILED), an errored one FAILED;
        a finished trial whose run Tune stopped right after its last result, before it closed, FINISHED. `end_time`
        (epoch seconds: the trial's last result) is when such a run ended, not when the experiment closes it, so
        its MLflow duration is the trial's."""
        end_ms = int(end_time * 1000) if end_time else None
        if status != "finished":
            self.client.set_tag(child.info.run_id, "mtl.tune_status", status)
            self.client.set_terminated(child.info.run_id, status="KILLED" if status.startswith("stopped") else "FAILED",
                                       end_time=end_ms)
        elif child.info.status == "RUNNING":
            self.client.set_terminated(child.info.run_id, status="FINISHED", end_time=end_ms)

    def finish(self, files: list[Path], metrics: Mapping[str, float], tags: Mapping[str, str]) -> None:
        for path in files:
            self.client.log_artifact(self.run_id, str(path), "tune")
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, value)
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        self.client.set_terminated(self.run_id, status="FINISHED")


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
    """Send the metrics a worker could not deliver (`RunLogger.flush_or_spool`) and delete the spool; the number sent."""
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
