"""Tools for checking derivative rules: :func:`check_grads` (finite differences, any order)
and, in :mod:`miniresnet.testing.strategies`, hypothesis strategies (needs ``hypothesis``).

Use them when you add a primitive::

    from miniresnet.testing import check_grads
    check_grads(my_op, x, order=2, modes=("fwd", "rev"))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from miniresnet import ops
from miniresnet.tracing import Tensor, as_tensor
from miniresnet.transforms import jvp, vjp

__all__ = ["check_grads", "numerical_jvp", "relative_error"]


def _random_like(x: Tensor, rng: np.random.Generator) -> Tensor:
    """Normal numbers drawn on the host, with ``x``'s shape, dtype and backend (device)."""
    be = x.backend
    return as_tensor(be.asarray(rng.standard_normal(x.shape).astype(be.dtype_name(x.dtype))))


def _flat(outputs) -> Tensor:
    """One flat tensor from an array or a tuple of arrays."""
    if isinstance(outputs, (tuple, list)):
        return ops.concat([ops.reshape(as_tensor(o), (-1,)) for o in outputs], 0)
    return ops.reshape(as_tensor(outputs), (-1,))


def _inner(a, b) -> float:
    return float(ops.sum(_flat(a) * _flat(b)).item())


def numerical_jvp(f: Callable, args: Sequence, tangents: Sequence, eps: float = 1e-6) -> Tensor:
    """Central finite difference ``(f(x + eps v) - f(x - eps v)) / (2 eps)``, flattened."""
    plus = f(*(as_tensor(a) + eps * t for a, t in zip(args, tangents)))
    minus = f(*(as_tensor(a) - eps * t for a, t in zip(args, tangents)))
    return (_flat(plus) - _flat(minus)) * (1.0 / (2 * eps))


def relative_error(a, b) -> float:
    """``max|a - b| / max(max|b|, tiny)`` on host NumPy copies."""
    a = np.asarray(as_tensor(a).numpy(), dtype=np.float64)
    b = np.asarray(as_tensor(b).numpy(), dtype=np.float64)
    scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-300)
    return float(np.max(np.abs(a - b), initial=0.0)) / scale


def check_grads(f: Callable, *args, order: int = 2, modes: Sequence[str] = ("fwd", "rev"),
                eps: float = 1e-6, rtol: float = 1e-5, atol: float = 1e-7, seed: int = 0) -> None:
    """Check ``f``'s derivatives of orders 1..``order`` against central finite differences.

    For random directions ``v`` (inputs) and ``u`` (outputs) it checks ``<u, J v>`` computed by
    reverse mode (``<vjp(u), v>``) and forward mode (``<u, jvp(v)>``) against ``<u, numeric J
    v>``; then it recurses on the maps ``(x, u) -> vjp(u)`` and ``(x, v) -> jvp(v)``, which
    checks the derivative rules' own derivatives.

    Parameters
    ----------
    f : callable
        Takes the arrays ``args`` and returns an array (or tuple of arrays); float64 advised.
    order : int
        Highest derivative order to check.
    modes : sequence of {"fwd", "rev"}
    eps, rtol, atol : float
        Finite-difference step and the tolerance ``|a - b| <= atol + rtol * |b|``.

    Raises
    ------
    AssertionError
        Naming the mode, the order and both values when a check fails.
    """
    _check(f, [as_tensor(a) for a in args], order, tuple(modes), eps, rtol, atol,
           np.random.default_rng(seed), 1)


def _check(f, args, order, modes, eps, rtol, atol, rng, level) -> None:
    if order < 1:
        return
    v = [_random_like(a, rng) for a in args]
    out = f(*args)
    u = [_random_like(as_tensor(o), rng) for o in (out if isinstance(out, (tuple, list)) else
                                                     (out,))]
    u_struct = u if isinstance(out, (tuple, list)) else u[0]
    numeric = _inner(u_struct, numerical_jvp(f, args, v, eps))

    def compare(mode, value):
        if not abs(value - numeric) <= atol + rtol * abs(numeric):
            raise AssertionError(
                f"check_grads: order-{level} {mode}-mode derivative disagrees with finite "
                f"differences: {value!r} vs {numeric!r} (eps={eps})"
            )

    single = not isinstance(out, (tuple, list))
    if "rev" in modes:
        def pullback(*xs_and_u):
            xs, us = xs_and_u[: len(args)], xs_and_u[len(args):]
            _, fn = vjp(lambda *a: _flat(f(*a)), *xs)
            return fn(_flat(us[0] if single else us))

        compare("reverse", _inner(pullback(*args, *u), v))
        _check(pullback, args + u, order - 1, modes, eps, rtol, atol, rng, level + 1)
    if "fwd" in modes:
        def pushforward(*xs_and_v):
            xs, vs = xs_and_v[: len(args)], xs_and_v[len(args):]
            return jvp(lambda *a: _flat(f(*a)), tuple(xs), tuple(vs))[1]

        compare("forward", _inner(u_struct, pushforward(*args, *v)))
        _check(pushforward, args + v, order - 1, modes, eps, rtol, atol, rng, level + 1)
