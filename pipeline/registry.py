"""The multi-task model as an MLflow pyfunc, and the model registry around it.

    info = log_pyfunc(run_id, "runs/mtl-default-1a2b/best_model")        # the tracking URI must be set
    version = register(client, info.model_uri, "mtl-default", alias="challenger", tags={...})
    promote(client, "mtl-default", version.version, "champion")        # moves the alias
    mlflow.pyfunc.load_model("models:/mtl-default@champion").predict(df)

The logged model carries only the inference code (INFERENCE_FILES: the model, tokenization, prediction
and task catalogue modules), not the training, tuning, benchmark or baseline code.

The pyfunc's input is a DataFrame of (task, text, text_pair); its output has one row per input:
`label` (class name), `label_id`, `score` (regression) and `summary` (summarization), each empty
where the task does not produce it. Params: `batch_size`, `num_beams`, and `eval_world` (form the
batches that many evaluation ranks formed, to reproduce a run's dev predictions exactly).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import mlflow.pyfunc
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.model.multitask import MODEL_META

PACKAGE_DIR = Path(__file__).resolve().parent
# What `Predictor` and this module import (checked by tests/test_registry.py, which loads the logged model in a
# fresh process with only this code): the package as the pyfunc ships it.
INFERENCE_FILES = ["__init__.py", "errors.py", "registry.py", "data/__init__.py", "data/tokenize.py",
                   "eval/__init__.py", "eval/predict.py", "model/__init__.py", "model/adapters.py", "model/multitask.py",
                   "model/refs.py",
                   "model/summarize.py", "tasks/__init__.py", "tasks/catalogue.py", "tasks/spec.py"]
ARTIFACT = "mtl_model"
PARAMS = {"batch_size": 32, "num_beams": 1, "eval_world": 1}
# What a serving environment needs (pinned like the project; inference never needs Ray or DeepSpeed).
REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "safetensors", "tokenizers", "pandas", "numpy",
                "pyarrow", "mlflow==3.17.2"]
ADAPTER_REQUIREMENTS = ["peft==0.21.2"]  # an adapter bundle also needs its base: a hub id, a path or a packaged model


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
    from pipeline.eval.predict import read_meta
    meta = read_meta(folder)
    requirements = REQUIREMENTS + (ADAPTER_REQUIREMENTS + base_requirements(meta["base"]) if meta.get("adapter") else [])
    with tempfile.TemporaryDirectory(prefix="mtl-pyfunc-") as tmp, mlflow.start_run(run_id=run_id, log_system_metrics=False):
        return mlflow.pyfunc.log_model(
            name=name, python_model=MultiTaskPyfunc(), artifacts={ARTIFACT: str(folder)},
            code_paths=[str(inference_package(Path(tmp)))], signature=signature, input_example=input_example(folder),
            pip_requirements=requirements)


def base_requirements(base: str) -> list[str]:
    """The package a packaged base model comes in (a bundle refers to its base instead of carrying it)."""
    from pipeline.model.refs import PACKAGED
    return [PACKAGED[base]] if base in PACKAGED else []


def folder_bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def inference_package(into: Path) -> Path:
    """A copy of the `pipeline` package holding only INFERENCE_FILES, under `into`; its path."""
    root = into / "pipeline"
    for name in INFERENCE_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACKAGE_DIR / name, root / name)
    return root


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
    if meta.get("adapter"):  # a bundle: the base by reference, the adapters and their sizes
        tags.update({"base": meta["base"], "adapter.kind": meta["adapter"]["kind"], "adapter.r": meta["adapter"]["r"],
                     "adapters": ",".join(meta["adapters"]),
                     **{f"adapter_params.{n}": c for n, c in meta.get("adapter_params", {}).items()},
                     **{f"adapter_bytes.{n}": b for n, b in meta.get("adapter_bytes", {}).items()}})
    return tags


def register_run_model(client, run_dir: str | Path, name: str, *, which: str = "best_model",
                       alias: str | None = "challenger", extra_tags: dict[str, Any] | None = None):
    """Log `<run_dir>/<which>` as a pyfunc model of the run's MLflow run and register it as a new
    version of `name` (tagged with the run's dev metrics); returns (model info, version)."""
    from pipeline import storage
    from pipeline.train.rundir import RUN_RECORD
    run = json.loads(storage.read_text(storage.join(run_dir, RUN_RECORD)))
    with storage.local_copy(storage.join(run_dir, which)) as folder:  # run storage may be an object store
        meta = json.loads((folder / MODEL_META).read_text())
        info = log_pyfunc(run["run_id"], folder)
        sizes = {"artifact_bytes": folder_bytes(folder)}
        if meta.get("adapter"):  # beside it, what the full model would weigh: the base's weights plus the heads
            from pipeline.model.multitask import base_backbone
            base = sum(p.numel() * p.element_size() for p in base_backbone(meta["base"]).parameters())
            sizes["full_model_bytes"] = base + (folder / "heads.safetensors").stat().st_size
    version = register(client, info.model_uri, name, alias=alias,
                       tags={**model_tags(run, which, meta), **sizes, **(extra_tags or {})},
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


def load_predictor(model_uri: str, tracking_uri: str | None = None):
    """A Predictor from a registry or run model URI (`models:/name@alias`, `runs:/id/model`)."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().predictor


def model_run_id(uri: str, reference: str) -> str | None:
    """The MLflow run a `runs:/` or `models:/` reference's model was logged from (None when unknown)."""
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    if not reference.startswith("models:/"):
        return reference.split("/")[1] if reference.startswith("runs:/") else None
    name, _, rest = reference[len("models:/"):].partition("@")
    try:
        version = (client.get_model_version_by_alias(name, rest) if rest else
                   client.get_model_version(*reference[len("models:/"):].split("/", 1)))
        return version.run_id
    except Exception:
        return None


def registry_client(uri: str, flag: str = "--tracking-uri"):
    """A client on a reachable registry (the fluent API pointed at it too), else an exit-2 error naming `flag`."""
    from mlflow import MlflowClient

    from pipeline.tracking import check_reachable
    reason = check_reachable(uri)
    if reason:
        raise PipelineError.one(flag, f"MLflow at {uri} cannot be reached ({reason})",
                                "start the tracking server or pass the right --tracking-uri")
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def promote_version(client, name: str, version: str, alias: str) -> str | None:
    """Point `alias` at an existing version (refused, naming --promote, when there is no such version);
    the version it pointed at before."""
    try:
        client.get_model_version(name, version)
    except Exception:
        raise PipelineError.one("--promote", f"{name} has no version {version}",
                                "list versions in the MLflow UI or with MlflowClient().search_model_versions()") from None
    return promote(client, name, version, alias)


def register_finished_run(client, run_dir: str, name: str, *, which: str = "best_model", alias: str = "challenger",
                          promote_if_better: bool = False, log: Callable[[str], None] = print):
    """Register a run folder's model (checked first: a model is there, the run was tracked); with
    `promote_if_better` also make it `champion` when its dev score beats the current champion's.
    Returns (model info, version)."""
    from pipeline import storage
    from pipeline.train.rundir import RUN_RECORD
    run = json.loads(storage.read_text(storage.join(run_dir, RUN_RECORD)))
    folder = storage.join(run_dir, which)
    if not storage.is_file(storage.join(folder, MODEL_META)):
        raise PipelineError.one("--which", f"{folder} holds no model yet", "register a finished run, or --which final_model")
    if not run.get("run_id"):
        raise PipelineError.one("--run", f"{run['run_name']} was trained without MLflow tracking",
                                "retrain with tracking, or log the folder yourself with pipeline.registry.log_pyfunc")
    meta = json.loads(storage.read_text(storage.join(folder, MODEL_META)))
    log(f"logging {folder} as a pyfunc model of MLflow run {run['run_id']} ...")
    info, version = register_run_model(client, run_dir, name, which=which, alias=alias)
    log(f"registered {name} version {version.version} ({info.model_uri}); alias {alias}")
    if promote_if_better:
        try:
            champion = client.get_model_version_by_alias(name, "champion")
            best = float(champion.tags.get("score", "nan"))
        except Exception:
            champion, best = None, float("-inf")
        mine = float(meta.get("score", "nan"))
        if mine > best or (champion is not None and best != best):
            promote(client, name, version.version, "champion")
            log(f"{name}@champion -> version {version.version} (dev score {mine:.2f} > {best:.2f})")
        else:
            log(f"champion stays at version {champion.version} (dev score {best:.2f} >= {mine:.2f})")
    return info, version
