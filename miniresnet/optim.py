"""SGD with momentum, learning-rate schedules and gradient clipping."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from miniresnet.tracing import Tensor


class SGD:
    """Stochastic gradient descent with (Nesterov) momentum and weight decay, as in PyTorch.

    ``v ← μ v + (g + λ p)`` (``v = g + λ p`` on the first step), then ``p ← p − η v`` or, with
    ``nesterov=True``, ``p ← p − η (g + λ p + μ v)``.

    Parameters
    ----------
    params : iterable of Tensor
        Leaves with ``requires_grad=True`` (e.g. ``model.parameters()``).
    lr, momentum, weight_decay : float
    nesterov : bool
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 0.1, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        self.params = list(params)
        if not self.params:
            raise ValueError("SGD: got no parameters to optimise")
        for p in self.params:
            if not (isinstance(p, Tensor) and p.requires_grad and p.is_leaf):
                raise TypeError("SGD: parameters must be leaf Tensors with requires_grad=True")
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: lr={lr}, momentum={momentum} and weight_decay="
                             f"{weight_decay} must be non-negative")
        if nesterov and momentum == 0:
            raise ValueError("SGD: Nesterov momentum needs momentum > 0")
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.weight_decay = weight_decay
        self.steps = 0
        self.velocity: list = [None] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """Update every parameter that has a gradient."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad.raw
            w = p.raw
            if self.weight_decay:
                g = g + self.weight_decay * w
            if self.momentum:
                v = g if self.velocity[i] is None else self.momentum * self.velocity[i] + g
                self.velocity[i] = v
                g = g + self.momentum * v if self.nesterov else v
            p.data = w - self.lr * g
        self.steps += 1

    def state_dict(self) -> dict:
        """Hyper-parameters, step count and momentum buffers (backend arrays or None)."""
        state = {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov,
                 "weight_decay": self.weight_decay, "steps": self.steps}
        state.update({f"velocity.{i}": v for i, v in enumerate(self.velocity)})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (arrays are moved to each parameter's backend)."""
        from miniresnet.config import as_backend_array

        expected = {"lr", "momentum", "nesterov", "weight_decay", "steps"} | {
            f"velocity.{i}" for i in range(len(self.params))}
        if set(state) != expected:
            raise KeyError(
                f"SGD.load_state_dict: missing {sorted(expected - set(state))}, unexpected "
                f"{sorted(set(state) - expected)}"
            )
        self.lr, self.momentum = float(state["lr"]), float(state["momentum"])
        self.nesterov, self.weight_decay = bool(state["nesterov"]), float(state["weight_decay"])
        self.steps = int(state["steps"])
        for i, p in enumerate(self.params):
            v = state[f"velocity.{i}"]
            if v is not None:
                v = as_backend_array(v, backend=p.backend)
                if tuple(v.shape) != p.shape or v.dtype != p.dtype:
                    raise ValueError(
                        f"SGD.load_state_dict: velocity.{i} has shape {tuple(v.shape)} and dtype "
                        f"{v.dtype}; parameter {i} has {p.shape} and {p.dtype}"
                    )
            self.velocity[i] = v


# -- learning-rate schedules: pure functions of the epoch ---------------------------------------
def constant_schedule(lr: float) -> Callable[[int], float]:
    return lambda epoch: lr


def step_schedule(lr: float, milestones: Sequence[int], gamma: float = 0.1
                  ) -> Callable[[int], float]:
    """``lr · gamma^k`` with ``k`` the number of milestones ≤ epoch (He et al.: ÷10 twice)."""
    milestones = sorted(milestones)
    return lambda epoch: lr * gamma ** sum(1 for m in milestones if epoch >= m)


def cosine_schedule(lr: float, epochs: int, min_lr: float = 0.0) -> Callable[[int], float]:
    """Cosine annealing from ``lr`` at epoch 0 towards ``min_lr`` at ``epochs``."""
    if epochs < 1:
        raise ValueError(f"cosine_schedule: epochs must be >= 1, got {epochs}")
    return lambda epoch: min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


# -- gradient clipping --------------------------------------------------------------------------
def clip_grad_norm_(params: Iterable[Tensor], max_norm: float) -> float:
    """Scale all gradients together so that their global L2 norm is at most ``max_norm``;
    returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    xp = params[0].backend.xp
    total = math.sqrt(sum(float(xp.sum(p.grad.raw * p.grad.raw)) for p in params))
    if total > max_norm:
        scale = max_norm / (total + 1e-12)
        for p in params:
            p.grad = p.grad.raw * scale
    return total


def clip_grad_value_(params: Iterable[Tensor], clip_value: float) -> None:
    """Clamp every gradient entry to ``[-clip_value, clip_value]``."""
    for p in params:
        if p.grad is not None:
            xp = p.backend.xp
            p.grad = xp.clip(p.grad.raw, -clip_value, clip_value)
