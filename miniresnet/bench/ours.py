"""Our side of each benchmark case: the timed call built from a :mod:`miniresnet.nn` model.

Each comparison library has a module of the same shape (:mod:`.torch_twin`,
:mod:`.autograd_twin`); their results are checked against these.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import miniresnet as mr
import miniresnet.functional as F
from miniresnet import nn
from miniresnet.bench.measure import Fn


def train_step(model: Any, x: np.ndarray, y: np.ndarray) -> Fn:
    """Forward, cross-entropy and backward of ``model`` on ``(x, y)``; the call returns the
    loss and the gradients of all parameters (in ``model.parameters()`` order)."""
    params = list(model.parameters())

    def step() -> list:
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return [loss.raw] + [p.grad.raw for p in params]

    return step


def block_jacobian(block: Any, weights: dict[str, np.ndarray], x: np.ndarray) -> Fn:
    """The exact dense Jacobian of ``block`` with respect to its input, at ``x``, with its
    parameters set to ``weights`` (host arrays: constants, not traced); the call returns
    ``[jacobian]``."""
    jac = mr.jacobian(lambda v: nn.functional_call(block, weights, v))
    return lambda: [jac(x)]
