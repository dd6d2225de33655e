"""Training on a real Ray cluster with real DeepSpeed engines and a real MLflow store (sqlite),
on two real tasks (Rotten Tomatoes, BBC News) with tiny 2-layer models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import mlflow_uri
import torch

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.model.multitask import Head, MultiTaskModel, build_model
from pipeline.train.driver import train_driver
from pipeline.train.mixing import TaskSampler

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("ray_session")
TASKS = "{rotten_tomatoes: {max_rows: {train: 512, validation: 96}}, bbc_news: {max_rows: {train: 512, validation: 96}}}"


def _cfg(tmp_path, cache_dir, *extra):
    return load_config(None, [
        "name=t", "model.name=tiny-bert", f"tasks={TASKS}", "sampling.strategy=temperature",
        "train.num_workers=2", "train.cpus_per_worker=0.5", "train.steps=30", "train.batch_size=16", "train.lr=2e-3",
        "train.log_every=3", "train.eval_every=15", "train.checkpoint_every=10", "train.keep_checkpoints=2",
        f"train.storage_path={tmp_path / 'runs'}", f"tracking.uri={mlflow_uri(tmp_path)}",
        f"data.cache_dir={cache_dir}", *extra])


def _history(cfg, run_id, key):
    from mlflow.tracking import MlflowClient
    return [(m.step, m.value) for m in sorted(MlflowClient(cfg.tracking.uri).get_metric_history(run_id, key),
                                              key=lambda m: m.step)]


def _initial_model(cfg):
    torch.manual_seed(cfg.seed)  # the workers build their model right after the same seeding
    return build_model(cfg.model.name, [Head("rotten_tomatoes", "classification", 2),
                                        Head("bbc_news", "classification", 5)], dropout=cfg.train.dropout)


# All three stages in the slow tier. The default tier trains two workers end to end at ZeRO-2 (the three-task test
# below, with these checks) and at ZeRO-3 (the run shared by the export, evaluation and registry tests), and
# checks every stage's gradients against plain PyTorch (tests/test_weighting.py).
@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_workers_train_checkpoint_and_track(tmp_path, cache_dir, stage):
    cfg = _cfg(tmp_path, cache_dir, f"train.zero_stage={stage}")
    result = train_driver(cfg, log=lambda _: None)
    assert result.steps == 30 and set(result.dev_metrics) == {"rotten_tomatoes", "bbc_news"}

    losses = [v for _, v in _history(cfg, result.run_id, "loss/total")]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses  # loss falls

    # Every head (and the backbone) moved away from its initialisation: each received gradient.
    trained, _, meta = MultiTaskModel.load(Path(result.run_dir) / "final_model")
    initial = _initial_model(cfg).state_dict()
    for name, tensor in trained.state_dict().items():
        if name.startswith("heads.") and name.endswith("weight"):
            assert not torch.allclose(tensor, initial[name]), f"{name} never changed"
    assert not torch.allclose(trained.state_dict()["backbone.encoder.layer.0.attention.self.query.weight"],
                              initial["backbone.encoder.layer.0.attention.self.query.weight"])
    assert meta["step"] == 30 and meta["run_id"] == result.run_id

    checkpoints = sorted(p.name for p in Path(result.run_dir).glob("step_*"))
    assert checkpoints == ["step_0000020", "step_0000030"]  # keep_checkpoints=2
    assert json.loads((Path(result.run_dir) / "step_0000030" / "meta.json").read_text())["step"] == 30
    best = json.loads((Path(result.run_dir) / "best_model" / "mtl_model.json").read_text())
    assert best["score"] == pytest.approx(result.best_score)

    from mlflow.tracking import MlflowClient
    run = MlflowClient(cfg.tracking.uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.zero_stage"] == str(stage) and run.data.params["weight.bbc_news"] == "1"
    assert {"dev/score", "dev/rotten_tomatoes/accuracy", "dev/bbc_news/macro_f1", "tokens_per_s",
            "loss/rotten_tomatoes", "loss/bbc_news"} <= set(run.data.metrics)
    artifacts = {a.path for a in MlflowClient(cfg.tracking.uri).list_artifacts(result.run_id, "model")}
    assert {"model/backbone", "model/heads.safetensors", "model/mtl_model.json", "model/tokenizer"} <= artifacts
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"rotten_tomatoes", "bbc_news"}


@pytest.mark.slow  # the default tier covers resume in tests/test_reliability.py (driver kill, corrupt-checkpoint fallback)
def test_resume_continues_at_the_saved_step_in_the_same_mlflow_run(tmp_path, cache_dir):
    first = train_driver(_cfg(tmp_path, cache_dir, "train.zero_stage=3", "train.steps=12", "train.checkpoint_every=6",
                              "train.log_every=1", "train.eval_every=6"), log=lambda _: None)
    cfg = _cfg(tmp_path, cache_dir, "train.zero_stage=3", "train.steps=18", "train.checkpoint_every=6",
               "train.log_every=1", "train.eval_every=6")
    began = time.monotonic()
    again = train_driver(cfg, resume=True, log=lambda _: None)
    attempt = time.monotonic() - began
    assert again.run_id == first.run_id and again.run_name == first.run_name and again.steps == 18
    # Its wall time counts the first attempt's workers up to the step-12 checkpoint it resumed from (no more
    # than the first attempt took in all), not only its own.
    assert attempt < again.wall_seconds < attempt + first.wall_seconds

    # Steps 1-12 logged by the first run, 13-18 by the resumed one: each exactly once.
    assert [s for s, _ in _history(cfg, again.run_id, "loss/total")] == list(range(1, 19))
    from mlflow.tracking import MlflowClient
    runs = MlflowClient(cfg.tracking.uri).search_runs([MlflowClient(cfg.tracking.uri).get_experiment_by_name("t").experiment_id])
    assert len(runs) == 1

    # The sampler continued its sequence: its state equals a fresh sampler's after 18 draws.
    meta = json.loads((Path(again.run_dir) / "step_0000018" / "meta.json").read_text())
    sampler_state = meta["sampler"]
    assert sampler_state["draws"] == 18
    # Rebuild the run's own ratios from its params to replay the sequence independently.
    params = MlflowClient(cfg.tracking.uri).get_run(again.run_id).data.params
    fresh = TaskSampler({t: float(params[f"ratio.{t}"]) for t in ("rotten_tomatoes", "bbc_news")}, seed=cfg.seed)
    for _ in range(18):
        fresh.next()
    assert fresh.state_dict()["rng"] == sampler_state["rng"]


def test_causal_lm_backbone_with_optimizer_offload(tmp_path, cache_dir):
    # the rows stream through Ray Data here (every other default-tier run hands its small splits over in
    # Ray's object store, `train.ingest: auto`)
    cfg = _cfg(tmp_path, cache_dir, "model.name=tiny-llama", "train.zero_stage=2", "train.offload_optimizer=true",
               "train.steps=20", "train.eval_every=20", "train.checkpoint_every=20", "train.ingest=streaming")
    result = train_driver(cfg, log=lambda _: None)
    losses = [v for _, v in _history(cfg, result.run_id, "loss/total")]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    trained, _, _ = MultiTaskModel.load(Path(result.run_dir) / "final_model")
    assert trained.kind == "causal"
    initial = _initial_model(cfg).state_dict()
    assert not torch.allclose(trained.state_dict()["heads.bbc_news.1.weight"], initial["heads.bbc_news.1.weight"])


def test_resources_the_cluster_can_never_give_fail_fast(tmp_path, cache_dir):
    with pytest.raises(PipelineError) as info:
        train_driver(_cfg(tmp_path, cache_dir, "train.num_workers=5", "train.cpus_per_worker=1"), log=lambda _: None)
    (line,) = [str(p) for p in info.value.problems]
    assert line.startswith("train.num_workers: 5 workers × 1 CPU = 5 CPUs, but the cluster has 2")


def test_unreachable_required_tracking_stops_before_training(tmp_path, cache_dir):
    cfg = _cfg(tmp_path, cache_dir, "tracking.uri=http://127.0.0.1:9", "tracking.required=true")
    with pytest.raises(PipelineError, match=r"tracking.uri: MLflow at http://127.0.0.1:9 cannot be reached"):
        train_driver(cfg, log=lambda _: None)
    assert not list((tmp_path / "runs").glob("*/step_*"))


def test_unreachable_optional_tracking_warns_and_trains(tmp_path, cache_dir, capfd):
    cfg = _cfg(tmp_path, cache_dir, "tracking.uri=http://127.0.0.1:9", "train.steps=4", "train.eval_every=4",
               "train.checkpoint_every=4", "train.log_every=2", "train.num_workers=1", "train.cpus_per_worker=1")
    result = train_driver(cfg, log=lambda _: None)
    assert result.run_id is None and result.steps == 4 and set(result.dev_metrics) == {"rotten_tomatoes", "bbc_news"}
    assert "MLflow: http://127.0.0.1:9 cannot be reached" in capfd.readouterr().err
    assert (Path(result.run_dir) / "final_model" / "mtl_model.json").is_file()


def test_benchmark_spreads_the_global_batch_over_its_processes():
    from pipeline.benchmarks.train import per_process
    cfg = load_config(ROOT / "jobs" / "configs" / "bench_train_short.yaml")  # 2 workers × 16 rows
    one, two = per_process(cfg, 1), per_process(cfg, 2, total_cpus=4.0)
    assert (one.train.num_workers, one.train.cpus_per_worker, one.train.batch_size) == (1, 2.0, 32)
    assert (two.train.num_workers, two.train.cpus_per_worker, two.train.batch_size) == (2, 2.0, 16)
    assert one.train.profile and two.train.profile and one.train.steps == cfg.train.steps


def test_benchmark_phase_times_per_1000_tokens():
    from pipeline.benchmarks.train import PHASES, ms_per_k_tokens
    per_k = ms_per_k_tokens({"phases_s": {"forward": 0.5, "comm": 0.1}, "measured_tokens": 2000})
    assert per_k == {**dict.fromkeys(PHASES, 0.0), "forward": 250.0, "comm": 50.0}  # 0.5 s over 2 × 1,000 tokens


@pytest.mark.slow  # a benchmark's own check; benchmarks are run by hand (jobs/benchmark.py) and their results committed
def test_train_benchmark_reports_both_sides(ray_session, tmp_path, cache_dir):
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [sys.executable, "jobs/benchmark.py", "train", "--config", "jobs/configs/bench_train.yaml", "--out", str(tmp_path),
           "--stages", "2", "--workers", "2", "--repeats", "2", "model.name=tiny-bert", "train.steps=12", "train.log_every=2",
           "train.warmup_steps=0", f"train.storage_path={tmp_path / 'runs'}", f"tracking.uri={mlflow_uri(tmp_path)}",
           f"data.cache_dir={cache_dir}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads((tmp_path / "train.json").read_text())
    (run,) = result["runs"]
    assert run["plain"]["tokens_per_s"] > 0 and run["job"]["tokens_per_s"] > 0 and run["zero_stage"] == 2
    assert result["placement"] == "PACK" and sum(result["ray_nodes_cpus"]) >= 2  # the cluster the job side ran on
    assert len(run["repeats"]) == 2  # the row's three sides ran twice; its ratios are medians with their range
    assert not list((tmp_path / "runs").iterdir())  # each job run's folder (checkpoint, models) is removed once read
    for key in ("ratio", "ray_ratio", "deepspeed_ratio"):
        values = [r[key] for r in run["repeats"]]
        assert run[key] == pytest.approx(sum(values) / 2) and run["range"][key] == [min(values), max(values)]
    for r in run["repeats"]:
        assert r["ratio"] == pytest.approx(r["job_tokens_per_s"] / r["plain_tokens_per_s"])
        assert r["ray_ratio"] * r["deepspeed_ratio"] == pytest.approx(r["ratio"])
    assert run["job"]["tokens_per_s"] in [r["job_tokens_per_s"] for r in run["repeats"]]
    assert len(run["job"]["windows"]) == 5 and len(run["plain"]["windows"]) == 5  # 6 windows, the warm-up one left out
    phases = run["job"]["phases_s"]
    # the profiled phases account for the measured training time (they are timed back to back)
    assert sum(phases[p] for p in ("data", "forward", "backward", "step", "other")) == pytest.approx(
        run["job"]["measured_s"], rel=0.02)
    assert 0 < phases["comm"] < phases["backward"] + phases["step"]  # ZeRO-2 reduce-scatters in backward
    assert run["job"]["memory"]["rank0/total"] > 0
    # the plain loop is timed per phase too, and both sides say how much of their cores they got
    assert all(run["plain"]["phases_s"][p] > 0 for p in ("forward", "backward", "step"))
    assert run["plain"]["measured_tokens"] > 0 and run["job"]["measured_tokens"] > 0
    assert 0 < run["plain"]["cpu_use"] and 0 < run["job"]["cpu_use"]
    native = run["torchrun"]  # the third side: the same loop under torchrun, no Ray
    assert native["tokens_per_s"] > 0 and len(native["windows"]) == 5
    assert native["task_steps"] == run["job"]["task_steps"]  # the same seeded task sequence on both sides
    fixed = run["job"]["startup_phases_s"]  # the job's fixed cost by phase, from its MLflow run
    assert fixed["startup/engine_s"] > 0 and "end/after_last_checkpoint_s" in fixed
    assert sum(fixed[f"startup/{k}_s"] for k in ("worker_process", "imports", "backend")) == pytest.approx(
        fixed["startup/worker_group_s"], abs=1e-3)
    md = (tmp_path / "train.md").read_text()
    assert "each ratio is to that run: 2 runs" in md  # every repeat's plain run is counted
    assert "The job's fixed cost by phase" in md and "| 2 | 2 | " in md.split("The job's fixed cost by phase")[1]
    low, high = run["range"]["ray_ratio"]
    assert f"**{run['ray_ratio']:.2f}×** ({low:.2f}–{high:.2f})" in md and "ran 2 times back to back" in md
    assert "job / torchrun (Ray)" in md and "| torchrun + DeepSpeed, 2 process(es), ZeRO-2 |" in md
    assert "job / plain" in md and "| plain PyTorch (run before the next row) |" in md and "CPU use" in md and (tmp_path / "RESULTS.md").read_text().count("## Benchmark: training throughput") == 1


def test_torchrun_side_runs_the_jobs_loop_without_ray(tmp_path, cache_dir):
    """The training benchmark's third side: torchrun starts 2 processes (gloo) that build the job's DeepSpeed
    engine and run its train_step and Window over their shares of the cached rows; the task sequence is the
    job's (the same TaskSampler), and every window is measured: tokens/s, phases, every sample of the 12 steps."""
    from pipeline.benchmarks.torchrun_side import launch
    from pipeline.data.preprocess import prepare_tasks
    from pipeline.train.driver import mixture, rows_used
    from pipeline.train.mixing import normalise_weights

    cfg = _cfg(tmp_path, cache_dir, "train.steps=12", "train.log_every=4", "train.warmup_steps=0", "train.profile=true")
    prepared = prepare_tasks(cfg, log=lambda _: None)
    rows = rows_used(cfg, prepared)
    out = launch(cfg, prepared, normalise_weights({t: 1.0 for t in rows}), timeout=600)
    sampler = TaskSampler(mixture(cfg, rows), cfg.seed)
    for _ in range(12):
        sampler.next()
    assert out["world"] == 2 and out["task_steps"] == sampler.counts
    windows = out["windows"]
    assert len(windows) == 3 and all(w["tokens_per_s"] > 0 for w in windows)
    assert all(w["time/forward"] > 0 and w["time/backward"] > 0 for w in windows)  # profiled, as the job's windows
    assert sum(w["samples_per_s"] * w["time/window"] for w in windows) == pytest.approx(12 * 2 * 16, rel=1e-6)  # every row
    assert {k for w in windows for k in w if k.startswith("loss/")} == {"loss/rotten_tomatoes", "loss/bbc_news", "loss/total"}


# tiny-llama in the slow tier: the causal-LM path is trained in the default tier by
# test_causal_lm_backbone_with_optimizer_offload and its summarization loss by tests/test_summarization.py.
@pytest.mark.parametrize("backbone", [pytest.param("tiny-llama", marks=pytest.mark.slow), "tiny-bert"])
def test_two_classification_tasks_and_xsum_all_learn(tmp_path, cache_dir, backbone):
    """Causal LM: summary through the LM head. Encoder: a task decoder with cross-attention. Two workers at
    ZeRO-2: every task's loss falls, every head moves, checkpoints rotate, MLflow holds the run and the model.
    Trained with FAMO weights and annealed + online sampling: weights and ratios move, both logged at every
    log step (weights sum to T, ratios to 1), and every rank drew the same tasks (else the collectives hang)."""
    tasks = ("{rotten_tomatoes: {max_rows: {train: 512, validation: 32}}, "
             "bbc_news: {max_rows: {train: 256, validation: 32}}, "
             "xsum: {max_rows: {train: 512, validation: 16}}}")
    cfg = _cfg(tmp_path, cache_dir, f"model.name={backbone}", f"tasks={tasks}", "sampling.strategy=annealed",
               "sampling.anneal_floor=0.0", "sampling.online=true", "sampling.online_eta=1.0",
               "train.weighting=famo", "train.weighting_options={lr: 0.2}",
               "model.max_target_length=24", "train.zero_stage=2", "train.steps=60", "train.log_every=3",
               "train.eval_every=30", "train.checkpoint_every=20", "train.lr=3e-3")
    result = train_driver(cfg, log=lambda _: None)
    assert result.steps == 60 and set(result.dev_metrics) == {"rotten_tomatoes", "bbc_news", "xsum"}
    for task in ("rotten_tomatoes", "bbc_news", "xsum"):
        losses = [v for _, v in _history(cfg, result.run_id, f"loss/{task}")]
        third = len(losses) // 3
        assert sum(losses[-third:]) / third < sum(losses[:third]) / third, (task, losses)
    assert set(result.dev_metrics["xsum"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    tasks3 = ("rotten_tomatoes", "bbc_news", "xsum")
    weights = {t: dict(_history(cfg, result.run_id, f"weight/{t}")) for t in tasks3}
    ratios = {t: dict(_history(cfg, result.run_id, f"ratio/{t}")) for t in tasks3}
    for step in range(3, 61, 3):  # both logged at every log step: FAMO's weights sum to T = 3, the ratios to 1
        assert sum(weights[t][step] for t in tasks3) == pytest.approx(3.0), (step, weights)
        assert sum(ratios[t][step] for t in tasks3) == pytest.approx(1.0), (step, ratios)
    assert any(abs(v - 1.0) > 1e-3 for t in tasks3 for v in weights[t].values()), weights  # FAMO moved them
    assert len({round(v, 6) for v in ratios["bbc_news"].values()}) > 3, ratios  # annealed + online moved them

    # Every classification head moved away from its initialisation: each received gradient.
    trained, _, meta = MultiTaskModel.load(Path(result.run_dir) / "final_model")
    assert meta["step"] == 60 and meta["run_id"] == result.run_id
    torch.manual_seed(cfg.seed)  # the workers build their model right after the same seeding
    initial = build_model(cfg.model.name, [Head("rotten_tomatoes", "classification", 2), Head("bbc_news", "classification", 5),
                                           Head("xsum", "summarization", 0)], dropout=cfg.train.dropout).state_dict()
    for name, tensor in trained.state_dict().items():
        if name.startswith(("heads.rotten_tomatoes", "heads.bbc_news")) and name.endswith("weight"):
            assert not torch.allclose(tensor, initial[name]), f"{name} never changed"

    assert sorted(p.name for p in Path(result.run_dir).glob("step_*")) == ["step_0000040", "step_0000060"]  # keep 2
    assert json.loads((Path(result.run_dir) / "step_0000060" / "meta.json").read_text())["step"] == 60
    best = json.loads((Path(result.run_dir) / "best_model" / "mtl_model.json").read_text())
    assert best["score"] == pytest.approx(result.best_score)
    from mlflow.tracking import MlflowClient
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.zero_stage"] == "2"
    assert {"dev/score", "dev/rotten_tomatoes/accuracy", "dev/bbc_news/macro_f1", "dev/xsum/rougeL", "tokens_per_s",
            "loss/xsum"} <= set(run.data.metrics)
    assert [s for s, _ in _history(cfg, result.run_id, "dev/score")] == [30, 60]
    for metric, value in result.dev_metrics["xsum"].items():  # the result is the last evaluation MLflow holds
        assert _history(cfg, result.run_id, f"dev/xsum/{metric}")[-1] == (60, pytest.approx(value)), metric
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "model")}
    assert {"model/backbone", "model/heads.safetensors", "model/mtl_model.json", "model/tokenizer"} <= artifacts
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"rotten_tomatoes", "bbc_news", "xsum"}
    # the fixed costs around the steps, each phase once: worker set-up at step 0, the driver's at the end
    startup = {k: _history(cfg, result.run_id, k) for k in run.data.metrics if k.startswith(("startup/", "end/"))}
    parts = {"startup/worker_process_s", "startup/imports_s", "startup/backend_s"}  # the worker group, split
    assert set(startup) == {"startup/driver_s", "startup/worker_group_s", "startup/tokenizer_s", "startup/engine_s",
                            "startup/restore_s", "startup/data_and_eval_s", "end/after_last_checkpoint_s",
                            "end/model_artifact_s"} | parts, startup
    from pipeline.train.loop import FIXED_COSTS, WORKER_GROUP_PARTS
    assert set(FIXED_COSTS) | set(WORKER_GROUP_PARTS) == set(startup)  # the benchmarks' lists name what runs log
    assert all(len(h) == 1 and h[0][1] >= 0 for h in startup.values()), startup
    assert startup["startup/engine_s"][0][0] == 0 and startup["end/after_last_checkpoint_s"][0][0] == 60
    assert startup["end/model_artifact_s"][0][0] == 60  # the final model's upload, after the workers ended
    # evaluations and checkpoints (two of each) in all: more than nothing, less than the run
    assert _history(cfg, result.run_id, "time/paused_total_s")[0][0] == 60
    assert 0 < run.data.metrics["time/paused_total_s"] < result.wall_seconds
    assert sum(startup[k][0][1] for k in parts) == pytest.approx(startup["startup/worker_group_s"][0][1], abs=1e-3)
    phases = sum(h[0][1] for k, h in startup.items() if k not in parts)
    assert phases < result.wall_seconds, (phases, result.wall_seconds)


def test_table_shard_reshuffles_every_epoch_in_full_batches():
    import numpy as np
    import pyarrow as pa

    from pipeline.train.loop import TableShard, batches_forever

    shard = TableShard(pa.table({"input_ids": [[i, 1, 2][: 1 + i % 3] for i in range(10)], "label": [i % 2 for i in range(10)]}))

    def epoch(seed):
        return [(list(int(r[0]) for r in b["input_ids"]), list(b["label"])) for b in shard.iter_batches(4, local_shuffle_seed=seed)]

    first = epoch(5)
    assert [len(ids) for ids, _ in first] == [4, 4]  # 10 rows: two full batches, the partial one dropped
    ids = [i for batch, _ in first for i in batch]
    assert len(set(ids)) == 8 and all(label == i % 2 for batch, labels in first for i, label in zip(batch, labels))
    assert epoch(5) == first and epoch(6) != first  # the epoch's seed sets the order
    batch = next(batches_forever(shard, 4, pad_id=0, seed=5))
    assert batch["input_ids"].shape == (4, max(1 + i % 3 for i in first[0][0])) and batch["labels"].dtype == torch.float32
    assert batch["attention_mask"].sum().item() == sum(1 + i % 3 for i in first[0][0])  # padded to the longest row
    with pytest.raises(RuntimeError, match="training shard is empty"):
        next(batches_forever(shard, 16, pad_id=0, seed=5))


def test_the_optimizer_is_torchs_fused_adamw_and_steps_as_its_default_one():
    """`train.fused_optimizer` (on by default) builds torch's fused AdamW, whose CPU kernel steps a MiniLM-sized
    model ~4.5x faster than the per-parameter loop torch picks on CPU; off, torch's default. Both step alike."""
    from pipeline.config import TrainConfig
    from pipeline.train.loop import adamw

    assert TrainConfig().fused_optimizer
    before, after = {}, {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = build_model("tiny-bert", [Head("cls", "classification", 2)])
        before[fused] = torch.cat([p.detach().flatten() for p in model.parameters()])
        optimizer = adamw(model.param_groups(1e-3, 0.01, {"cls": 2.0}), TrainConfig(lr=1e-3, fused_optimizer=fused))
        assert optimizer.defaults["fused"] is (True if fused else None)
        assert optimizer.param_groups[-1]["lr"] == pytest.approx(2e-3)  # the head's multiplier kept
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            optimizer.step()
        after[fused] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(before[True], before[False])
    assert (after[True] - before[True]).abs().max() > 1e-3  # it did step
    assert torch.allclose(after[True], after[False], rtol=1e-5, atol=1e-6), (after[True] - after[False]).abs().max()


def test_training_builds_no_deepspeed_inference_comm_op():
    """DeepSpeed's CPU shared-memory all-reduce op (a ~73 s JIT compile on a fresh machine) serves only
    DeepSpeed-Inference; the loop turns its build off before the engine starts."""
    import importlib

    from pipeline.train.loop import skip_inference_comm_op

    ds_torch = importlib.import_module("deepspeed.comm.torch")
    original = ds_torch.build_shm_op
    try:
        skip_inference_comm_op()
        assert ds_torch.build_shm_op() is None
        assert not hasattr(torch, "build_shm_op")  # patched in DeepSpeed's module, not in torch's
    finally:
        ds_torch.build_shm_op = original


def test_progress_view_draws_what_rank_0_sends_and_the_last_line_before_close_returns(capsys):
    """Lines mode (output not a terminal): each step as one line with its per-task losses, tokens/s and an ETA
    from the pace so far, evaluations as sent, all drawn by the time close() returns."""
    from pipeline.train.progress import ProgressView, send

    view = ProgressView(total=40, bar=False)
    send(view.queue, "step", {"step": 10, "total": 40, "metrics": {"loss/total": 2.5, "loss/rt": 0.69, "loss/xsum": 6.1,
                                                                    "tokens_per_s": 1234.0}})
    send(view.queue, "step", {"step": 20, "total": 40, "metrics": {"loss/total": 2.0, "loss/rt": 0.6, "tokens_per_s": 1000.0,
                                                                    "weight/rt": 1.25}})
    send(view.queue, "line", "eval step 20: score 61.97 · rt accuracy 0.7575")
    view.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step 10/40 · loss 2.5 (rt 0.69, xsum 6.1) · 1,234 tok/s"  # no pace yet: no ETA
    assert lines[1].startswith("step 20/40 · loss 2 (rt 0.6) · weights (rt 1.25) · 1,000 tok/s · ETA ")
    assert lines[2] == "eval step 20: score 61.97 · rt accuracy 0.7575" and len(lines) == 3
