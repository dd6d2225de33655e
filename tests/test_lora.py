"""Per-task LoRA adapters on a frozen tiny-llama through Ray Train + DeepSpeed, 2 workers: classification,
regression and summarization all learn; only adapters and heads change (the final model's base digest is
the reference's); checkpoints hold no frozen weight; a run resumes; the export bundle and a merged task
reproduce the engine's dev predictions; the registered bundle is served over REST. ZeRO-3 (frozen base
sharded, gradcos weighting on the heads' input) in the default tier; resuming (at ZeRO 3 and 0) and the REST check in the slow one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import mlflow_uri, serve_predictions
from test_export import _check_same

from pipeline.config import load_config
from pipeline.train.driver import train_driver

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))  # the jobs' main(), called in process
pytestmark = pytest.mark.usefixtures("ray_session")
TASKS = ("{rotten_tomatoes: {max_rows: {train: 256, validation: 32}}, stsb: {max_rows: {train: 256, validation: 32}}, "
         "xsum: {max_rows: {train: 256, validation: 8}}}")


def _cfg(tmp: Path, cache_dir: Path, glue_dir: Path, stage: int, steps: int, weighting: str = "static"):
    return load_config(None, [
        "name=lora", "model.name=tiny-llama", "model.max_target_length=12", f"tasks={TASKS}", f"train.weighting={weighting}",
        f"data.glue_dir={glue_dir}", "model.adapter={r: 8, alpha: 16, dropout: 0.0, per_task: true}",
        "train.num_workers=2", "train.cpus_per_worker=0.5", f"train.zero_stage={stage}", f"train.steps={steps}",
        "train.batch_size=16", "train.lr=1e-2", "train.warmup_steps=0", "train.log_every=4", "train.eval_every=40",
        "train.checkpoint_every=40", "train.eval_batch_size=16", f"train.storage_path={tmp / 'runs'}",
        f"tracking.uri={mlflow_uri(tmp)}", f"data.cache_dir={cache_dir}"])


def _history(cfg, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient
    return sorted((m.step, m.value) for m in MlflowClient(cfg.tracking.uri).get_metric_history(run_id, key))


# (ZeRO stage, resumed, weighting): the default tier trains ZeRO-3 (frozen base sharded) straight through with
# gradcos (per-task adapters share no parameter: it compares gradients on the heads' input); the slow tier
# also stops runs at step 20 and resumes them (frozen base rebuilt from its reference), at ZeRO 3 and 0.
CASES = [pytest.param((3, False, "gradcos"), id="zero3"),
         pytest.param((3, True, "static"), id="zero3-resumed", marks=pytest.mark.slow),
         pytest.param((0, True, "static"), id="zero0-resumed", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=CASES)
def lora_run(request, tmp_path_factory, cache_dir, glue_dir):
    """40 steps, straight or as 20 steps resumed to 40: (config, first result, final result, temp folder). A run
    evaluates and checkpoints at its last step, so the resumed case still has a step-20 checkpoint."""
    stage, resumed, weighting = request.param
    tmp = tmp_path_factory.mktemp(f"lora{stage}")
    first = train_driver(_cfg(tmp, cache_dir, glue_dir, stage, 20, weighting), log=lambda _: None) if resumed else None
    cfg = _cfg(tmp, cache_dir, glue_dir, stage, 40, weighting)
    return cfg, first, train_driver(cfg, resume=resumed, log=lambda _: None), tmp


def test_lora_trains_adapters_and_heads_only_and_exports(lora_run):
    from pipeline.model.multitask import base_backbone, base_digest

    cfg, first, result, tmp_path = lora_run
    assert result.steps == 40
    if first is not None:  # resumed: the same run and MLflow run continued from the step-20 checkpoint
        assert first.steps == 20 and result.run_id == first.run_id and result.run_dir == first.run_dir
        assert [s for s, _ in _history(cfg, result.run_id, "dev/score")] == [20, 40]

    for task in ("rotten_tomatoes", "stsb", "xsum"):  # every task kind learns through its own adapter
        losses = [v for _, v in _history(cfg, result.run_id, f"loss/{task}")]
        third = len(losses) // 3
        assert third and sum(losses[-third:]) / third < sum(losses[:third]) / third, (task, losses)
        if cfg.train.weighting == "gradcos":  # weights moved by the cosines of the heads' input gradients
            assert any(abs(v - 1.0) > 1e-3 for _, v in _history(cfg, result.run_id, f"weight/{task}")), task

    run = Path(result.run_dir)
    meta = json.loads((run / "final_model" / "mtl_model.json").read_text())
    assert meta["adapters"] == ["rotten_tomatoes", "stsb", "xsum"] and meta["base"] == "tiny-llama"
    assert not (run / "final_model" / "backbone").exists()
    # The frozen base left training bit for bit as its reference builds it: only adapters and heads moved.
    reference = base_backbone("tiny-llama")
    assert meta["base_sha256"] == base_digest(reference.state_dict())

    # Checkpoints hold what trains (adapters, heads, their optimizer state), not the frozen base.
    base_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    ckpt_step, ckpt_bytes = _history(cfg, result.run_id, "checkpoint/bytes")[-1]
    assert ckpt_step == 40 and 0 < ckpt_bytes < base_bytes / 2, (ckpt_bytes, base_bytes)
    trainable = _history(cfg, result.run_id, "memory/trainable_params")[-1][1]
    assert 0 < trainable < _history(cfg, result.run_id, "memory/psi")[-1][1] / 10

    engine = json.loads((run / "final_model" / "dev_predictions.json").read_text())
    _check_same(run / "final_model", cfg, engine)  # the bundle, reloaded in this process (base from its reference)
    import export  # jobs/export.py, in process
    assert export.main(["--run", result.run_dir, "--out", str(tmp_path / "bundle")]) == 0
    _check_same(tmp_path / "bundle", cfg, engine)  # consolidated from the step-40 checkpoint
    for task in ("rotten_tomatoes", "xsum"):  # one task merged into a plain model
        assert export.main(["--run", result.run_dir, "--merge", task, "--out", str(tmp_path / f"merged-{task}")]) == 0
        assert (tmp_path / f"merged-{task}" / "backbone" / "config.json").is_file()
        _check_same(tmp_path / f"merged-{task}", cfg, {task: engine[task]})


@pytest.mark.slow  # default tier: bundles reload through the pyfunc's loader (above, tests/test_adapters.py) and a
# full model is served over REST (tests/test_registry.py)
def test_registered_bundle_is_tagged_and_served_over_rest(lora_run):
    """The final model registered as a bundle (base by reference, adapters, heads), tagged with its tasks and
    adapter sizes beside the full model's size, then served by `mlflow models serve` for every task."""
    from mlflow.tracking import MlflowClient

    cfg, _, result, tmp = lora_run
    uri = cfg.tracking.uri
    out = subprocess.run([sys.executable, "jobs/register.py", "--run", result.run_dir, "--name", "lora-tiny",
                          "--which", "final_model", "--alias", "champion", "--tracking-uri", uri],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    version = MlflowClient(uri).get_model_version_by_alias("lora-tiny", "champion")
    tags = version.tags
    assert tags["base"] == "tiny-llama" and tags["adapters"] == "rotten_tomatoes,stsb,xsum" and tags["adapter.r"] == "8"
    assert all(int(tags[f"adapter_params.{t}"]) > 0 for t in ("rotten_tomatoes", "stsb", "xsum"))
    assert int(tags["artifact_bytes"]) < int(tags["full_model_bytes"]) / 2, tags  # the bundle does not carry the base

    rows = serve_predictions("models:/lora-tiny@champion", uri, [
        {"task": "rotten_tomatoes", "text": "a warm, funny film", "text_pair": ""},
        {"task": "stsb", "text": "A man is playing a guitar.", "text_pair": "A man plays the guitar."},
        {"task": "xsum", "text": "The council said the bridge would close for repairs next week.", "text_pair": ""}], tmp)
    assert [r["task"] for r in rows] == ["rotten_tomatoes", "stsb", "xsum"]
    assert rows[0]["label_id"] in (0, 1) and isinstance(rows[1]["score"], float)
    assert isinstance(rows[2]["summary"], str) and rows[0].get("summary") is None


@pytest.mark.slow  # default tier: LoRA in fp32 with static weights (above); bf16 and FAMO each with full fine-tuning
def test_lora_in_bf16_with_famo_weighting_and_a_shared_adapter(tmp_path, cache_dir, glue_dir):
    """A bf16 engine (frozen base included) with one shared adapter and FAMO's loss-based weights, at ZeRO-2:
    the weights move, the losses fall, the base stays untouched."""
    from pipeline.model.multitask import base_backbone, base_digest

    cfg = load_config(None, ["name=lora", "model.name=tiny-llama", "model.max_target_length=12", f"tasks={TASKS}",
                             f"data.glue_dir={glue_dir}", "model.adapter={r: 8, alpha: 16, dropout: 0.0, per_task: false}",
                             "train.num_workers=2", "train.cpus_per_worker=0.5", "train.zero_stage=2", "train.steps=40",
                             "train.precision=bf16", "train.weighting=famo", "train.weighting_options={lr: 0.2}",
                             "train.batch_size=16", "train.lr=1e-2", "train.warmup_steps=0", "train.log_every=4",
                             "train.eval_every=40", "train.checkpoint_every=40", f"train.storage_path={tmp_path / 'runs'}",
                             f"tracking.uri={mlflow_uri(tmp_path)}", f"data.cache_dir={cache_dir}"])
    result = train_driver(cfg, log=lambda _: None)
    assert result.steps == 40
    for task in ("rotten_tomatoes", "stsb", "xsum"):
        losses = [v for _, v in _history(cfg, result.run_id, f"loss/{task}")]
        third = len(losses) // 3
        assert third and sum(losses[-third:]) / third < sum(losses[:third]) / third, (task, losses)
        assert any(abs(v - 1.0) > 1e-3 for _, v in _history(cfg, result.run_id, f"weight/{task}")), task
    meta = json.loads((Path(result.run_dir) / "final_model" / "mtl_model.json").read_text())
    assert meta["adapters"] == ["shared"]
    # the base went through bf16 and back: compared in bf16, it is the reference's base
    reference = {k: v.bfloat16().float() for k, v in base_backbone("tiny-llama").state_dict().items()}
    assert meta["base_sha256"] == base_digest(reference)
