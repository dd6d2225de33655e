"""One AdamW step over MiniLM-L6's parameter list (105 tensors, 22.7M parameters, random gradients): torch's CPU
default (a per-parameter loop), `foreach=True` and `fused=True`, twice each, in ms per step.

    python tests/bench/tools/adamw_step.py 2    # intra-op threads (2: one process on 2 cores; 1: a worker of 2)

Results: tests/bench/results/train_fused_ab/README.md.
"""
import time, sys, torch
torch.manual_seed(0)
threads = int(sys.argv[1]); torch.set_num_threads(threads)
# MiniLM-L6-sized parameter list: embeddings + 6 layers x 16 tensors + pooler/head
shapes = [(30522, 384), (512, 384), (2, 384), (384,), (384,)]
for _ in range(6):
    shapes += [(384, 384), (384,)] * 4 + [(384,), (384,), (1536, 384), (1536,), (384, 1536), (384,), (384,), (384,)]
shapes += [(384, 384), (384,), (2, 384), (2,)]
def run(**kw):
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in ps: p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW([{"params": ps[:50], "weight_decay": 0.01}, {"params": ps[50:], "weight_decay": 0.0}], lr=1e-4, **kw)
    for _ in range(3): opt.step()
    t = time.perf_counter(); n = 20
    for _ in range(n): opt.step()
    return (time.perf_counter() - t) / n * 1000
print("params", sum(torch.Size(s).numel() for s in shapes), "tensors", len(shapes))
for rep in range(2):
    for name, kw in [("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})]:
        print(threads, "threads", name, f"{run(**kw):.1f} ms/step")
