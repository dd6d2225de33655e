# The patch tried and not kept (README.md beside it): it was pipeline/train/allreduce.py.
"""ZeRO-0's gradient all-reduce, overlapped with the backward that produces the gradients.

DeepSpeed's ZeRO-0 reduces every gradient after the accumulation boundary's backward has finished, so the
all-reduce and the backward take turns. Here each bucket of gradients (in the order backward produces them)
starts its asynchronous all-reduce as soon as its last gradient is accumulated, while backward goes on with
the layers below; the boundary waits only for what is still in flight. The same idea as PyTorch DDP's
reducer, written here because DDP would wrap the model that DeepSpeed's engine already wraps. Measured on
CPU (gloo, 2 workers, short rows): docs/performance.md.

The result is DeepSpeed's: gradients averaged over ranks; a parameter the step did not reach (another task's
head) gets a zero gradient, as DeepSpeed gives it; sparse gradients (`sparse_embedding_grads`) go through
DeepSpeed's own sparse all-gather at the end.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

BUCKET_BYTES = 4 << 20
"""Gradient bytes per all-reduce. Small enough that the first buckets finish early in the backward, large
enough that gloo's per-call cost stays small."""


def reached_parameters(loss: torch.Tensor) -> set[int]:
    """ids of the parameters `loss.backward()` will accumulate a gradient into: the AccumulateGrad nodes of
    its autograd graph (what DDP's `find_unused_parameters` looks for)."""
    seen, reached, stack = set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            reached.add(id(variable))
        stack.extend(fn for fn, _ in node.next_functions)
    return reached


class OverlappedAllReduce:
    """Hooks every trained dense parameter; `arm(loss, key)` before the boundary's backward, `finish()` after it.

    Every rank must launch the same all-reduces in the same order: buckets go out in bucket order only, and the
    parameters a step reaches are the same on every rank (they train the same task with the same model). The
    graph walk that finds them runs once per `key` (the task) and is cached."""

    def __init__(self, module: torch.nn.Module, world: int, engine, bucket_bytes: int = BUCKET_BYTES):
        self.world, self.engine = world, engine
        self.params = [p for p in module.parameters() if p.requires_grad]
        sparse = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding) and m.sparse}
        dense = [p for p in self.params if id(p) not in sparse]
        self.sparse = [p for p in self.params if id(p) in sparse]
        self.buckets: list[list[torch.nn.Parameter]] = [[]]
        size = 0
        for p in reversed(dense):  # backward reaches the last registered layers first
            if size >= bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.reached_by: dict[str, set[int]] = {}
        self.armed = False
        for p in dense:
            p.register_post_accumulate_grad_hook(self._ready)

    def arm(self, loss: torch.Tensor, key: str) -> None:
        if key not in self.reached_by:
            self.reached_by[key] = reached_parameters(loss)
        reached = self.reached_by[key]
        self.send = [[p for p in bucket if id(p) in reached] for bucket in self.buckets]
        self.waiting = [len(ps) for ps in self.send]
        self.next, self.pending, self.armed = 0, [], True
        self._launch_ready()

    def _ready(self, p: torch.nn.Parameter) -> None:
        if not self.armed:
            return  # not the accumulation boundary: the gradient keeps accumulating locally
        b = self.bucket_of[id(p)]
        if b < self.next:
            raise RuntimeError(f"a gradient arrived after its bucket was all-reduced ({tuple(p.shape)}): the step "
                               "reached a parameter its task's first step did not; set train.overlap_allreduce=false")
        self.waiting[b] -= 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self.next < len(self.buckets) and self.waiting[self.next] == 0:
            grads = [p.grad for p in self.send[self.next]]
            if grads:
                flat = torch.cat([g.reshape(-1) for g in grads])
                flat.div_(self.world)
                self.pending.append((dist.all_reduce(flat, async_op=True), flat, grads))
            self.next += 1

    def finish(self) -> None:
        """After the boundary's backward: the sparse gradients, then wait for the buckets and write them back."""
        self.armed = False
        if self.next < len(self.buckets):
            raise RuntimeError("the backward did not reach every parameter its task's first step reached; "
                               "set train.overlap_allreduce=false")
        sparse = [p for p in self.sparse if p.grad is not None]
        import os
        if sparse and os.environ.get("GLOO_SPARSE"):
            for p in sparse:
                g = p.grad.coalesce() / self.world
                dist.all_reduce(g)
                p.grad = g
        elif sparse:
            from deepspeed.runtime.sparse_tensor import SparseTensor
            self.engine.buffered_allreduce_fallback(grads=[SparseTensor(p.grad) for p in sparse])
        for work, flat, grads in self.pending:
            work.wait()
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        self.pending = []
        for p in self.params:
            if p.grad is None:  # not reached this step: DeepSpeed's all-reduce gives it zeros too
                p.grad = torch.zeros_like(p)
