"""SGD with momentum, learning-rate schedules and gradient clipping."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence

from miniresnet.tracing import Tensor, as_tensor


def check_real(where: str, name: str, value, *, positive: bool = False,
               below_one: bool = False) -> float:
    """``value`` as a float after checking that it is a finite real number ``>= 0`` (``> 0``
    with ``positive``; also ``< 1`` with ``below_one``); the errors name ``where`` and
    ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {value!r} "
                        f"({type(value).__name__})")
    v = float(value)
    if not (math.isfinite(v) and (v > 0 if positive else v >= 0) and (v < 1 or not below_one)):
        valid = ("a finite number " + ("> 0" if positive else ">= 0")
                 + (" and < 1" if below_one else ""))
        raise ValueError(f"{where}: {name} must be {valid}, got {value!r}")
    return v


def check_int(where: str, name: str, value, low: int) -> int:
    """``value`` after checking that it is an int (not a bool) ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be an int, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{where}: {name} must be >= {low}, got {value}")
    return int(value)


class SGD:
    """Stochastic gradient descent with (Nesterov) momentum and weight decay, as in PyTorch.

    ``v ← μ v + (g + λ p)`` (``v = g + λ p`` on the first step), then ``p ← p − η v`` or, with
    ``nesterov=True``, ``p ← p − η (g + λ p + μ v)``.

    Parameters
    ----------
    params : iterable of Tensor
        Leaves with ``requires_grad=True`` (e.g. ``model.parameters()``).
    lr : float
        Learning rate η, finite and ``>= 0`` (0 is allowed: warm-up schedules start there).
        Every later assignment to ``lr`` (e.g. by a schedule) is checked the same way.
    momentum : float
        μ in ``[0, 1)``.
    nesterov : bool
        Needs ``momentum > 0``.
    weight_decay : float
        λ, finite and ``>= 0``.

    Raises
    ------
    TypeError
        If a hyperparameter is not a real number (bools and strings included), or ``nesterov``
        is not a bool.
    ValueError
        If a hyperparameter is out of its range.
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 0.1, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        self.params = list(params)
        if not self.params:
            raise ValueError("SGD: got no parameters to optimise")
        for p in self.params:
            if not (isinstance(p, Tensor) and p.requires_grad and p.is_leaf):
                raise TypeError("SGD: parameters must be leaf Tensors with requires_grad=True")
        self.lr = lr
        self.momentum, self.nesterov, self.weight_decay = self._check(momentum, nesterov,
                                                                      weight_decay, "SGD")
        self.steps = 0
        self.velocity: list = [None] * len(self.params)

    @staticmethod
    def _check(momentum, nesterov, weight_decay, where: str) -> tuple[float, bool, float]:
        momentum = check_real(where, "momentum", momentum, below_one=True)
        weight_decay = check_real(where, "weight_decay", weight_decay)
        if not isinstance(nesterov, bool):
            raise TypeError(f"{where}: nesterov must be a bool, got {nesterov!r}")
        if nesterov and momentum == 0:
            raise ValueError(f"{where}: Nesterov momentum needs momentum > 0")
        return momentum, nesterov, weight_decay

    @property
    def lr(self) -> float:
        """The learning rate; assigning checks it is a finite number ``>= 0``."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = check_real("SGD", "lr", value)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """Update every parameter that has a gradient.

        Parameters and momentum buffers are replaced by new arrays, never written in place, so
        a reference to the old arrays is a snapshot (``fit`` relies on this to roll back)."""
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
        """Restore :meth:`state_dict` output (arrays are moved to each parameter's backend).

        Everything is checked, hyperparameters included, before anything changes."""
        from miniresnet.backend_choice import as_backend_array

        where = "SGD.load_state_dict"
        expected = {"lr", "momentum", "nesterov", "weight_decay", "steps"} | {
            f"velocity.{i}" for i in range(len(self.params))}
        if set(state) != expected:
            raise KeyError(
                f"{where}: missing {sorted(expected - set(state))}, unexpected "
                f"{sorted(set(state) - expected)}"
            )
        lr = check_real(where, "lr", state["lr"])
        hyper = self._check(state["momentum"], state["nesterov"], state["weight_decay"], where)
        steps = check_int(where, "steps", state["steps"], 0)
        velocity = []
        for i, p in enumerate(self.params):
            v = state[f"velocity.{i}"]
            if v is not None:
                v = as_backend_array(v, backend=p.backend)
                if tuple(v.shape) != p.shape or v.dtype != p.dtype:
                    raise ValueError(
                        f"{where}: velocity.{i} has shape {tuple(v.shape)} and dtype "
                        f"{v.dtype}; parameter {i} has {p.shape} and {p.dtype}"
                    )
            velocity.append(v)
        self.lr, (self.momentum, self.nesterov, self.weight_decay) = lr, hyper
        self.steps, self.velocity = steps, velocity


# -- learning-rate schedules: pure functions of the epoch ---------------------------------------
def constant_schedule(lr: float) -> Callable[[int], float]:
    lr = check_real("constant_schedule", "lr", lr)
    return lambda epoch: lr


def step_schedule(lr: float, milestones: Sequence[int], gamma: float = 0.1
                  ) -> Callable[[int], float]:
    """``lr · gamma^k`` with ``k`` the number of milestones ≤ epoch (He et al.: ÷10 twice)."""
    lr = check_real("step_schedule", "lr", lr)
    gamma = check_real("step_schedule", "gamma", gamma)
    milestones = sorted(check_int("step_schedule", "milestone", m, 0) for m in milestones)
    return lambda epoch: lr * gamma ** sum(1 for m in milestones if epoch >= m)


def cosine_schedule(lr: float, epochs: int, min_lr: float = 0.0) -> Callable[[int], float]:
    """Cosine annealing from ``lr`` at epoch 0 towards ``min_lr`` at ``epochs``."""
    lr = check_real("cosine_schedule", "lr", lr)
    min_lr = check_real("cosine_schedule", "min_lr", min_lr)
    epochs = check_int("cosine_schedule", "epochs", epochs, 1)
    return lambda epoch: min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


# -- gradient clipping --------------------------------------------------------------------------
def clip_grad_norm_(params: Iterable[Tensor], max_norm: float) -> float:
    """Scale all gradients together so that their global L2 norm is at most ``max_norm`` (a
    finite number > 0); returns the norm before clipping."""
    max_norm = check_real("clip_grad_norm_", "max_norm", max_norm, positive=True)
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    xp = params[0].backend.xp
    squares = sum(xp.sum(p.grad.raw * p.grad.raw) for p in params)  # one host transfer
    total = math.sqrt(as_tensor(squares).item())
    if total > max_norm:
        scale_grads_(params, max_norm / (total + 1e-12))
    return total


def scale_grads_(params: Iterable[Tensor], scale: float) -> None:
    """Multiply every gradient of ``params`` by ``scale`` (those without one are skipped)."""
    for p in params:
        if p.grad is not None:
            p.grad = p.grad.raw * scale


def clip_grad_value_(params: Iterable[Tensor], clip_value: float) -> None:
    """Clamp every gradient entry to ``[-clip_value, clip_value]`` (a finite number > 0)."""
    clip_value = check_real("clip_grad_value_", "clip_value", clip_value, positive=True)
    for p in params:
        if p.grad is not None:
            xp = p.backend.xp
            p.grad = xp.clip(p.grad.raw, -clip_value, clip_value)
