"""Evaluation and batch inference on real data: the evaluation job reproduces a run's logged dev
metrics and records itself in MLflow; GLUE test predictions come out in the benchmark's submission
format; Ray Data batch inference over a few hundred rows matches the plain predictor."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import mlflow_uri

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))
pytestmark = pytest.mark.usefixtures("ray_session")


def test_evaluate_job_reproduces_the_runs_dev_metrics_and_logs_them(zero3_run, tmp_path, capsys):
    import evaluate as job
    from mlflow import MlflowClient

    cfg, result, tmp = zero3_run
    uri = f"{mlflow_uri(tmp)}"
    assert job.main(["--model", result.run_dir, "--out", str(tmp_path / "out"), "--tracking-uri", uri]) == 0
    best = json.loads((Path(result.run_dir) / "best_model" / "mtl_model.json").read_text())
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    got = {r["task"]: r["metrics"] for r in payload["results"]}
    assert set(got) == set(best["per_task"]) == {"rotten_tomatoes", "bbc_news", "xsum"}
    for task, metrics in best["per_task"].items():
        assert got[task].keys() == metrics.keys()
        assert all(abs(got[task][m] - v) <= 1e-6 for m, v in metrics.items()), task
    assert abs(payload["score"] - best["score"]) <= 1e-6
    assert "| rotten_tomatoes | validation | 50 | accuracy |" in (tmp_path / "out" / "results.md").read_text()

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_run(result.run_id).info.experiment_id],
                              f"tags.`mtl.evaluates_run` = '{result.run_id}'")
    assert len(runs) == 1
    logged = runs[0].data.metrics
    assert abs(logged["validation/bbc_news/accuracy"] - best["per_task"]["bbc_news"]["accuracy"]) <= 1e-6
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} >= {"results.md", "results.json"}


def test_evaluate_names_a_bad_model_reference(tmp_path, capsys):
    import evaluate as job
    assert job.main(["--model", str(tmp_path / "nothing"), "--no-mlflow"]) == 2
    assert "is not a model folder (mtl_model.json), a run folder (run.json)" in capsys.readouterr().err


def test_glue_test_predictions_in_submission_format(glue_dir, tmp_path):
    """An (untrained) tiny model with SST-2-style, STS-B and RTE heads: the files have GLUE's names, a
    header, one line per test row in index order, and values of the right type (ints, clipped floats,
    label names for the NLI tasks)."""
    import evaluate as job
    from transformers import AutoTokenizer

    from pipeline.model.multitask import Head, build_model
    model = build_model("tiny-bert", [Head("mrpc", "classification", 2), Head("stsb", "regression", 1),
                                      Head("rte", "classification", 2)])
    from pipeline.model.refs import load_tokenizer
    folder = model.save(tmp_path / "model", load_tokenizer("tiny-bert"), metadata={"model": "tiny-bert", "max_length": 128})
    assert AutoTokenizer.from_pretrained(folder / "tokenizer")
    config = tmp_path / "glue.yaml"
    # its own cache: test_preprocess checks that the session cache builds these tasks fresh
    config.write_text(f"name: g\nmodel: {{name: tiny-bert}}\ndata: {{glue_dir: {glue_dir}, cache_dir: {tmp_path / 'cache'}}}\n"
                      "tasks: {mrpc: {}, stsb: {}, rte: {}}\n")
    out = tmp_path / "glue"
    assert job.main(["--model", str(folder), "--config", str(config), "--splits", "test", "--glue-submission", str(out),
                     "--out", str(tmp_path / "res"), "--no-mlflow"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["MRPC.tsv", "RTE.tsv", "STS-B.tsv"]
    for fname, check in [("MRPC.tsv", lambda v: v in ("0", "1")), ("STS-B.tsv", lambda v: 0.0 <= float(v) <= 5.0),
                         ("RTE.tsv", lambda v: v in ("entailment", "not_entailment"))]:
        lines = (out / fname).read_text().splitlines()
        assert lines[0] == "index\tprediction"
        source = fname.removesuffix(".tsv")
        with open(glue_dir / source / "test.tsv", newline="") as fh:
            indices = [row["index"] for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]
        rows = [line.split("\t") for line in lines[1:]]
        assert [r[0] for r in rows] == sorted(indices, key=int), fname
        assert all(len(r) == 2 and check(r[1]) for r in rows), fname


def test_batch_inference_with_ray_data_matches_the_predictor(zero3_run, tmp_path):
    import predict as job

    from pipeline.data.preprocess import prepare_tasks
    from pipeline.eval.predict import Predictor

    cfg, result, _ = zero3_run
    texts = prepare_tasks(cfg, log=lambda _: None)["rotten_tomatoes"].table("train", limit=300, columns=["text"])["text"].to_pylist()
    pd.DataFrame({"review": texts}).to_csv(tmp_path / "reviews.csv", index=False)
    # The run by name in a storage URI (as on a cluster): each replica copies the model folder down itself.
    storage = Path(result.run_dir).parent.as_uri()
    assert job.main(["--model", result.run_name, "--storage-path", storage, "--task", "rotten_tomatoes",
                     "--input", str(tmp_path / "reviews.csv"), "--text-column", "review", "--out", str(tmp_path / "preds"),
                     "--batch-size", "32"]) == 0
    got = pd.read_parquet(tmp_path / "preds")
    assert len(got) == 300 and set(got.columns) >= {"text", "task", "label", "label_id", "score", "summary"}
    expected = Predictor(Path(result.run_dir) / "best_model").predict_text("rotten_tomatoes", texts, batch_size=32)
    assert dict(zip(got["text"], got["label_id"])) == dict(zip(texts, expected))


def test_evaluate_a_zero3_checkpoint_directly(zero3_run, tmp_path):
    """A sharded checkpoint is consolidated on the fly; at the run's last step it scores what the run logged."""
    import evaluate as job

    _, result, _ = zero3_run
    assert job.main(["--model", f"{result.run_dir}/step_0000010", "--tasks", "rotten_tomatoes,bbc_news",
                     "--out", str(tmp_path), "--no-mlflow"]) == 0
    got = {r["task"]: r["metrics"] for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    for task in ("rotten_tomatoes", "bbc_news"):
        assert all(abs(got[task][m] - v) <= 1e-6 for m, v in result.dev_metrics[task].items()), task
