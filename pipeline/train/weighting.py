"""Task-loss weighting, selectable per run (`train.weighting`): the configured static weights, or
weights that move during training. Pure torch/numpy; the training loop does every collective.

    weighting = make_weighting("dwa", tasks, static_weights, {"temperature": 2.0})
    engine.backward(weighting.weighted_loss(task, loss))  # w_t · L_t (uncertainty: Kendall's term)
    weighting.observe_grad(task, shared_grad)             # gradcos only: before engine.step()
    weighting.observe_loss(task, loss_averaged_over_ranks, step)
    weighting.weights()                                   # {task: w_t}, sums to T: logged as weight/<task>

Every method starts from the static weights w0 (normalised to sum to the number of tasks T, as
in mixing.py), keeps them as a prior, and reports weights that sum to T. Each optimizer step trains one
task t, so each method updates from that task's numbers only. Inputs are identical on every rank
(rank-averaged losses, reduced gradients), so every rank computes the same weights; `state_dict()`
goes into checkpoints, so a resumed run continues exactly.

static       w_t = w0_t. The loss is w0_t · L_t, exactly as without this module.
uncertainty  Kendall et al. 2018, one learned log-variance s_t per task (`UncertaintyWeights`,
             s_0 = 0). The task's loss becomes w0_t · (exp(-s_t) · L_t + s_t): the model's gradient is
             scaled by w0_t · exp(-s_t), and s_t minimises the same term — so exp(-s_t) → 1/L_t and
             noisier (larger-loss) tasks weigh less. One clear form for every task kind (no 0.5 factor
             for regression). s is trained by its own Adam (option `lr`) on the rank-averaged loss after
             each step; d/ds_t = w0_t · (1 - exp(-s_t) · L_t) needs only that scalar, so no ZeRO stage
             has to shard, gather or checkpoint a T-element parameter. Reported weights: w0_t · exp(-s_t)
             normalised to sum to T; the loss itself uses the unnormalised w0_t · exp(-s_t), as in the paper.
dwa          Dynamic Weight Average, Liu et al. 2019: w_t = T · w0_t·exp(r_t/τ) / Σ_s w0_s·exp(r_s/τ),
             r_t = L̄_t(k-1) / L̄_t(k-2), where L̄_t(k) is the mean loss of task t over its k-th window of
             `window` consecutive steps *of that task* (a step trains one task, so windows are counted
             per task, not in global steps). r_t = 1 until task t has two complete windows. τ = option
             `temperature`. Tasks whose loss falls more slowly get more weight.
gradcos      The paper's gradient-cosine adjustment: per task an EMA of its gradient on the
             shared parameter group, flattened, ḡ_t ← β·ḡ_t + (1-β)·g_t (the first one taken as is;
             g_t is the gradient of L_t itself — the step's multiplier is divided out). With
             S = Σ_s ḡ_s:  w_t = T · w0_t·max(eps, 1 + cos(ḡ_t, S)) / Σ_s w0_s·max(eps, 1 + cos(ḡ_s, S)).
             Tasks agreeing with the common direction weigh up to twice as much as orthogonal ones;
             conflicting ones (cosine near -1) down to `eps`. Static weights until every task with a
             positive weight has been seen. Options `beta`, `eps`.
famo         FAMO, Liu et al. 2023 (loss-only, O(1) per step): logits ξ with z = softmax(ξ), started at
             z = w0/T (zero-weight tasks stay at 0). The model descends Σ_t z_t · log L_t, whose gradient
             is Σ_t (z_t / L_t) ∇L_t, so w_t = T · (z_t / L_t) / Σ_s (z_s / L_s) with L_s each task's latest
             rank-averaged loss (static weights until every weighted task has been seen). After a step of
             task t, its log-loss improvement since its previous step δ_t = log L_t(before) − log L_t(now)
             (0 for the other tasks) moves ξ by Adam (option `lr`) on the gradient J_zᵀ δ + decay · (ξ − ξ0),
             J_z the softmax Jacobian: tasks improving fastest lose weight, the slowest gain it, and
             `decay` pulls the logits back toward the prior. (One task per step, so δ is per task, not per
             step of every task as in the paper.)
"""

from __future__ import annotations

import copy
import math
from typing import Mapping, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import WEIGHTING_OPTIONS
from pipeline.train.mixing import normalise_weights


class Weighting(Protocol):
    method: str
    needs_losses: bool  # the loop passes the rank-averaged loss of every step
    needs_grads: bool  # the loop passes the shared group's reduced gradient of every step

    def weight(self, task: str) -> float: ...
    def weights(self) -> dict[str, float]: ...
    def weighted_loss(self, task: str, loss: torch.Tensor) -> torch.Tensor: ...
    def grad_scale(self, task: str) -> float: ...  # what weighted_loss multiplies the task loss's gradient by
    def observe_loss(self, task: str, loss_value: float, step: int) -> None: ...
    def observe_grad(self, task: str, flat_grad: torch.Tensor) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def make_weighting(method: str, tasks: list[str], static_weights: Mapping[str, float],
                   options: Mapping[str, float] | None = None) -> Weighting:
    """`static_weights`: any non-negative weights (normalised here to sum to T; weights that already sum
    to T, like the driver's, are kept bit for bit). `options` override the method's defaults."""
    if method not in WEIGHTING_OPTIONS:
        raise ValueError(f"unknown weighting method {method!r}; use one of {', '.join(WEIGHTING_OPTIONS)}")
    unknown = set(options or {}) - set(WEIGHTING_OPTIONS[method])
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)} for weighting {method!r}; "
                         f"allowed: {', '.join(WEIGHTING_OPTIONS[method]) or 'none'}")
    prior = {t: static_weights[t] for t in tasks}
    if abs(sum(prior.values()) - len(prior)) > 1e-9 or any(w < 0 for w in prior.values()):
        prior = normalise_weights(prior)
    opts = {**WEIGHTING_OPTIONS[method], **(options or {})}
    if method == "uncertainty":
        return UncertaintyWeighting(prior, lr=opts["lr"])
    if method == "dwa":
        return DynamicWeightAverage(prior, temperature=opts["temperature"], window=int(opts["window"]))
    if method == "gradcos":
        return GradientCosine(prior, beta=opts["beta"], eps=opts["eps"])
    if method == "famo":
        return FastAdaptiveWeighting(prior, lr=opts["lr"], decay=opts["decay"])
    return StaticWeighting(prior)


def _check_state(obj, state: dict) -> None:
    if state["method"] != obj.method or list(state["tasks"]) != list(obj.prior):
        raise ValueError(f"checkpoint weighting {state['method']!r} on tasks {list(state['tasks'])} differs from "
                         f"the config's {obj.method!r} on {list(obj.prior)}")


class _CurrentWeights:
    """Methods whose loss is `current[task] · L`: the weights live in `self.current`."""
    current: dict[str, float]

    def weight(self, task: str) -> float:
        return self.current[task]

    def weights(self) -> dict[str, float]:
        return dict(self.current)

    def weighted_loss(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        return self.current[task] * loss

    def grad_scale(self, task: str) -> float:
        return self.current[task]


class StaticWeighting(_CurrentWeights):
    method, needs_losses, needs_grads = "static", False, False

    def __init__(self, prior: dict[str, float]):
        self.prior = self.current = prior  # never changes

    def observe_loss(self, task: str, loss_value: float, step: int) -> None:
        pass

    def observe_grad(self, task: str, flat_grad: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {"method": self.method, "tasks": list(self.prior)}

    def load_state_dict(self, state: dict) -> None:
        _check_state(self, state)


class UncertaintyWeights(nn.Module):
    """Kendall et al.'s learned log-variances s_t = log σ_t², one per task, starting at 0."""

    def __init__(self, num_tasks: int):
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(num_tasks, dtype=torch.float64))

    def forward(self, index: int, loss: torch.Tensor) -> torch.Tensor:
        """exp(-s_t) · L_t + s_t"""
        return torch.exp(-self.log_vars[index]) * loss + self.log_vars[index]


class UncertaintyWeighting:
    method, needs_losses, needs_grads = "uncertainty", True, False

    def __init__(self, prior: dict[str, float], lr: float):
        self.prior = prior
        self.index = {t: i for i, t in enumerate(prior)}
        self.module = UncertaintyWeights(len(prior))
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=lr)

    def _log_var(self, task: str) -> float:
        return float(self.module.log_vars.detach()[self.index[task]])

    def weight(self, task: str) -> float:
        return self.weights()[task]

    def weights(self) -> dict[str, float]:
        return normalise_weights({t: w * math.exp(-self._log_var(t)) for t, w in self.prior.items()})

    def weighted_loss(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        s = self._log_var(task)  # a constant here: s learns in observe_loss, from the rank-averaged loss
        return self.prior[task] * (math.exp(-s) * loss + s)

    def grad_scale(self, task: str) -> float:
        return self.prior[task] * math.exp(-self._log_var(task))

    def observe_loss(self, task: str, loss_value: float, step: int) -> None:
        if self.prior[task] <= 0:
            return
        self.optimizer.zero_grad()
        term = self.module(self.index[task], torch.tensor(loss_value, dtype=torch.float64))
        (self.prior[task] * term).backward()
        self.optimizer.step()

    def observe_grad(self, task: str, flat_grad: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {"method": self.method, "tasks": list(self.prior), "module": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        _check_state(self, state)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])


class DynamicWeightAverage(_CurrentWeights):
    method, needs_losses, needs_grads = "dwa", True, False

    def __init__(self, prior: dict[str, float], temperature: float, window: int):
        self.prior, self.temperature, self.window = prior, temperature, window
        self.open = {t: [] for t in prior}  # losses of each task's current window
        self.closed = {t: [] for t in prior}  # means of each task's last two complete windows, oldest first
        self.current = dict(prior)

    def observe_loss(self, task: str, loss_value: float, step: int) -> None:
        self.open[task].append(float(loss_value))
        if len(self.open[task]) == self.window:
            self.closed[task] = (self.closed[task] + [float(np.mean(self.open[task]))])[-2:]
            self.open[task] = []
            self._update()

    def _update(self) -> None:
        ratio = np.array([m[1] / m[0] if len(m) == 2 and m[0] > 0 else 1.0 for m in self.closed.values()])
        z = np.exp((ratio - ratio.max()) / self.temperature)  # a softmax, shifted against overflow
        self.current = normalise_weights({t: w * float(e) for (t, w), e in zip(self.prior.items(), z)})

    def observe_grad(self, task: str, flat_grad: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {"method": self.method, "tasks": list(self.prior), "open": {t: list(v) for t, v in self.open.items()},
                "closed": {t: list(v) for t, v in self.closed.items()}, "current": dict(self.current)}

    def load_state_dict(self, state: dict) -> None:
        _check_state(self, state)
        self.open = {t: list(v) for t, v in state["open"].items()}
        self.closed = {t: list(v) for t, v in state["closed"].items()}
        self.current = dict(state["current"])


class GradientCosine(_CurrentWeights):
    method, needs_losses, needs_grads = "gradcos", False, True

    def __init__(self, prior: dict[str, float], beta: float, eps: float):
        self.prior, self.beta, self.eps = prior, beta, eps
        self.ema: dict[str, torch.Tensor] = {}  # per task: EMA of its flattened shared-group gradient
        self.current = dict(prior)

    def observe_loss(self, task: str, loss_value: float, step: int) -> None:
        pass

    def observe_grad(self, task: str, flat_grad: torch.Tensor) -> None:
        """`flat_grad`: the shared group's gradient of this step's `weighted_loss(task, ...)`."""
        multiplier = self.current[task]
        if multiplier <= 0:  # a task weighted 0 has no gradient to learn from, and keeps weight 0
            return
        grad = flat_grad.detach().to(torch.float32) / multiplier
        ema = self.ema.get(task)
        self.ema[task] = grad.clone() if ema is None else ema.to(grad.device).mul_(self.beta).add_(grad, alpha=1 - self.beta)
        self._update()

    def _update(self) -> None:
        active = [t for t, w in self.prior.items() if w > 0]
        if any(t not in self.ema for t in active):
            return
        total = torch.stack([self.ema[t] for t in active]).sum(0)
        cosine = {t: float(F.cosine_similarity(self.ema[t], total, dim=0, eps=1e-12)) for t in active}
        self.current = normalise_weights({t: w * max(self.eps, 1.0 + cosine.get(t, 0.0)) for t, w in self.prior.items()})

    def state_dict(self) -> dict:
        return {"method": self.method, "tasks": list(self.prior), "ema": {t: g.cpu() for t, g in self.ema.items()},
                "current": dict(self.current)}

    def load_state_dict(self, state: dict) -> None:
        _check_state(self, state)
        self.ema = {t: g.clone() for t, g in state["ema"].items()}
        self.current = dict(state["current"])


class FastAdaptiveWeighting(_CurrentWeights):
    method, needs_losses, needs_grads = "famo", True, False

    def __init__(self, prior: dict[str, float], lr: float, decay: float):
        self.prior, self.decay = prior, decay
        self.active = [t for t, w in prior.items() if w > 0]
        start = torch.tensor([math.log(prior[t] / len(prior)) for t in self.active], dtype=torch.float64)
        self.logits = nn.Parameter(start.clone())
        self.start = start
        self.optimizer = torch.optim.Adam([self.logits], lr=lr)
        self.log_loss: dict[str, float] = {}  # each task's latest log-loss
        self.current = dict(prior)

    def z(self) -> dict[str, float]:
        return dict(zip(self.active, torch.softmax(self.logits.detach(), 0).tolist()))

    def observe_loss(self, task: str, loss_value: float, step: int) -> None:
        if task not in self.active:
            return
        now = math.log(max(loss_value, 1e-8))
        before = self.log_loss.get(task)
        self.log_loss[task] = now
        if before is not None:
            delta = torch.zeros(len(self.active), dtype=torch.float64)
            delta[self.active.index(task)] = before - now
            z = torch.softmax(self.logits.detach(), 0)
            jacobian_t_delta = z * (delta - (z * delta).sum())  # J_zᵀ δ, J_z = diag(z) − z zᵀ
            self.optimizer.zero_grad()
            self.logits.grad = jacobian_t_delta + self.decay * (self.logits.detach() - self.start)
            self.optimizer.step()
        if all(t in self.log_loss for t in self.active):
            z = self.z()
            self.current = normalise_weights({t: (z[t] / math.exp(self.log_loss[t]) if t in z else 0.0)
                                              for t in self.prior})

    def observe_grad(self, task: str, flat_grad: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {"method": self.method, "tasks": list(self.prior), "logits": self.logits.detach().clone(),
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),  # a snapshot, not Adam's live tensors
                "log_loss": dict(self.log_loss), "current": dict(self.current)}

    def load_state_dict(self, state: dict) -> None:
        _check_state(self, state)
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.log_loss, self.current = dict(state["log_loss"]), dict(state["current"])
