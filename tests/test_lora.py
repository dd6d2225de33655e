"""Per-task LoRA adapters on a frozen tiny-llama through Ray Train + DeepSpeed, 2 workers: classification,
regression and summarization all learn; only adapters and heads change (the final model's base digest is
the reference's); checkpoints hold no frozen weight; a run resumes; the export bundle and a merged task
reproduce the engine's dev predictions. ZeRO-3 (frozen base sharded) in the default tier, ZeRO-0 in the slow one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import mlflow_uri
from test_export import _check_same

from pipeline.config import load_config
from pipeline.train.driver import train_driver

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("ray_session")
TASKS = ("{rotten_tomatoes: {max_rows: {train: 256, validation: 32}}, stsb: {max_rows: {train: 256, validation: 32}}, "
         "xsum: {max_rows: {train: 256, validation: 8}}}")


def _cfg(tmp: Path, cache_dir: Path, glue_dir: Path, stage: int, steps: int):
    return load_config(None, [
        "name=lora", "model.name=tiny-llama", "model.max_length=48", "model.max_target_length=12", f"tasks={TASKS}",
        f"data.glue_dir={glue_dir}", "model.adapter={r: 8, alpha: 16, dropout: 0.0, per_task: true}",
        "train.num_workers=2", "train.cpus_per_worker=0.5", f"train.zero_stage={stage}", f"train.steps={steps}",
        "train.batch_size=16", "train.lr=1e-2", "train.warmup_steps=0", "train.log_every=4", "train.eval_every=20",
        "train.checkpoint_every=20", "train.eval_batch_size=16", f"train.storage_path={tmp / 'runs'}",
        f"tracking.uri={mlflow_uri(tmp)}", f"data.cache_dir={cache_dir}"])


def _history(cfg, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient
    return sorted((m.step, m.value) for m in MlflowClient(cfg.tracking.uri).get_metric_history(run_id, key))


@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow), 3])
def test_lora_trains_adapters_and_heads_only_resumes_and_exports(stage, tmp_path, cache_dir, glue_dir):
    from pipeline.model.multitask import base_backbone, base_digest

    first = train_driver(_cfg(tmp_path, cache_dir, glue_dir, stage, 20), log=lambda _: None)
    assert first.steps == 20
    cfg = _cfg(tmp_path, cache_dir, glue_dir, stage, 40)
    result = train_driver(cfg, resume=True, log=lambda _: None)  # the same run, continued from its step-20 checkpoint
    assert result.steps == 40 and result.run_id == first.run_id and result.run_dir == first.run_dir

    for task in ("rotten_tomatoes", "stsb", "xsum"):  # every task kind learns through its own adapter
        losses = [v for _, v in _history(cfg, result.run_id, f"loss/{task}")]
        third = len(losses) // 3
        assert third and sum(losses[-third:]) / third < sum(losses[:third]) / third, (task, losses)

    run = Path(result.run_dir)
    meta = json.loads((run / "final_model" / "mtl_model.json").read_text())
    assert meta["adapters"] == ["rotten_tomatoes", "stsb", "xsum"] and meta["base"] == "tiny-llama"
    assert not (run / "final_model" / "backbone").exists()
    # The frozen base left training bit for bit as its reference builds it: only adapters and heads moved.
    reference = base_backbone("tiny-llama")
    assert meta["base_sha256"] == base_digest(reference.state_dict())

    # Checkpoints hold what trains (adapters, heads, their optimizer state), not the frozen base.
    base_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    (ckpt_step, ckpt_bytes), *_ = _history(cfg, result.run_id, "checkpoint/bytes")[-1:]
    assert ckpt_step == 40 and 0 < ckpt_bytes < base_bytes / 2, (ckpt_bytes, base_bytes)
    trainable = _history(cfg, result.run_id, "memory/trainable_params")[-1][1]
    assert 0 < trainable < _history(cfg, result.run_id, "memory/psi")[-1][1] / 10

    engine = json.loads((run / "final_model" / "dev_predictions.json").read_text())
    _check_same(run / "final_model", cfg, engine)  # the bundle, reloaded in this process (base from its reference)
    export = [sys.executable, "jobs/export.py", "--run", result.run_dir]
    out = subprocess.run([*export, "--out", str(tmp_path / "bundle")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    _check_same(tmp_path / "bundle", cfg, engine)  # consolidated from the checkpoint
    for task in ("rotten_tomatoes", "xsum"):  # one task merged into a plain model
        out = subprocess.run([*export, "--merge", task, "--out", str(tmp_path / f"merged-{task}")], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert (tmp_path / f"merged-{task}" / "backbone" / "config.json").is_file()
        _check_same(tmp_path / f"merged-{task}", cfg, {task: engine[task]})
