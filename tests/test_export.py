"""ZeRO-3 models leave training as ordinary folders: the gathered final model and a checkpoint
consolidated afterwards both reload in a plain process and reproduce the engine's dev predictions
(fp32, same rows, same batch composition: predictions equal, metrics within 1e-6)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.preprocess import prepare_tasks
from pipeline.eval.metrics import task_metrics
from pipeline.eval.predict import Predictor
from pipeline.train.driver import dev_rows

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("ray_session")


def _check_same(folder: Path, cfg, engine: dict):
    predictor = Predictor(folder)
    prepared = prepare_tasks(cfg, log=lambda _: None)
    specs = cfg.task_specs()
    for task, logged in engine.items():
        rows = dev_rows(prepared[task], cfg.tasks[task].max_rows["validation"], cfg.data.dev_seed)
        assert rows.get("label", rows.get("target")) == logged["references"]  # the same rows, in the same order
        # the batches the two evaluation ranks formed: rank r took rows r, r+2, ...
        preds = predictor.predict_ids(task, rows, cfg.train.eval_batch_size, world=cfg.train.num_workers)
        assert preds == logged["predictions"], task
        ours = task_metrics(specs[task], preds, logged["references"])
        theirs = task_metrics(specs[task], logged["predictions"], logged["references"])
        assert all(abs(ours[m] - theirs[m]) <= 1e-6 for m in ours)


def test_gathered_final_model_reproduces_the_engine(zero3_run):
    cfg, result, _ = zero3_run
    folder = Path(result.run_dir) / "final_model"
    engine = json.loads((folder / "dev_predictions.json").read_text())
    assert set(engine) == {"rotten_tomatoes", "bbc_news", "xsum"} and len(engine["bbc_news"]["predictions"]) == 45
    _check_same(folder, cfg, engine)


def test_export_consolidates_a_zero3_checkpoint(zero3_run):
    cfg, result, tmp = zero3_run
    assert len(list((Path(result.run_dir) / "step_0000010" / "ds").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    out = subprocess.run([sys.executable, "jobs/export.py", "--run", result.run_dir, "--out", str(tmp / "exported")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    engine = json.loads((Path(result.run_dir) / "final_model" / "dev_predictions.json").read_text())
    _check_same(tmp / "exported", cfg, engine)
    meta = json.loads((tmp / "exported" / "mtl_model.json").read_text())
    assert meta["step"] == 10 and meta["run_id"] == result.run_id


def test_export_names_what_is_missing(tmp_path):
    out = subprocess.run([sys.executable, "jobs/export.py", "--run", str(tmp_path), "--out", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith(f"{tmp_path}: no checkpoint — choose one of: none")
