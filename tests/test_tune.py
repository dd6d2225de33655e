"""Ray Tune over task weights and sampling ratios: spec validation, the trial config, resources, and one
real 4-trial ASHA experiment (tiny model, two real tasks, 1 worker per trial) that is killed mid-way,
resumed with --resume, and then checked end to end: MLflow parent + 4 children, the best config
retrained to the same score, the best model registered as `challenger`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import mlflow_uri
import yaml

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.tuning import load_tune_spec, max_concurrent, param_space, trial_config

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"rotten_tomatoes": {"max_rows": {"train": 256, "validation": 64}},
         "bbc_news": {"max_rows": {"train": 256, "validation": 60}}}


def _write_spec(tmp: Path, cache_dir: Path, **spec) -> Path:
    train = {"name": "tt", "model": {"name": "tiny-bert"}, "tasks": TASKS, "sampling": {"strategy": "temperature"},
             "data": {"cache_dir": str(cache_dir)},
             "train": {"num_workers": 1, "cpus_per_worker": 0.5, "steps": 30, "batch_size": 16, "lr": 2e-3,
                       "log_every": 10, "eval_batch_size": 32, "storage_path": str(tmp / "runs")}}
    (tmp / "train.yaml").write_text(yaml.safe_dump(train))
    spec = {"train_config": "train.yaml", "name": "tt-tune", "num_samples": 4, "search": "random", "seed": 3,
            "scheduler": "asha", "asha": {"grace_period": 10, "reduction_factor": 2}, "report_every": 10,
            "space": {"weights": {"low": 0.25, "high": 4.0, "log": True},
                      "sampling": {"strategy": ["temperature", "explicit"], "temperature": {"low": 1.0, "high": 8.0},
                                   "ratios": {"low": 0.05, "high": 1.0}}},
            "register_as": "tt-model", **spec}
    (tmp / "tune.yaml").write_text(yaml.safe_dump(spec))
    return tmp / "tune.yaml"


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs").glob("tune_*.yaml")), ids=lambda p: p.name)
def test_shipped_tune_specs_validate(path):
    spec, base = load_tune_spec(path)
    assert len(base.tasks) >= 2 and param_space(spec, base)


def test_spec_overrides_split_between_spec_and_training_config(tmp_path, cache_dir):
    path = _write_spec(tmp_path, cache_dir)
    spec, base = load_tune_spec(path, ["num_samples=6", "asha.grace_period=20", "train.steps=40"])
    assert spec.num_samples == 6 and spec.asha.grace_period == 20 and base.train.steps == 40
    assert spec.train_config == tmp_path / "train.yaml" and spec.name == "tt-tune"
    assert sorted(param_space(spec, base)) == sorted(
        ["weight.rotten_tomatoes", "weight.bbc_news", "sampling.strategy", "sampling.temperature",
         "ratio.rotten_tomatoes", "ratio.bbc_news"])


def test_trial_config_normalises_weights_and_ratios(tmp_path, cache_dir):
    spec, base = load_tune_spec(_write_spec(tmp_path, cache_dir))
    params = {"weight.rotten_tomatoes": 3.0, "weight.bbc_news": 1.0, "sampling.strategy": "explicit",
              "sampling.temperature": 5.0, "ratio.rotten_tomatoes": 0.2, "ratio.bbc_news": 0.6}
    cfg = trial_config(base, params, spec)
    assert {t: c.weight for t, c in cfg.tasks.items()} == {"rotten_tomatoes": 1.5, "bbc_news": 0.5}  # sum = 2 tasks
    assert {t: c.ratio for t, c in cfg.tasks.items()} == {"rotten_tomatoes": 0.25, "bbc_news": 0.75}  # sum = 1
    assert cfg.train.eval_every == cfg.train.checkpoint_every == 10 and cfg.tracking.experiment == "tt-tune"
    spaced, _ = load_tune_spec(tmp_path / "tune.yaml", ["checkpoint_every=30"])  # checkpoints apart from reports
    spaced_cfg = trial_config(base, params, spaced)
    assert (spaced_cfg.train.eval_every, spaced_cfg.train.checkpoint_every) == (10, 30)
    # A temperature trial ignores the sampled ratios (a config with both would be rejected).
    cfg = trial_config(base, {**params, "sampling.strategy": "temperature"}, spec)
    assert cfg.sampling.temperature == 5.0 and all(c.ratio is None for c in cfg.tasks.values())
    # What a trial trains on is a plain training config: it round-trips through YAML unchanged.
    (tmp_path / "best.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert load_config(tmp_path / "best.yaml") == cfg


def test_adapter_rank_is_searched_when_the_config_trains_adapters(tmp_path, cache_dir):
    path = _write_spec(tmp_path, cache_dir, space={"adapter_r": [4, 16]})
    with pytest.raises(PipelineError) as err:
        load_tune_spec(path)
    assert str(err.value.problems[0]).startswith("space.adapter_r: searches the LoRA rank, but the training config trains no adapters")
    spec, base = load_tune_spec(path, ["model.adapter={r: 8, per_task: false}"])
    assert sorted(param_space(spec, base)) == ["model.adapter.r"]
    cfg = trial_config(base, {"model.adapter.r": 16}, spec)
    assert cfg.model.adapter.r == 16 and cfg.model.adapter.per_task is False and base.model.adapter.r == 8


def test_concurrency_follows_cluster_resources(tmp_path, cache_dir):
    spec, base = load_tune_spec(_write_spec(tmp_path, cache_dir))
    assert max_concurrent(spec, base, {"CPU": 2}) == 2  # 1 worker × 0.5 CPU each, 1 CPU kept for Ray Data
    spec2, base2 = load_tune_spec(_write_spec(tmp_path, cache_dir), ["train.num_workers=2", "train.cpus_per_worker=1"])
    assert max_concurrent(spec2, base2, {"CPU": 8}) == 3 and max_concurrent(spec2, base2, {"CPU": 3}) == 1
    spec3, base3 = load_tune_spec(_write_spec(tmp_path, cache_dir), ["max_concurrent_trials=2", "train.num_workers=2",
                                                                   "train.cpus_per_worker=1"])
    assert max_concurrent(spec3, base3, {"CPU": 32}) == 2
    gpu_spec, gpu_base = load_tune_spec(_write_spec(tmp_path, cache_dir), ["train.use_gpu=true", "train.num_workers=2"])
    assert max_concurrent(gpu_spec, gpu_base, {"CPU": 64, "GPU": 8}) == 4  # 2 GPUs per trial
    with pytest.raises(PipelineError) as err:
        max_concurrent(spec2, base2, {"CPU": 2})
    line = str(err.value.problems[0])
    assert line.startswith("train.num_workers:") and "2 workers × 1 CPU" in line and "the cluster has 2 CPUs" in line


def test_bad_specs_name_the_key_and_the_fix(tmp_path, cache_dir):
    path = _write_spec(tmp_path, cache_dir)
    with pytest.raises(PipelineError) as err:
        load_tune_spec(path, ["search=grid", "asha.grace_period=40", "space.lr={low: 1, high: 0.5}", "num_sample=3"])
    lines = [str(p) for p in err.value.problems]
    assert any(l.startswith("num_sample: unknown key") and "did you mean 'num_samples'" in l for l in lines), lines
    assert any(l.startswith("space.lr") and "must be below high" in l for l in lines), lines
    with pytest.raises(PipelineError) as err:
        load_tune_spec(path, ["search=grid", "asha.grace_period=40"])
    lines = [str(p) for p in err.value.problems]
    assert any(l.startswith("asha.grace_period:") and "not below train.steps (30)" in l for l in lines), lines
    assert any(l.startswith("space.weights: is a range") for l in lines), lines
    with pytest.raises(PipelineError) as err:
        load_tune_spec(path, ["checkpoint_every=15"])  # report_every is 10
    (line,) = [str(p) for p in err.value.problems]
    assert line.startswith("checkpoint_every: 15 is not a multiple of report_every (10)") and "e.g. 20" in line, line
    with pytest.raises(PipelineError) as err:
        load_tune_spec(path, ["train.steps=-1"])
    assert str(err.value.problems[0]).startswith("train.steps:")


def test_points_to_evaluate_are_checked_against_the_space(tmp_path, cache_dir):
    good = {"weight.rotten_tomatoes": 3.0, "sampling.strategy": "explicit", "ratio.bbc_news": 0.5}
    spec, base = load_tune_spec(_write_spec(tmp_path, cache_dir, points_to_evaluate=[good]))
    assert spec.points_to_evaluate == [good]
    bad = [good, {"weight.rotten_tomatoes": 9.0, "sampling.strategy": "uniform", "lr": 0.1}]
    with pytest.raises(PipelineError) as err:
        load_tune_spec(_write_spec(tmp_path, cache_dir, points_to_evaluate=bad, num_samples=2))
    lines = [str(p) for p in err.value.problems]
    assert any(l.startswith("points_to_evaluate[1].weight.rotten_tomatoes: 9.0 is outside its range [0.25, 4]")
               for l in lines), lines
    assert any(l.startswith("points_to_evaluate[1].sampling.strategy: 'uniform' is not one of") for l in lines), lines
    assert any(l.startswith("points_to_evaluate[1].lr: is not a searched key") and "weight.bbc_news" in l
               for l in lines), lines
    assert any(l.startswith("num_samples: 2 is fewer than the 3 configurations tried first") and "num_samples=3" in l
               for l in lines), lines
    assert len(lines) == 4, lines
    with pytest.raises(PipelineError) as err:
        load_tune_spec(_write_spec(tmp_path, cache_dir, points_to_evaluate=[good]), ["search=grid"])
    assert any(str(p).startswith("points_to_evaluate: is given, but search: grid") for p in err.value.problems)


def test_a_stopped_trials_run_ends_at_its_last_result(tmp_path):
    """An ASHA-stopped trial is closed by the driver when the experiment ends: its MLflow run must end at the
    trial's last result, not minutes later with the experiment (real sqlite store)."""
    from pipeline.tracking import TuneParent
    parent = TuneParent.start(mlflow_uri(tmp_path), True, "tt-close", {"num_samples": "3"}, {"name": "tt"})
    client = parent.client
    experiment = client.get_run(parent.run_id).info.experiment_id
    runs = {name: client.create_run(experiment, run_name=name, tags={"mlflow.parentRunId": parent.run_id,
                                                                     "mtl.run_name": name}).info
            for name in ("stopped", "finished", "errored")}
    last = runs["stopped"].start_time / 1000 + 42.0
    children = parent.children()
    parent.close_child(children["stopped"], "stopped (ASHA)", last)
    parent.close_child(children["finished"], "finished", last + 1)
    parent.close_child(children["errored"], "error")  # no result time: closed now
    got = {name: client.get_run(info.run_id) for name, info in runs.items()}
    assert (got["stopped"].info.status, got["stopped"].info.end_time) == ("KILLED", int(last * 1000))
    assert got["stopped"].data.tags["mtl.tune_status"] == "stopped (ASHA)"
    assert (got["finished"].info.status, got["finished"].info.end_time) == ("FINISHED", int((last + 1) * 1000))
    assert got["errored"].info.status == "FAILED" and got["errored"].info.end_time >= runs["errored"].start_time


def _children(uri: str, parent_run_id: str):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client, client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


@pytest.mark.timeout(900)
def test_two_trial_experiment_tracks_parent_and_children_and_writes_the_best_config(tmp_path, cache_dir, ray_session):
    """The default tier's real Tune run (the killed-and-resumed ASHA experiment below is the slow tier's):
    2 trials of 10 steps, FIFO, through the job: trials.json, best_config.yaml, an MLflow parent with two
    nested children carrying their normalised weights and ratios, the best model registered as challenger."""
    given = {"weight.rotten_tomatoes": 3.0, "weight.bbc_news": 1.0, "sampling.strategy": "explicit",
             "ratio.rotten_tomatoes": 0.2, "ratio.bbc_news": 0.6}  # trial 2: after the baseline, instead of a sample
    path = _write_spec(tmp_path, cache_dir, num_samples=2, scheduler="fifo", report_every=5, checkpoint_every=10,
                       points_to_evaluate=[given])
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [sys.executable, str(ROOT / "jobs" / "tune.py"), "--config", str(path), "--out", str(out), "train.steps=10"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "trials.json").read_text())
    trials = summary["trials"]
    assert len(trials) == 2 and all(t["status"] == "finished" and t["steps"] == 10 for t in trials), trials
    assert [t["baseline"] for t in trials] == [True, False], trials
    config = trials[1]["config"]  # the given values, and the key left out sampled
    assert {k: config[k] for k in given} == given and 1.0 <= config.pop("sampling.temperature") <= 8.0, config
    assert config == given
    assert trials[1]["weights"] == {"rotten_tomatoes": 1.5, "bbc_news": 0.5}
    assert trials[1]["ratios"] == pytest.approx({"rotten_tomatoes": 0.25, "bbc_news": 0.75}, abs=1e-4)
    for t in trials:
        assert sum(t["weights"].values()) == pytest.approx(2.0, abs=1e-4)
        assert sum(t["ratios"].values()) == pytest.approx(1.0, abs=1e-4)
    client, children = _children(f"{mlflow_uri(tmp_path)}", summary["parent_run_id"])
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert all({"dev/score", "loss/total"} <= set(c.data.metrics) and "weight.bbc_news" in c.data.params for c in children)
    best = next(t for t in trials if t["trial"] == summary["best_trial"])
    assert client.get_run(summary["parent_run_id"]).data.metrics["best_score"] == pytest.approx(best["best_score"])
    cfg = load_config(out / "best_config.yaml")
    assert {t: c.weight for t, c in cfg.tasks.items()} == best["weights"] and cfg.train.steps == 10
    assert client.get_model_version_by_alias("tt-model", "challenger").tags["run_name"] == best["run_name"]

    # TensorBoard: every trial's folder holds event files with its dev score, per-task metrics and weights at
    # each report (steps 5 and 10), the dev scores those of its MLflow run; the report at step 5 came without a
    # checkpoint (checkpoint_every=10): each trial's only checkpoint is its last step's, timed on its run
    by_name = {c.data.tags["mtl.run_name"]: c for c in children}
    for t in trials:
        assert [p.name for p in (tmp_path / "runs" / t["run_name"]).glob("step_*")] == ["step_0000010"]
        timed = by_name[t["run_name"]].data.metrics
        assert 0 < timed["time/checkpoint_total_s"] < timed["time/paused_total_s"]
        (events,) = (tmp_path / "runs" / "tt-tune" / t["run_name"]).glob("events.out.tfevents.*")
        points = _tensorboard_scalars(events)
        assert {"ray/tune/dev/score", "ray/tune/dev/rotten_tomatoes/accuracy", "ray/tune/weight/bbc_news"} <= set(points)
        assert [s for s, _ in points["ray/tune/step"]] == [1, 2] and [v for _, v in points["ray/tune/step"]] == [5, 10]
        logged = [v for _, v in sorted((m.step, m.value) for m in client.get_metric_history(
            by_name[t["run_name"]].info.run_id, "dev/score"))]
        assert [v for _, v in points["ray/tune/dev/score"]] == pytest.approx(logged, abs=1e-4)
        assert [v for _, v in points["ray/tune/weight/bbc_news"]] == pytest.approx([t["weights"]["bbc_news"]] * 2, abs=1e-4)


def _tensorboard_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per tag from a TensorBoard event file (TFRecord framing: length, crc, event, crc)."""
    import struct

    from tensorboardX.proto import event_pb2
    data, i, out = path.read_bytes(), 0, {}
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i:i + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[i + 12:i + 12 + length])
        i += 12 + length + 4
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


@pytest.mark.slow  # the default tier runs the two-trial experiment above
@pytest.mark.timeout(1500)
def test_asha_experiment_killed_resumed_tracked_and_reproducible(tmp_path, cache_dir, ray_session):
    path = _write_spec(tmp_path, cache_dir)
    spec, base = load_tune_spec(path)
    runs, out = tmp_path / "runs", tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    # No tracking.uri: the default store (mlflow.db in the job's working directory) must hold the parent
    # and every child, although Tune runs each trial in a working directory of its own.
    uri = f"{mlflow_uri(tmp_path)}"
    cmd = [sys.executable, str(ROOT / "jobs" / "tune.py"), "--config", str(path), "--out", str(out)]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    # Kill the Tune driver once Tune has recorded at least one trial as TERMINATED and others are not.
    def terminated() -> set[str]:
        states = sorted(runs.glob("tt-tune/experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
        try:
            trials = [json.loads(t[0]) for t in json.loads(states[-1].read_text())["trial_data"]] if states else []
        except (ValueError, OSError):  # being rewritten
            return set()
        return {f"tt-tune-{t['trial_id']}" for t in trials if t["status"] == "TERMINATED"}

    def last_write(run: str) -> float:
        return max(p.stat().st_mtime for p in (runs / run).rglob("*"))

    deadline = time.monotonic() + 900
    while not terminated() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = time.time() * 1000
    done_before = terminated()
    assert 1 <= len(done_before) < 4
    stamps = {r: last_write(r) for r in done_before}
    time.sleep(3)

    resumed = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # Trials Tune had finished were not run again (nothing in their run folders changed); the others were finished.
    assert {r: last_write(r) for r in done_before} == stamps

    summary = json.loads((out / "trials.json").read_text())
    trials = summary["trials"]
    assert len(trials) == 4 and all(t["status"] in ("finished", "stopped (ASHA)") for t in trials), trials
    assert sum(t["status"] == "finished" for t in trials) >= 1
    # Whether ASHA stops a trial depends on the order results reach its rungs (two trials run at once),
    # so a stop is not required; a stopped trial must have stopped early and be closed as KILLED below.
    assert all(t["steps"] < 30 for t in trials if t["status"] == "stopped (ASHA)")
    stopped = {t["run_name"] for t in trials if t["status"] == "stopped (ASHA)"}
    for t in trials:
        assert sum(t["weights"].values()) == pytest.approx(2.0, abs=1e-4)
        assert sum(t["ratios"].values()) == pytest.approx(1.0, abs=1e-4)
    # the plot: two rows (weight, ratio) by one column per task, at the figure's size
    import matplotlib.image
    height, width = matplotlib.image.imread(out / "weights_vs_score.png").shape[:2]
    assert (width, height) == (4 * 2 * 110, int(6.5 * 110)) and "| trial |" in (out / "trials.md").read_text()

    # MLflow: one parent, four nested children (the resumed trial kept its run), params and metrics.
    parent_id = summary["parent_run_id"]
    client, children = _children(uri, parent_id)
    assert len(children) == 4 and len({c.data.tags["mtl.run_name"] for c in children}) == 4
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["best_score"] == pytest.approx(
        max(t["best_score"] for t in trials if t["status"] == "finished"))
    assert {"tune/trials.md", "tune/best_config.yaml", "tune/weights_vs_score.png", "tune/trials.json"} <= {
        a.path for a in client.list_artifacts(parent_id, "tune")}
    for child in children:
        assert {"weight.rotten_tomatoes", "weight.bbc_news", "ratio.rotten_tomatoes", "ratio.bbc_news"} <= set(child.data.params)
        assert {"dev/score", "dev/rotten_tomatoes/accuracy", "loss/total"} <= set(child.data.metrics)
        name = child.data.tags["mtl.run_name"]
        assert child.info.status == ("KILLED" if name in stopped else "FINISHED"), (name, child.info.status)
        if name in stopped:  # ended at its last result (step < 30), not with the experiment
            assert child.data.tags["mtl.tune_status"] == "stopped (ASHA)"
            last_report = max(m.timestamp for m in client.get_metric_history(child.info.run_id, "dev/score"))
            assert abs(child.info.end_time - last_report) < 5000, (child.info.end_time, last_report)
        if child.data.tags["mtl.run_name"] in done_before and child.info.status == "FINISHED":
            assert child.info.end_time < killed_at
        # The resumed trial continued from its latest checkpoint, not from step 0: a step may repeat only when
        # the kill landed between an evaluation and its checkpoint (the replayed interval, < checkpoint_every).
        history = sorted(client.get_metric_history(child.info.run_id, "dev/score"), key=lambda m: m.timestamp)
        steps = [m.step for m in history]
        assert set(steps) == {10, 20, 30} or name in stopped, steps
        replays = [(a, b) for a, b in zip(steps, steps[1:]) if b <= a]
        assert all(a - b < 10 for a, b in replays) and len(replays) <= 1, f"dev/score steps {steps}"

    # The best trial's best model is registered as a new version with alias challenger.
    best = next(t for t in trials if t["trial"] == summary["best_trial"])
    version = client.get_model_version_by_alias("tt-model", "challenger")
    assert version.tags["run_name"] == best["run_name"] and float(version.tags["score"]) == pytest.approx(best["best_score"], abs=1e-4)

    # best_config.yaml is accepted by the training job as-is and retrains to the same score (same seed,
    # same data order on one worker; tolerance 1e-6 on a 0-100 score).
    from pipeline.train.driver import train_driver
    cfg = load_config(out / "best_config.yaml")
    assert cfg.tracking.uri == uri  # the resolved store, not "the working directory" of whoever retrains
    assert {t: c.weight for t, c in cfg.tasks.items()} == best["weights"]
    again = train_driver(cfg, log=lambda _: None)
    assert again.best_score == pytest.approx(best["best_score"], abs=1e-6)


def test_confirm_stage_names_a_winner_only_beyond_noise():
    from pipeline.experiment import INCUMBENT, confirm_markdown, decide
    from pipeline.eval.stats import paired

    own = [60.0, 62.0, 61.0]
    scores = {INCUMBENT: own, "trial a": [61.0, 63.5, 61.8], "trial b": [63.0, 60.0, 64.0]}
    table, winner = decide(scores)
    rows = {r["config"]: r for r in table}
    assert rows["trial a"]["difference"] == paired([61.0, 63.5, 61.8], own)  # +1.0, +1.5, +0.8: holds
    assert rows["trial a"]["beats"] and not rows["trial b"]["beats"]  # b: +3, −2, +3 — a higher mean, but noise
    assert rows["trial b"]["score"].mean > rows["trial a"]["score"].mean and winner == "trial a"
    text = confirm_markdown(table, winner, [0, 1, 2], 120)
    assert "| trial a **winner** | 61.00, 63.50, 61.80 |" in text and "| within noise |" in text
    assert "Winner: trial a, better than the training config's own values beyond noise." in text

    table, winner = decide({INCUMBENT: own, "trial b": [63.0, 60.0, 64.0], "trial c": [58.0, 60.5, 59.0]})
    assert winner == INCUMBENT and "worse beyond noise" in confirm_markdown(table, winner, [0, 1, 2], 120)
    assert "the own values stay" in confirm_markdown(table, winner, [0, 1, 2], 120)


@pytest.mark.slow  # default tier: the confirm decision by hand (above) and the two-trial experiment without it
@pytest.mark.timeout(1800)
def test_confirm_stage_retrains_over_seeds_and_registers_only_a_winner(tmp_path, cache_dir, ray_session):
    path = _write_spec(tmp_path, cache_dir, num_samples=2, scheduler="fifo", report_every=5,
                       confirm={"top_k": 1, "seeds": 2, "overrides": ["train.steps=12"]})
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [sys.executable, str(ROOT / "jobs" / "tune.py"), "--config", str(path), "--out", str(out), "train.steps=10"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    confirmed = json.loads((out / "confirm.json").read_text())
    assert [r["config"] for r in confirmed["table"]][0] == "own values" and len(confirmed["table"]) == 2
    assert all(len(r["scores"]) == 2 for r in confirmed["table"]) and confirmed["seeds"] == [0, 1]
    summary = json.loads((out / "trials.json").read_text())
    client, children = _children(f"{mlflow_uri(tmp_path)}", summary["parent_run_id"])
    confirm_runs = [c for c in children if "-confirm-" in c.data.tags["mtl.run_name"]]
    assert len(confirm_runs) == 4 and all("dev/score" in c.data.metrics for c in confirm_runs)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["mtl.confirmed_winner"] == confirmed["winner"]
    assert "## Confirm stage" in (out / "trials.md").read_text()
    assert load_config(out / "best_config.yaml").train.steps == 12
    versions = client.search_model_versions("name = 'tt-model'")
    if confirmed["winner"] == "own values":
        assert not versions and parent.data.tags["mtl.registered"].startswith("none")
    else:
        assert len(versions) == 1
