"""A gloo all-reduce between two processes of one thread each (the benchmark's 2-worker layout on 2 cores) of
22.7M values (MiniLM-L6's gradients) in fp32, bf16 and fp16, and what converting fp32 → bf16 → fp32 costs:
is bf16 communication worth it on this machine?

    python tests/bench/tools/gloo_allreduce.py

Results: tests/bench/results/train_fused_ab/README.md.
"""
import os, sys, time, torch, torch.distributed as dist, torch.multiprocessing as mp
def run(rank):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29544")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16):
        x = torch.randn(22_713_986).to(dtype)
        for _ in range(2): dist.all_reduce(x)
        dist.barrier(); t = time.perf_counter(); n = 10
        for _ in range(n): dist.all_reduce(x)
        dt = (time.perf_counter() - t) / n * 1000
        if rank == 0: print(dtype, f"{dt:.1f} ms per allreduce", flush=True)
    # the conversion cost, fp32 -> bf16 -> fp32
    g = torch.randn(22_713_986); t = time.perf_counter()
    for _ in range(10): h = g.to(torch.bfloat16); g.copy_(h)
    if rank == 0: print(f"convert both ways {(time.perf_counter()-t)/10*1000:.1f} ms")
    dist.destroy_process_group()
if __name__ == "__main__":
    mp.spawn(run, nprocs=2)
