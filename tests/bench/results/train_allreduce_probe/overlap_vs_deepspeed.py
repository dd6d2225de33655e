"""Probe (README.md beside it): the overlapped all-reduce patch vs DeepSpeed's ZeRO-0 all-reduce. It ran against
the uncommitted patch: allreduce_overlap.py as pipeline/train/allreduce.py, `overlap_allreduce()` in
pipeline/train/loop.py and its arm()/finish() calls in train_step. It does not run on the committed code.

    PYTHONPATH=. torchrun --nproc-per-node 2 overlap_vs_deepspeed.py overlap|ds    (BUCKET_MB=<MiB>, GLOO_SPARSE=1)
"""
import os, sys, time, torch, deepspeed
import torch.distributed as dist
torch.set_num_threads(1)
from pipeline.model.multitask import Head, build_model
from pipeline.config import TrainConfig
from pipeline.train.loop import deepspeed_config, sparse_embedding_grads, train_step, adamw, overlap_allreduce
from pipeline.train.weighting import make_weighting
import pipeline.train.allreduce as ar
deepspeed.init_distributed("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
variant = sys.argv[1]; steps = 40
if os.environ.get("BUCKET_MB"): ar.BUCKET_BYTES = int(float(os.environ["BUCKET_MB"]) * (1 << 20))
heads = [Head("sst2", "classification", 2), Head("other", "classification", 3)]
g = torch.Generator().manual_seed(rank)
def batch():
    L = 16
    return {"input_ids": torch.randint(1000, 29000, (16, L), generator=g), "attention_mask": torch.ones(16, L, dtype=torch.long),
            "labels": torch.randint(0, 2, (16,), generator=g).float()}
batches = [batch() for _ in range(steps)]
cfg = TrainConfig(zero_stage=0, batch_size=16, lr=1e-4, overlap_allreduce=(variant == "overlap"))
torch.manual_seed(0)
model = build_model("minilm-l6", heads, dropout=0.1)
w = make_weighting("static", ["sst2", "other"], {"sst2": 1.0, "other": 1.0}, {})
times = []
sparse_embedding_grads(model, cfg, world)
opt = adamw(model.param_groups(cfg.lr, cfg.weight_decay, {"sst2": 1.0, "other": 1.0}), cfg)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, world))
on = overlap_allreduce(engine, model, cfg, world)
print(variant, on, len(engine.overlapped_allreduce.buckets) if hasattr(engine, "overlapped_allreduce") else 0) if rank == 0 else None
it = iter(batches)
for s in range(steps):
    t = time.perf_counter(); train_step(engine, it, "sst2", w, 1); times.append(time.perf_counter() - t)
med = sorted(times[5:])[len(times[5:]) // 2]
if rank == 0: print(variant, os.environ.get("BUCKET_MB"), "median step ms", round(med * 1000, 1), "mean", round(1000 * sum(times[5:]) / len(times[5:]), 1))
