"""Dynamic task-loss weighting: each method on synthetic losses and gradients, the config checks, the
shared parameter group, the shared gradient at every ZeRO stage, and real 2-worker runs."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from conftest import mlflow_uri
import torch

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.model.multitask import Head, build_model
from pipeline.train.weighting import make_weighting

TASKS = ["a", "b", "c"]
METHODS = ["static", "uncertainty", "dwa", "gradcos", "famo"]


def _drive(weighting, steps: int, seed: int = 0, dim: int = 8) -> None:
    """Feed a weighting random losses and gradients, one task per step, as the loop does."""
    rng = np.random.default_rng(seed)
    tasks = list(weighting.weights())
    for step in range(1, steps + 1):
        task = tasks[rng.integers(len(tasks))]
        if weighting.needs_grads:
            weighting.observe_grad(task, weighting.weight(task) * torch.as_tensor(rng.normal(size=dim), dtype=torch.float32))
        weighting.observe_loss(task, float(rng.uniform(0.1, 3.0)), step)


def test_static_is_the_configured_weights_bit_for_bit():
    weights = {"a": 0.3, "b": 1.2, "c": 1.5}  # already normalised, as the driver passes them
    w = make_weighting("static", TASKS, weights)
    loss = torch.tensor(0.7310585975646973, requires_grad=True)
    for t in TASKS:
        assert torch.equal(w.weighted_loss(t, loss), weights[t] * loss)
    _drive(w, 50)
    assert w.weights() == weights and not w.needs_grads and not w.needs_losses
    assert make_weighting("static", ["a", "b"], {"a": 1, "b": 3}).weights() == {"a": 0.5, "b": 1.5}


def test_uncertainty_gives_the_larger_noisier_loss_the_smaller_weight():
    w = make_weighting("uncertainty", ["noisy", "clean"], {"noisy": 1.0, "clean": 1.0}, {"lr": 0.05})
    assert w.weights() == {"noisy": 1.0, "clean": 1.0}  # s = 0: the static weights
    rng = np.random.default_rng(0)
    for step in range(1, 401):
        w.observe_loss("noisy", float(3.0 + rng.normal(0, 1.0)), step)
        w.observe_loss("clean", float(0.3 + rng.normal(0, 0.03)), step)
    weights = w.weights()
    assert weights["noisy"] < 0.5 < 1.5 < weights["clean"], weights
    assert sum(weights.values()) == pytest.approx(2.0)
    # Kendall's optimum: s_t -> log L_t. The loss the model sees is w0·(exp(-s)·L + s): its gradient
    # with respect to L is exp(-s), the unnormalised weight.
    s = w.module.log_vars.detach()
    assert s[0].item() == pytest.approx(math.log(3.0), abs=0.3) and s[1].item() == pytest.approx(math.log(0.3), abs=0.3)
    loss = torch.tensor(2.0, requires_grad=True)
    w.weighted_loss("noisy", loss).backward()
    assert loss.grad.item() == pytest.approx(math.exp(-s[0].item()))


def test_dwa_gives_the_slower_falling_loss_the_larger_weight():
    w = make_weighting("dwa", ["fast", "slow"], {"fast": 1, "slow": 1}, {"window": 5, "temperature": 0.5})
    step = 0
    for k in range(4):  # four windows per task: "fast" halves every window, "slow" drops 5%
        for _ in range(5):
            step += 1
            w.observe_loss("fast", 2.0 * 0.5 ** k, step)
            w.observe_loss("slow", 2.0 * 0.95 ** k, step)
        if k == 0:
            assert w.weights() == {"fast": 1.0, "slow": 1.0}  # r = 1 until a task has two windows
    weights = w.weights()
    ratio = {"fast": 0.5, "slow": 0.95}  # r_t = L(k-1) / L(k-2)
    expected = {t: 2 * math.exp(r / 0.5) / sum(math.exp(v / 0.5) for v in ratio.values()) for t, r in ratio.items()}
    assert weights == pytest.approx(expected) and weights["slow"] > 1.0 > weights["fast"]


def test_gradcos_weighs_a_conflicting_task_down_and_keeps_the_prior_for_aligned_ones():
    rng = np.random.default_rng(0)
    w = make_weighting("gradcos", TASKS, {"a": 1, "b": 1, "c": 1})
    direction = torch.tensor([1.0, 0.5, 0.0, 0.0])
    for step in range(30):
        for task, sign in (("a", 1.0), ("b", 1.0), ("c", -1.0)):
            grad = sign * direction + 0.1 * torch.as_tensor(rng.normal(size=4), dtype=torch.float32)
            w.observe_grad(task, w.weight(task) * grad)  # the loop passes the gradient of the weighted loss
            if step == 0 and task != "c":
                assert w.weights() == {"a": 1.0, "b": 1.0, "c": 1.0}  # static until every task was seen
    weights = w.weights()
    assert weights["c"] < 0.2 < 1.3 < min(weights["a"], weights["b"]), weights
    assert sum(weights.values()) == pytest.approx(3.0)

    # All tasks aligned: 1 + cos ≈ 2 for each, so the static weights (the prior) come through.
    w = make_weighting("gradcos", ["a", "b"], {"a": 3, "b": 1})
    for _ in range(5):
        for task in ("a", "b"):
            w.observe_grad(task, w.weight(task) * (direction + 0.01 * torch.as_tensor(rng.normal(size=4), dtype=torch.float32)))
    assert w.weights() == pytest.approx({"a": 1.5, "b": 0.5}, abs=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_weights_always_sum_to_the_number_of_tasks(method):
    w = make_weighting(method, TASKS, {"a": 0.5, "b": 2.0, "c": 1.0})
    rng = np.random.default_rng(1)
    for step in range(1, 120):
        task = TASKS[rng.integers(3)]
        if w.needs_grads:
            w.observe_grad(task, torch.as_tensor(rng.normal(size=6), dtype=torch.float32))
        w.observe_loss(task, float(rng.uniform(0.01, 5.0)), step)
        weights = w.weights()
        assert sum(weights.values()) == pytest.approx(3.0) and all(v >= 0 for v in weights.values())
        assert weights == {t: w.weight(t) for t in TASKS}


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_continues_exactly(method):
    options = {"dwa": {"window": 3}}.get(method, {})
    first = make_weighting(method, TASKS, {"a": 1, "b": 1, "c": 2}, options)
    _drive(first, 40, seed=2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as DeepSpeed stores the loop's client state
    buffer.seek(0)
    second = make_weighting(method, TASKS, {"a": 1, "b": 1, "c": 2}, options)
    second.load_state_dict(torch.load(buffer, weights_only=True))  # as checkpoint verification loads it
    assert second.weights() == first.weights()
    _drive(first, 40, seed=3)
    _drive(second, 40, seed=3)
    assert second.weights() == first.weights()
    if method != "static":
        assert first.weights() != {"a": 0.75, "b": 0.75, "c": 1.5}  # the weights did move
    with pytest.raises(ValueError, match="differs from the config"):
        make_weighting("dwa" if method != "dwa" else "static", TASKS, {t: 1 for t in TASKS}).load_state_dict(first.state_dict())


def test_unknown_methods_and_options_are_refused():
    with pytest.raises(ValueError, match="unknown weighting method 'softmax'"):
        make_weighting("softmax", TASKS, {t: 1 for t in TASKS})
    with pytest.raises(ValueError, match=r"unknown options \['lr'\] for weighting 'dwa'; allowed: temperature, window"):
        make_weighting("dwa", TASKS, {t: 1 for t in TASKS}, {"lr": 0.1})


def _problems(*overrides) -> list[str]:
    with pytest.raises(PipelineError) as info:
        load_config(None, ["tasks={sst2: {}, mrpc: {}}", *overrides])
    return [str(p) for p in info.value.problems]


def test_config_selects_and_validates_the_weighting():
    cfg = load_config(None, ["tasks={sst2: {}, mrpc: {}}", "train.weighting=dwa", "train.weighting_options={window: 4}",
                             "train.shared_params=backbone.encoder.layer.0."])
    assert cfg.train.weighting == "dwa" and cfg.train.weighting_options == {"window": 4.0}
    assert cfg.train.shared_params == "backbone.encoder.layer.0."
    assert load_config(None, ["tasks={sst2: {}}"]).train.weighting == "static"

    (line,) = _problems("train.weighting=softmax")
    assert line.startswith("train.weighting: Input should be 'static', 'uncertainty', 'dwa', 'gradcos' or 'famo'"), line
    (line,) = _problems("train.weighting=dwa", "train.weighting_options={temperature: 1, lr: 0.1}")
    assert line == "train.weighting_options.lr: unknown option for train.weighting=dwa — use one of: temperature, window"
    (line,) = _problems("train.weighting_options={beta: 0.5}")
    assert line.startswith("train.weighting_options.beta: unknown option for train.weighting=static — remove it")
    lines = _problems("train.weighting=gradcos", "train.weighting_options={beta: 1.0, eps: 0}")
    assert lines == ["train.weighting_options.beta: 1.0 is out of range — use a value in [0, 1)",
                     "train.weighting_options.eps: 0.0 is out of range — use a value > 0"]
    (line,) = _problems("train.weighting=dwa", "train.weighting_options={window: 2.5}")
    assert line == "train.weighting_options.window: 2.5 is out of range — use a whole number >= 1"


@pytest.mark.parametrize("name, prefix", [("tiny-bert", "backbone.encoder.layer.1."),
                                          ("tiny-llama", "backbone.model.layers.1."),
                                          ("tiny-gpt2", "backbone.transformer.h.1."),
                                          ("tiny-t5", "backbone.encoder.block.1."),
                                          ("tiny-bart", "backbone.model.encoder.layers.1.")])
def test_shared_parameters_default_to_the_backbones_last_block(name, prefix):
    model = build_model(name, [Head("cls", "classification", 2), Head("xsum", "summarization", 0)])
    shared = model.shared_parameters()
    assert model.last_block_prefix() == prefix and shared and all(n.startswith(prefix) for n, _ in shared)
    assert {n for n, _ in shared} == {n for n, _ in model.named_parameters() if n.startswith(prefix)}
    # The group gets gradient from a classification task.
    ids = torch.tensor([[101, 2023, 2003, 102]])
    _, loss = model("cls", ids, torch.ones_like(ids), labels=torch.tensor([1]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in shared)


def test_shared_parameters_by_prefix():
    model = build_model("tiny-bert", [Head("cls", "classification", 2)])
    names = [n for n, _ in model.shared_parameters("backbone.encoder.layer.0.attention.")]
    assert names and all(n.startswith("backbone.encoder.layer.0.attention.") for n in names)
    with pytest.raises(ValueError, match=r"no parameter name starts with 'backbone.nope.'.*'backbone.encoder.layer.1.'"):
        model.shared_parameters("backbone.nope.")


# ------------------------------------------------------------------------------- real Ray + DeepSpeed


def test_shared_gradient_is_the_rank_averaged_gradient_at_every_zero_stage(ray_session):
    """`shared_gradient` after backward (two accumulated micro-batches, different data per rank) equals
    the plain-PyTorch gradient averaged over ranks, identically on every rank, at ZeRO 0, 1, 2 and 3 in fp32."""
    _shared_gradient_cases([(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32")])


@pytest.mark.slow  # default tier: the same check at every stage in fp32 (above)
def test_shared_gradient_in_bf16_is_close_to_the_rank_averaged_gradient(ray_session):
    """The same in bf16, whose gradients DeepSpeed accumulates apart: close, not equal."""
    _shared_gradient_cases([(0, "bf16"), (2, "bf16")])


def _shared_gradient_cases(cases: list[tuple[int, str]]) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer

    def worker(config):
        import deepspeed
        import ray.train
        import torch
        import torch.distributed as dist

        from pipeline.model.multitask import Head, build_model
        from pipeline.config import TrainConfig
        from pipeline.train.loop import adamw, deepspeed_config, shared_gradient

        rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
        heads = [Head("cls", "classification", 2)]
        gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        batches = [{"input_ids": torch.randint(1000, 2000, (4, 6), generator=gen), "attention_mask": torch.ones(4, 6, dtype=torch.long),
                    "labels": torch.randint(0, 2, (4,), generator=gen).float()} for _ in range(2)]

        torch.manual_seed(0)
        reference = build_model("tiny-bert", heads).eval()  # eval: no dropout, so both sides compute the same
        for batch in batches:
            _, loss = reference("cls", **batch)
            (loss / len(batches)).backward()
        expected = torch.cat([p.grad.flatten() for _, p in reference.shared_parameters()])
        dist.all_reduce(expected)
        expected /= world

        train = {"zero_stage": 0, "batch_size": 4, "grad_accum": 2, "offload_optimizer": False, "precision": "fp32",
                 "clip_grad": 1.0, "lr": 1e-3, "weight_decay": 0.0}
        for stage, precision in cases:
            torch.manual_seed(0)
            model = build_model("tiny-bert", heads)
            shared = [p for _, p in model.shared_parameters()]
            cfg = TrainConfig(**{**train, "zero_stage": stage, "precision": precision})
            engine, optimizer, *_ = deepspeed.initialize(model=model, optimizer=adamw(model.parameters(), cfg),
                                                         config=deepspeed_config(cfg, world))
            # the job's optimizer (fused AdamW by default) is the one DeepSpeed steps, wrapped or not
            assert getattr(optimizer, "optimizer", optimizer).param_groups[0]["fused"] is True, f"stage {stage} {precision}"
            engine.eval()
            for micro, batch in enumerate(batches):
                _, loss = engine(task="cls", **batch)
                engine.backward(loss)
                if micro == len(batches) - 1:
                    grad = shared_gradient(shared)
                engine.step()
            everyone = [torch.zeros_like(grad) for _ in range(world)]
            dist.all_gather(everyone, grad)
            assert all(torch.equal(g, grad) for g in everyone), f"stage {stage} {precision}: ranks disagree"
            if precision == "fp32":
                assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-7), \
                    f"stage {stage}: max difference {(grad - expected).abs().max().item()}"
            else:
                cosine = torch.nn.functional.cosine_similarity(grad, expected, dim=0).item()
                assert cosine > 0.99 and (grad.norm() / expected.norm()).item() == pytest.approx(1.0, abs=0.05), \
                    f"stage {stage} bf16: cosine {cosine}, norms {grad.norm().item()} vs {expected.norm().item()}"

    TorchTrainer(worker, scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5})).fit()


def test_sparse_embedding_grads_apply_only_where_deepspeed_reduces_them_sparsely():
    """`train.sparse_embedding_grads` (default true) turns the word embedding sparse only at ZeRO-0, fp32, more
    than one rank, on a trained embedding not tied to an LM head; false never does."""
    from pipeline.config import TrainConfig
    from pipeline.train.loop import sparse_embedding_grads

    heads = [Head("cls", "classification", 2)]

    def on(name="tiny-bert", world=2, freeze=False, **train):
        model = build_model(name, heads)
        if freeze:
            model.backbone.get_input_embeddings().weight.requires_grad_(False)
        result = sparse_embedding_grads(model, TrainConfig(**train), world)
        assert model.backbone.get_input_embeddings().sparse is result
        return result

    assert on()
    assert not on(world=1)
    assert not on(zero_stage=1) and not on(zero_stage=3)
    assert not on(precision="bf16")
    assert not on(sparse_embedding_grads=False)
    assert not on(freeze=True)
    assert not on("tiny-llama")  # its LM head shares the embedding matrix: the gradient is dense anyway


def test_sparse_embedding_gradient_gives_the_dense_update_on_two_ranks(ray_session):
    """Two Ray workers, ZeRO-0, fp32, two accumulated micro-batches of different data per rank: with
    `sparse_embedding_grads` the word embedding's gradient after the boundary's backward is sparse (DeepSpeed
    gathered the rows) and `densify_grads` makes it the rank-averaged dense gradient, at every one of three
    AdamW steps through the loop's `train_step` (the buffer reused); the weights end where the dense
    all-reduce leaves them, on both ranks."""
    import ray.train
    from ray.train.torch import TorchTrainer

    def worker(config):
        import deepspeed
        import ray.train
        import torch
        import torch.distributed as dist

        from pipeline.config import TrainConfig
        from pipeline.model.multitask import Head, build_model
        from pipeline.train.loop import adamw, deepspeed_config, sparse_embedding_grads, train_step
        from pipeline.train.weighting import make_weighting

        rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
        heads = [Head("cls", "classification", 2)]
        gen = torch.Generator().manual_seed(100 + rank)
        batches = [{"input_ids": torch.randint(1000, 1100 + 900 * rank, (4, 6), generator=gen),
                    "attention_mask": torch.ones(4, 6, dtype=torch.long),
                    "labels": torch.randint(0, 2, (4,), generator=gen).float()} for _ in range(6)]
        weighting = make_weighting("static", ["cls"], {"cls": 1.0}, {})

        def run(flag):
            cfg = TrainConfig(zero_stage=0, batch_size=4, grad_accum=2, lr=1e-2, weight_decay=0.01,
                              sparse_embedding_grads=flag)
            torch.manual_seed(0)
            model = build_model("tiny-bert", heads)
            sparse = sparse_embedding_grads(model, cfg, world)
            engine, *_ = deepspeed.initialize(model=model, optimizer=adamw(model.param_groups(cfg.lr, cfg.weight_decay, {"cls": 1.0}), cfg),
                                              config=deepspeed_config(cfg, world))
            engine.eval()
            weight = model.backbone.get_input_embeddings().weight
            seen, grads = [], []  # whether the reduced gradient was sparse, and the dense one the step used
            original = engine.backward

            def backward(loss):
                original(loss)
                seen.append(weight.grad.is_sparse)
            engine.backward = backward
            it = iter(batches)
            for _ in range(3):
                train_step(engine, it, "cls", weighting, cfg.grad_accum, at_boundary=lambda: grads.append(weight.grad.clone()))
            return sparse, seen, grads, torch.cat([p.detach().flatten() for p in model.parameters()])

        torch.manual_seed(0)
        start = torch.cat([p.detach().flatten() for p in build_model("tiny-bert", heads).parameters()])
        sparse, seen_s, grads_s, params_s = run(True)
        dense, seen_d, grads_d, params_d = run(False)
        assert sparse and seen_s == [True] * 6 and not dense and seen_d == [False] * 6
        for step, (g_s, g_d) in enumerate(zip(grads_s, grads_d)):
            assert not g_s.is_sparse
            # step 0 differs only by the order of the ranks' sums; later steps also by Adam's rounding below
            assert torch.allclose(g_s, g_d, rtol=1e-3, atol=1e-7), (step, (g_s - g_d).abs().max())
            used = g_d.abs().sum(1) > 0  # the rows some rank's batches used
            assert 0 < used.sum() < 1000 and torch.equal(g_s.abs().sum(1) > 0, used), step
        # Adam divides by each gradient's running scale, so rounding-level differences in small gradients show
        # as ~1e-4 of the weights after three steps of 1e-2, which moved them by about 3e-2
        assert torch.allclose(params_s, params_d, rtol=0, atol=5e-4), (params_s - params_d).abs().max()
        assert (params_s - start).abs().max() > 1e-2
        everyone = [torch.zeros_like(params_s) for _ in range(world)]
        dist.all_gather(everyone, params_s)
        assert all(torch.equal(p, params_s) for p in everyone), "ranks disagree"

    TorchTrainer(worker, scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5})).fit()


def test_zero3_leaf_modules_still_lose_their_gradients_on_cpu(ray_session):
    """Why `TrainConfig` refuses `stage3_module_granularity_threshold` on CPU, kept as a check on the pinned
    DeepSpeed: it reduces a leaf module's gradients in the leaf's full backward hook, and CPU autograd runs that
    hook before the leaf's parameter gradients are accumulated. So the reduced gradients are zeros, the real ones
    stay in `.grad`, and the step's `zero_grad` fails on them (`record_stream` of the CPU accelerator's None
    stream). If this test fails, DeepSpeed has changed: check the update against ZeRO-0 and lift the refusal."""
    import ray.train
    from ray.train.torch import TorchTrainer

    def worker(config):
        import deepspeed
        import torch
        from deepspeed.utils import z3_leaf_module

        from pipeline.config import TrainConfig
        from pipeline.model.multitask import Head, build_model
        from pipeline.train.loop import deepspeed_config

        cfg = TrainConfig(zero_stage=3, batch_size=4).model_copy(  # past the refusal, which validation does
            update={"zero_options": {"stage3_module_granularity_threshold": 3000}})
        torch.manual_seed(0)
        model = build_model("tiny-bert", [Head("cls", "classification", 2)], dropout=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                          config={**deepspeed_config(cfg, 1), "zero_allow_untested_optimizer": True})
        assert z3_leaf_module(model.backbone.encoder)  # granularity 2,308 parameters per module, under 3,000
        batch = {"input_ids": torch.randint(1000, 2000, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
                 "labels": torch.tensor([0., 1., 0., 1.])}
        _, loss = engine(task="cls", **batch)
        engine.backward(loss)
        left = [n for n, p in model.backbone.encoder.named_parameters() if p.grad is not None]
        assert left, "no leaf gradient was left unreduced: DeepSpeed has changed, see the docstring"
        with pytest.raises(RuntimeError, match="unknown parameter type"):
            engine.step()

    TorchTrainer(worker, scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5})).fit()


TINY = "{rotten_tomatoes: {max_rows: {train: 128, validation: 32}}, bbc_news: {max_rows: {train: 128, validation: 32}}}"


def _run(tmp_path, cache_dir, *extra, steps: int = 20, resume: bool = False) -> dict[str, dict[int, float]]:
    """A short real run (2 workers, DeepSpeed, MLflow); checks the logged weights, returns their history."""
    from pipeline.train.driver import train_driver

    cfg = load_config(None, [
        "name=w", "model.name=tiny-bert", f"tasks={TINY}", "train.num_workers=2", "train.cpus_per_worker=0.5",
        f"train.steps={steps}", "train.batch_size=16", "train.lr=2e-3", "train.log_every=2", "train.eval_every=10",
        "train.checkpoint_every=10", f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.uri={mlflow_uri(tmp_path)}", f"data.cache_dir={cache_dir}", *extra])
    result = train_driver(cfg, resume=resume, log=lambda _: None)
    assert result.steps == steps

    from mlflow.tracking import MlflowClient
    client = MlflowClient(cfg.tracking.uri)
    history = {t: {m.step: m.value for m in client.get_metric_history(result.run_id, f"weight/{t}")}
               for t in ("rotten_tomatoes", "bbc_news")}
    logged = sorted(history["rotten_tomatoes"])
    assert logged == list(range(2, steps + 1, 2)) and sorted(history["bbc_news"]) == logged
    for step in logged:  # weights sum to T = 2 at every logged step
        assert history["rotten_tomatoes"][step] + history["bbc_news"][step] == pytest.approx(2.0)
    return history


def test_gradcos_at_zero3_logs_moving_weights(zero3_run):
    """The session's ZeRO-3 run (2 workers, three tasks) trains with gradcos: gradients gathered from ZeRO-3
    shards on both ranks move the weights away from the prior (1, 1, 1), and they sum to 3 at every log step."""
    from mlflow.tracking import MlflowClient

    cfg, result, _ = zero3_run
    client = MlflowClient(cfg.tracking.uri)
    history = {t: dict((m.step, m.value) for m in client.get_metric_history(result.run_id, f"weight/{t}")) for t in cfg.tasks}
    assert sorted(history["bbc_news"]) == [2, 4, 6, 8, 10]
    for step in history["bbc_news"]:
        assert sum(h[step] for h in history.values()) == pytest.approx(3.0)
    assert any(abs(v - 1.0) > 1e-4 for h in history.values() for v in h.values()), history


@pytest.mark.slow  # default tier: gradcos at ZeRO-3 through the loop; DWA's arithmetic and state round trip by hand
def test_dwa_at_zero3_logs_moving_weights(tmp_path, cache_dir, ray_session):
    """DWA keeps the prior until a task has closed two loss windows (2 of its steps each: at least 4 draws),
    then follows the rank-averaged loss ratios."""
    history = _run(tmp_path, cache_dir, "train.zero_stage=3", "train.weighting=dwa", "train.weighting_options={window: 2}",
                   steps=16)
    assert history["bbc_news"][2] == 1.0 and history["rotten_tomatoes"][2] == 1.0, history  # 2 draws: no window closed
    assert any(abs(v - 1.0) > 1e-4 for v in history["bbc_news"].values()), history


@pytest.mark.slow  # default tier: state round trip (test_state_dict_round_trip_continues_exactly) and gradcos at ZeRO-3
def test_uncertainty_at_zero3_weighs_the_larger_loss_down_and_resumes(tmp_path, cache_dir, ray_session):
    options = ("train.zero_stage=3", "train.weighting=uncertainty", "train.weighting_options={lr: 0.1}")
    first = _run(tmp_path, cache_dir, *options, steps=10)
    # bbc_news (5 classes, loss ≈ 1.6) stays above rotten_tomatoes (2 classes, ≈ 0.69): smaller weight.
    assert first["bbc_news"][10] < 0.8 < 1.2 < first["rotten_tomatoes"][10], first
    # Resumed from the step-10 checkpoint, the log-variances continue where they were (a fresh start
    # would put both weights back near 1.0).
    again = _run(tmp_path, cache_dir, *options, steps=20, resume=True)
    assert again["bbc_news"][12] == pytest.approx(first["bbc_news"][10], abs=0.1), (first, again)
    assert again["bbc_news"][20] < 1.0 < again["rotten_tomatoes"][20], again


def test_clipping_acts_on_the_task_gradient_so_weights_are_not_cancelled(ray_session):
    """A step trains one task, and DeepSpeed clips the gradient of the weighted loss. The loop scales
    the threshold with the step's weight (`set_clip`), so each step's update is w · clip(g, c): at
    ZeRO 0, 2 and 3 the engine matches plain PyTorch doing exactly that, and a step weighted 0.25
    moves the model differently from one weighted 1 (with a fixed threshold both would be clipped to
    the same update, since the tiny threshold is far below either gradient norm). SGD keeps the check
    exact. All parameters are compared, heads included: at ZeRO-3 the head of the task not trained in
    step 2 must not move (without `clear_stale_grads` it is updated again with its step-1 gradient)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    def worker(config):
        import deepspeed
        import torch

        from pipeline.model.multitask import Head, build_model
        from pipeline.config import TrainConfig
        from pipeline.train.loop import clear_stale_grads, deepspeed_config, set_clip, skip_single_rank_allreduce

        heads = [Head("a", "classification", 2), Head("b", "classification", 3)]
        gen = torch.Generator().manual_seed(7)
        batches = [("a", 1.0, {"input_ids": torch.randint(1000, 2000, (4, 6), generator=gen),
                               "attention_mask": torch.ones(4, 6, dtype=torch.long), "labels": torch.tensor([0., 1., 0., 1.])}),
                   ("b", None, {"input_ids": torch.randint(1000, 2000, (4, 6), generator=gen),
                                "attention_mask": torch.ones(4, 6, dtype=torch.long), "labels": torch.tensor([0., 1., 2., 1.])})]
        clip = 0.01
        train = {"batch_size": 4, "grad_accum": 1, "offload_optimizer": False, "precision": "fp32", "clip_grad": clip,
                 "lr": 1e-3, "weight_decay": 0.0}

        def plain(w_b):
            torch.manual_seed(0)
            model = build_model("tiny-bert", heads).eval()
            opt = torch.optim.SGD(model.parameters(), lr=1.0)
            for task, w, batch in batches:
                w = w_b if w is None else w
                opt.zero_grad()
                _, loss = model(task, **batch)
                (w * loss).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip * w)
                opt.step()
            return torch.cat([p.detach().flatten() for p in model.parameters()])

        def engine_run(stage, w_b):
            torch.manual_seed(0)
            model = build_model("tiny-bert", heads)
            engine, optimizer, *_ = deepspeed.initialize(
                model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                config={**deepspeed_config(TrainConfig(**{**train, "zero_stage": stage}), 1), "zero_allow_untested_optimizer": True})
            skip_single_rank_allreduce(engine, 1, stage)  # as the training loop does (ZeRO-0, one rank)
            assert engine.enable_backward_allreduce == (stage != 0)
            engine.eval()
            for task, w, batch in batches:
                w = w_b if w is None else w
                set_clip(engine, optimizer, clip * w)
                _, loss = engine(task=task, **batch)
                engine.backward(w * loss)
                engine.step()
                if stage == 3:
                    clear_stale_grads(optimizer)
            with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
                return torch.cat([p.detach().flatten().clone() for p in model.parameters()])

        for stage in (0, 2, 3):
            full, quarter = engine_run(stage, 1.0), engine_run(stage, 0.25)
            d1 = (full - plain(1.0)).abs().max().item()
            assert d1 < 1e-6, f"stage {stage}: w=1 differs from plain PyTorch by {d1}"
            assert torch.allclose(quarter, plain(0.25), atol=1e-6), f"stage {stage}: w=0.25 differs from plain PyTorch"
            assert (full - quarter).abs().max().item() > 1e-5, f"stage {stage}: the weight had no effect"

    TorchTrainer(worker, scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5})).fit()


def test_famo_moves_weight_to_the_task_that_improves_least():
    import math as m

    w = make_weighting("famo", ["fast", "slow"], {"fast": 1, "slow": 1}, {"lr": 0.1, "decay": 0.0})
    w.observe_loss("fast", 2.0, 1)
    assert w.weights() == {"fast": 1.0, "slow": 1.0}  # static until every task has a loss
    w.observe_loss("slow", 1.0, 2)
    # z = (0.5, 0.5): w_t ∝ z_t / L_t = (0.25, 0.5), normalised to sum to 2
    assert w.weights() == pytest.approx({"fast": 2 / 3, "slow": 4 / 3})
    w.observe_loss("fast", 1.0, 3)  # δ_fast = log 2 − log 1; J_zᵀδ = z ⊙ (δ − z·δ) = (+δ/4, −δ/4)
    # Adam's first step moves each logit by lr against the sign of its gradient: ξ = (−0.1, +0.1)
    z_fast = 1 / (1 + m.exp(0.2))
    expected = {"fast": z_fast / 1.0, "slow": (1 - z_fast) / 1.0}
    total = sum(expected.values())
    assert w.weights() == pytest.approx({t: 2 * v / total for t, v in expected.items()}, rel=1e-6)
    assert w.weights()["slow"] > 1.0 > w.weights()["fast"]
    state = w.state_dict()
    again = make_weighting("famo", ["fast", "slow"], {"fast": 1, "slow": 1}, {"lr": 0.1, "decay": 0.0})
    again.load_state_dict(state)
    for x in (w, again):
        x.observe_loss("slow", 0.5, 4)
    assert again.weights() == w.weights()


def test_famo_decay_pulls_the_logits_back_to_the_prior_and_zero_weights_stay_zero():
    w = make_weighting("famo", ["a", "b", "c"], {"a": 2, "b": 1, "c": 0}, {"lr": 0.05, "decay": 1.0})
    for step, (task, loss) in enumerate([("a", 1.0), ("b", 1.0)] * 3 + [("a", 0.5)] + [("b", 1.0), ("a", 0.5)] * 200):
        w.observe_loss(task, loss, step)
    assert w.weights()["c"] == 0.0 and sum(w.weights().values()) == pytest.approx(3.0)
    z = w.z()  # with no improvement left, decay returns z to the prior's 2 : 1
    assert z["a"] / z["b"] == pytest.approx(2.0, rel=0.05)
