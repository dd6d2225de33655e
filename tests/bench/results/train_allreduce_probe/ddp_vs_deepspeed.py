"""Probe (tests/bench/results/train_allreduce_probe/README.md): PyTorch DDP vs the project's DeepSpeed ZeRO-0 path.

    PYTHONPATH=. torchrun --nproc-per-node 2 tests/bench/results/train_allreduce_probe/ddp_vs_deepspeed.py ds|ds_dense|ddp|ddp_sparse

Environment: CLIP=<threshold> (default 1.0), CLIP_TORCH=1 (torch's clip_grad_norm_ before engine.step, with CLIP=0).
"""
import os, sys, time, torch, deepspeed
import torch.distributed as dist
torch.set_num_threads(1)
from pipeline.model.multitask import Head, build_model
from pipeline.config import TrainConfig
from pipeline.train.loop import deepspeed_config, sparse_embedding_grads, train_step, adamw, densify_grads
from pipeline.train.weighting import make_weighting
deepspeed.init_distributed("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
variant = sys.argv[1]; steps = 40
heads = [Head("sst2", "classification", 2)]
g = torch.Generator().manual_seed(rank)
def batch():
    L = 16
    return {"input_ids": torch.randint(1000, 29000, (16, L), generator=g), "attention_mask": torch.ones(16, L, dtype=torch.long),
            "labels": torch.randint(0, 2, (16,), generator=g).float()}
batches = [batch() for _ in range(steps)]
cfg = TrainConfig(zero_stage=0, batch_size=16, lr=1e-4, clip_grad=float(os.environ.get("CLIP", 1.0)), sparse_embedding_grads=(variant != "ds_dense" and variant != "ddp"))
torch.manual_seed(0)
model = build_model("minilm-l6", heads, dropout=0.1)
w = make_weighting("static", ["sst2"], {"sst2": 1.0}, {})
times = []
if variant.startswith("ds"):
    sparse_embedding_grads(model, cfg, world)
    opt = adamw(model.param_groups(cfg.lr, cfg.weight_decay, {"sst2": 1.0}), cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, world))
    if os.environ.get("CLIP_TORCH"):
        _step = engine.step
        params = [p for p in model.parameters() if p.requires_grad]
        def step(*a, **k):
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            return _step(*a, **k)
        engine.step = step
    it = iter(batches)
    for s in range(steps):
        t = time.perf_counter(); train_step(engine, it, "sst2", w, 1); times.append(time.perf_counter() - t)
else:
    if variant == "ddp_sparse":
        model.backbone.get_input_embeddings().sparse = True
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=int(os.environ.get("BUCKET", 25)))
    opt = adamw(model.param_groups(cfg.lr, cfg.weight_decay, {"sst2": 1.0}), cfg)
    for b in batches:
        t = time.perf_counter()
        _, loss = ddp(task="sst2", **b); loss.backward()
        densify_grads(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
med = sorted(times[5:])[len(times[5:]) // 2]
if rank == 0: print(variant, "median step ms", round(med * 1000, 1), "mean", round(1000 * sum(times[5:]) / len(times[5:]), 1))
