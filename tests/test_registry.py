"""The model registry with a real MLflow store: register a trained run's model as a pyfunc, move
aliases, reload `models:/NAME@champion` in a fresh process (same dev predictions and metrics as the
run logged), and serve it with `mlflow models serve` over REST."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import mlflow_uri, serve_predictions

from pipeline.data.preprocess import prepare_tasks

ROOT = Path(__file__).resolve().parents[1]
NAME = "mtl-tiny"


def _register(result, tmp, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/register.py", "--run", result.run_dir, "--name", NAME,
                           "--tracking-uri", f"{mlflow_uri(tmp)}", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def registered(zero3_run):
    """final_model registered twice: version 1 (alias champion), version 2 (alias challenger)."""
    cfg, result, tmp = zero3_run
    first = _register(result, tmp, "--which", "final_model", "--alias", "champion")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _register(result, tmp, "--which", "final_model")
    assert second.returncode == 0, second.stderr[-3000:]
    return cfg, result, tmp


def _dev_frame(cfg) -> tuple[list[dict], dict]:
    """The run's dev rows as raw text (what a user would send), task by task, in the run's order."""
    prepared = prepare_tasks(cfg, log=lambda _: None)
    records, spans = [], {}
    for task in cfg.tasks:
        rows = prepared[task].table("validation", limit=cfg.tasks[task].max_rows["validation"], shuffle_seed=cfg.seed,
                                    columns=["text", "text_pair"]).to_pylist()
        spans[task] = (len(records), len(records) + len(rows))
        records += [{"task": task, "text": r["text"], "text_pair": r["text_pair"] or ""} for r in rows]
    return records, spans


def test_aliases_move_between_versions(registered):
    from mlflow import MlflowClient
    _, result, tmp = registered
    client = MlflowClient(f"{mlflow_uri(tmp)}")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    challenger = client.get_model_version_by_alias(NAME, "challenger")
    assert str(challenger.version) == "2" and challenger.run_id == result.run_id
    assert challenger.tags["run_name"] == result.run_name and challenger.tags["step"] == "10"
    out = _register(result, tmp, "--promote", "2")
    assert out.returncode == 0 and "version 1 -> 2" in out.stdout, out.stderr[-2000:]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    out = _register(result, tmp, "--promote", "1")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    missing = _register(result, tmp, "--promote", "9")
    assert missing.returncode == 2 and missing.stderr.startswith(f"--promote: {NAME} has no version 9")


def test_champion_in_a_fresh_process_reproduces_the_run(registered):
    """Load by alias in a new interpreter, send the dev rows as text, get the engine's predictions back
    (fp32, same rows, same batch composition via eval_world) and the run's logged metrics within 1e-6 —
    running the code the model ships (inference modules only), not this checkout's."""
    from mlflow import MlflowClient

    from pipeline.eval.metrics import task_metrics
    cfg, result, tmp = registered
    records, spans = _dev_frame(cfg)
    uri = f"{mlflow_uri(tmp)}"
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({uri!r})\n"
        f"model = mlflow.pyfunc.load_model('models:/{NAME}@champion')\n"
        "records, spans = json.load(sys.stdin)\n"
        "frame = pd.DataFrame(records)\n"
        "out = {}\n"
        "for task, (a, b) in spans.items():\n"
        "    p = model.predict(frame.iloc[a:b], params={'eval_world': 2, 'batch_size': 16})\n"
        "    out[task] = p[['label_id', 'score', 'summary']].astype(object).where(p.notna(), None).to_dict('list')\n"
        "import pipeline, pathlib\n"
        "root = pathlib.Path(pipeline.__file__).parent\n"
        "out['_code'] = [str(root), sorted(str(p.relative_to(root)) for p in root.rglob('*.py'))]\n"
        "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps([records, spans]), cwd=tmp,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    from pipeline.registry import INFERENCE_FILES
    shipped_root, shipped = got.pop("_code")
    assert not shipped_root.startswith(str(ROOT)) and Path(shipped_root).parent.name == "code", shipped_root
    assert shipped == sorted(INFERENCE_FILES) and not any(f.startswith(("train/", "benchmarks/", "baselines/")) for f in shipped)

    engine = json.loads((Path(result.run_dir) / "final_model" / "dev_predictions.json").read_text())
    client = MlflowClient(f"{mlflow_uri(tmp)}")
    specs = cfg.task_specs()
    for task, logged in engine.items():
        preds = got[task]["summary"] if specs[task].kind == "summarization" else got[task]["label_id"]
        assert preds == logged["predictions"], task
        ours = task_metrics(specs[task], preds, logged["references"])
        for metric, value in ours.items():
            history = client.get_metric_history(result.run_id, f"dev/{task}/{metric}")
            assert abs(history[-1].value - value) <= 1e-6, (task, metric)


def test_mlflow_models_serve_answers_a_rest_request(registered):
    _, result, tmp = registered
    rows = serve_predictions(f"models:/{NAME}@champion", mlflow_uri(tmp), [
        {"task": "rotten_tomatoes", "text": "a warm, funny film", "text_pair": ""},
        {"task": "bbc_news", "text": "Shares fell after the bank raised rates.", "text_pair": ""},
        {"task": "xsum", "text": "The council said the bridge would close for repairs next week.", "text_pair": ""}], tmp)
    assert [r["task"] for r in rows] == ["rotten_tomatoes", "bbc_news", "xsum"]
    assert rows[0]["label_id"] in (0, 1) and rows[1]["label"] in ("business", "entertainment", "politics", "sports", "tech")
    assert isinstance(rows[2]["summary"], str) and rows[0].get("summary") is None
