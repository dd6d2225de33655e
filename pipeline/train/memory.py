"""What a rank actually holds: bytes of parameters, gradients and optimizer state, summed from the
tensors the DeepSpeed engine keeps (each storage counted once), next to the ZeRO paper's formulas.

Categories, first match wins (a storage shared by two is counted in the first):
  parameters   the model's parameter tensors; at ZeRO-3 their partitions (`ds_tensor`)
  gradients    `.grad` of parameters and of master copies; ZeRO's gradient buffers and partitions
  optimizer    the torch optimizer's state (Adam moments, step) and ZeRO's fp32 master partitions
"""

from __future__ import annotations

import resource
from typing import Any, Iterable

import torch

GRAD_WORDS = ("grad", "ipg")  # ZeRO attribute names of gradient buffers (averaged_gradients, ipg_buffer, ...)


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if s.nbytes() == 0 or t.device.type == "meta":
        return None
    return s.data_ptr(), s.nbytes()


def _tensors(value: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
        if value.grad is not None:
            yield value.grad
    elif depth < 3 and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, depth + 1)


def model_state_bytes(model: torch.nn.Module, optimizer) -> dict[str, int]:
    """Bytes this rank holds per category, by device ("cpu"/"cuda"): {"parameters": n, ..., "total": n}."""
    seen: set[int] = set()
    out = {"parameters": 0, "gradients": 0, "optimizer": 0}

    def add(category: str, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            key = _storage(t)
            if key is not None and key[0] not in seen:
                seen.add(key[0])
                out[category] += key[1]

    params = list(model.parameters())
    add("parameters", (getattr(p, "ds_tensor", p) for p in params))
    add("parameters", (p for p in params if not hasattr(p, "ds_tensor")))
    add("gradients", (p.grad for p in params if p.grad is not None))
    add("gradients", (p.ds_tensor.grad for p in params if hasattr(p, "ds_tensor") and p.ds_tensor.grad is not None))
    inner = getattr(optimizer, "optimizer", optimizer)  # a ZeRO / bf16 wrapper around the torch optimizer
    if inner is not optimizer:  # the wrapper's own buffers: gradients by name, the rest (fp32 masters) as optimizer
        for name, value in vars(optimizer).items():
            if any(w in name.lower() for w in GRAD_WORDS):
                add("gradients", _tensors(value))
        for group in getattr(inner, "param_groups", []):  # master partitions' .grad
            add("gradients", (p.grad for p in group["params"] if p.grad is not None))
    for state in getattr(inner, "state", {}).values():
        add("optimizer", _tensors(state))
    for group in getattr(inner, "param_groups", []):  # fp32 master copies the optimizer steps on
        add("optimizer", (p for p in group["params"]))
    if inner is not optimizer:
        for name, value in vars(optimizer).items():
            add("optimizer", _tensors(value))
    out["total"] = sum(out.values())
    return out


def zero_formula(psi: int, world: int, stage: int, precision: str) -> dict[str, float]:
    """Model-state bytes per rank (ZeRO paper, Adam). Mixed precision (bf16/fp16): 2Ψ parameters, 2Ψ
    gradients, 12Ψ optimizer (fp32 master + two moments). fp32: 4Ψ + 4Ψ + 8Ψ (the parameters are the
    master copy). Stage 1 partitions the optimizer state, 2 also gradients, 3 also parameters."""
    p, g, o = (2, 2, 12) if precision in ("bf16", "fp16") else (4, 4, 8)
    n = world
    parts = {"parameters": p * psi / (n if stage >= 3 else 1),
             "gradients": g * psi / (n if stage >= 2 else 1),
             "optimizer": o * psi / (n if stage >= 1 else 1)}
    parts["total"] = sum(parts.values())
    return parts


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
