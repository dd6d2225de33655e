"""The multi-task model as an MLflow pyfunc, and the model registry around it.

    info = log_pyfunc(client, run_id, "runs/mtl-default-1a2b/best_model")
    version = register(client, info.model_uri, "mtl-default", alias="challenger", tags={...})
    promote(client, "mtl-default", version.version, "champion")        # moves the alias
    mlflow.pyfunc.load_model("models:/mtl-default@champion").predict(df)

The pyfunc's input is a DataFrame of (task, text, text_pair); its output has one row per input:
`label` (class name), `label_id`, `score` (regression) and `summary` (summarization), each empty
where the task does not produce it. Params: `batch_size`, `num_beams`, and `eval_world` (form the
batches that many evaluation ranks formed, to reproduce a run's dev predictions exactly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from pipeline.train.rundir import MODEL_META, RUN_RECORD

PACKAGE_DIR = Path(__file__).resolve().parent
ARTIFACT = "mtl_model"
PARAMS = {"batch_size": 32, "num_beams": 1, "eval_world": 1}
# What a serving environment needs (pinned like the project; inference never needs Ray or DeepSpeed).
REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "safetensors", "tokenizers", "pandas", "numpy",
                "pyarrow", "mlflow==3.17.2"]


class MultiTaskPyfunc(mlflow.pyfunc.PythonModel):
    """Routes each input row to its task's head or decoder; rows of one task are predicted together."""

    def load_context(self, context) -> None:
        from pipeline.eval.predict import Predictor
        self.predictor = Predictor(context.artifacts[ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from pipeline.eval.predict import predict_frame
        return predict_frame(self.predictor, pd.DataFrame(model_input), {**PARAMS, **(params or {})})


def input_example(folder: str | Path) -> pd.DataFrame:
    from pipeline.eval.predict import read_meta
    tasks = [h["task"] for h in read_meta(folder)["heads"]]
    return pd.DataFrame({"task": tasks, "text": ["An example input for this task."] * len(tasks),
                         "text_pair": [""] * len(tasks)})


def log_pyfunc(run_id: str, folder: str | Path, name: str = "model"):
    """Log the model folder as a pyfunc model of run `run_id` (the tracking URI must be set)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "task"), ColSpec("string", "text"), ColSpec("string", "text_pair", required=False)]),
        outputs=Schema([ColSpec("string", "task"), ColSpec("string", "label", required=False), ColSpec("long", "label_id"),
                        ColSpec("double", "score", required=False), ColSpec("string", "summary", required=False)]),
        params=ParamSchema([ParamSpec(k, "long", v) for k, v in PARAMS.items()]))
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        return mlflow.pyfunc.log_model(
            name=name, python_model=MultiTaskPyfunc(), artifacts={ARTIFACT: str(folder)},
            code_paths=[str(PACKAGE_DIR)], signature=signature, input_example=input_example(folder),
            pip_requirements=REQUIREMENTS)


def register(client, model_uri: str, name: str, *, alias: str | None = None, tags: dict[str, Any] | None = None,
             description: str | None = None):
    """A new version of registered model `name` (created if needed), tagged, optionally aliased."""
    import mlflow
    from mlflow.exceptions import MlflowException
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Multi-task model: one backbone, a head or decoder per task.")
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()})
    if description:
        client.update_model_version(name, version.version, description=description)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return version


def model_tags(run: dict[str, Any], which: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Version tags of a run's model folder: where it came from and its dev metrics."""
    tags = {"run_name": run["run_name"], "which": which, "step": meta.get("step"), "model": meta.get("model")}
    if "score" in meta:
        tags["score"] = f"{meta['score']:.6g}"
    for task, metrics in meta.get("per_task", {}).items():
        tags.update({f"dev.{task}.{m}": f"{v:.6g}" for m, v in metrics.items()})
    return tags


def register_run_model(client, run_dir: str | Path, name: str, *, which: str = "best_model",
                       alias: str | None = "challenger", extra_tags: dict[str, Any] | None = None):
    """Log `<run_dir>/<which>` as a pyfunc model of the run's MLflow run and register it as a new
    version of `name` (tagged with the run's dev metrics); returns (model info, version)."""
    import json

    from pipeline import storage
    run = json.loads(storage.read_text(storage.join(run_dir, RUN_RECORD)))
    with storage.local_copy(storage.join(run_dir, which)) as folder:  # run storage may be an object store
        meta = json.loads((folder / MODEL_META).read_text())
        info = log_pyfunc(run["run_id"], folder)
    version = register(client, info.model_uri, name, alias=alias, tags={**model_tags(run, which, meta), **(extra_tags or {})},
                       description=f"{run['run_name']} {which} (step {meta.get('step')})")
    return info, version


def promote(client, name: str, version: str | int, alias: str = "champion") -> str | None:
    """Point `alias` at `version`; returns the version it pointed at before (None if it was unset)."""
    from mlflow.exceptions import MlflowException
    try:
        previous = client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        previous = None
    client.set_registered_model_alias(name, alias, str(version))
    return previous


def load_predictor(uri: str):
    """A Predictor from a registry or run model URI (`models:/name@alias`, `runs:/id/model`)."""
    return mlflow.pyfunc.load_model(uri).unwrap_python_model().predictor
