"""Batch norm's statistics as primitives: ``standardize``, ``inv_std``, ``standardize_affine``
and ``standardize_affine_grad``, each forward beside its derivative rules, with their checked
wrappers.

The forwards are the backend's batch-norm hooks (``batch_stats``, ``standardize_affine`` and
``standardize_affine_grad`` of :class:`~miniresnet.backends.Backend`, reached through
``backend_of``), so that a backend may run them as compiled kernels; the derivative rules here
are the same for every backend.

They sit above :mod:`miniresnet.transforms` because one rule (the derivative in ``x`` of
``standardize_affine_grad``) is a nested transform of the composed expression. ``axis`` holds
negative axes, so that stacked cotangents (extra leading axes) broadcast. Each forward saves the
statistics it computed (``"mean"``, ``"var"``, ``"inv"``, ``"xhat"``, with the input array; see
Primitive's ``saves``); the rules hand them back as ``reuse`` to the primitives they bind on the
same input, which then skip recomputing them, and :func:`standardize_with_stats` and
:func:`standardize_affine_with_stats` return the mean and variance for running statistics.
"""

from __future__ import annotations

import math
from typing import Any

from miniresnet import ops
from miniresnet.backends import backend_of, keepdims_shape
from miniresnet.ops import _axes, _check_dtypes
from miniresnet.primitives import batch_ndim
from miniresnet.tracing import Primitive, Tensor, as_tensor, bind, bind_saving
from miniresnet.transforms import jvp, vjp


def _stats(x, axis, eps, reuse):
    """The batch statistics of ``x`` over ``axis`` (``reuse`` itself if it holds them for this
    very ``x``), computed by ``x``'s backend (:meth:`~miniresnet.backends.Backend.batch_stats`)
    and tagged with the input they belong to."""
    if reuse is not None and reuse["input"] is x:
        return reuse
    stats = backend_of(x).batch_stats(x, axis, eps)
    stats["input"] = x
    return stats


def _statistic(name: str):
    """The impl of a primitive whose result is the statistic ``name``, saving them all."""
    def impl(xp, x, axis, eps, reuse=None):
        stats = _stats(x, axis, eps, reuse)
        return stats[name], stats

    return impl


# -- standardize(x) = (x - mean(x)) · inv_std(x) ------------------------------------------------
# Its Jacobian is symmetric, so one rule serves as VJP and JVP: batch norm's closed-form backward
# g -> inv · (g - mean(g) - x^ mean(g x^)).
def _standardize_rule(g, ans, x, axis, eps, saved):
    inv = inv_std(x, axis, eps, reuse=saved)
    return (g - ops.mean(g, axis, keepdims=True)
            - ans * ops.mean(g * ans, axis, keepdims=True)) * inv


standardize_p = Primitive("standardize", _statistic("xhat"),
    vjp=(_standardize_rule,), jvp=(_standardize_rule,), saves=True, reuses=True)


# -- inv_std(x) = 1 / sqrt(var(x) + eps), with kept dimensions ----------------------------------
def _inv_std_vjp(g, ans, x, axis, eps, saved):
    count = math.prod(x.shape[a] for a in axis)
    return (g * (ans * ans) * (-1.0 / count)) * standardize(x, axis, eps, reuse=saved)


def _inv_std_jvp(t, ans, x, axis, eps, saved):
    return -(ans * ans) * ops.mean(t * standardize(x, axis, eps, reuse=saved), axis, keepdims=True)


inv_std_p = Primitive("inv_std", _statistic("inv"),
    vjp=(_inv_std_vjp,), jvp=(_inv_std_jvp,), saves=True, reuses=True)


# -- standardize_affine(x, w, b) = standardize(x) · w + b: batch norm in training mode ---------
# w and b hold one value per channel. The Jacobian in x is w · J_standardize, symmetric, so the
# VJP and the JVP in x are the same map, standardize_affine_grad below.
def _standardize_affine_impl(xp, x, w, b, axis, eps, reuse=None):
    stats = reuse if reuse is not None and reuse["input"] is x else None
    out, stats = backend_of(x).standardize_affine(x, w, b, axis, eps, stats)
    stats["input"] = x
    return out, stats


def _channels(t, arg, x, axis):
    """A per-channel stack ``t`` (batch + (C,)) reshaped to broadcast against ``x``."""
    return ops.reshape(t, t.shape[:batch_ndim(t, arg)] + keepdims_shape(x.shape, axis))


standardize_affine_p = Primitive("standardize_affine", _standardize_affine_impl,
    vjp=(lambda g, ans, x, w, b, axis, eps, saved:
             standardize_affine_grad(g, x, w, axis, eps, reuse=saved),
         lambda g, ans, x, w, b, axis, eps, saved:
             ops.sum(g * standardize(x, axis, eps, reuse=saved), axis),
         lambda g, ans, x, w, b, axis, eps, saved: ops.sum(g, axis)),
    jvp=(lambda t, ans, x, w, b, axis, eps, saved:
             standardize_affine_grad(t, x, w, axis, eps, reuse=saved),
         lambda t, ans, x, w, b, axis, eps, saved:
             _channels(t, w, x, axis) * standardize(x, axis, eps, reuse=saved),
         lambda t, ans, x, w, b, axis, eps, saved:
             ops.broadcast_to(_channels(t, b, x, axis), t.shape[:batch_ndim(t, b)] + ans.shape)),
    saves=True, reuses=True)


# -- standardize_affine_grad(g, x, w) = w inv (g - mean(g) - x^ mean(g x^)) ---------------------
# A primitive for its few-pass forward. Linear in g and in w (closed-form rules); in x, the
# derivative of the same expression written with other primitives, by a nested transform.
def _standardize_affine_grad_impl(xp, g, x, w, axis, eps, reuse=None):
    stats = _stats(x, axis, eps, reuse)
    return backend_of(x).standardize_affine_grad(g, w, stats, axis), stats


def _affine_grad_composed(g, x, w, axis, eps, saved):
    """standardize_affine_grad written with other primitives (differentiable in x)."""
    xhat = standardize(x, axis, eps, reuse=saved)
    scale = ops.reshape(w, keepdims_shape(x.shape, axis)) * inv_std(x, axis, eps, reuse=saved)
    return scale * (g - ops.mean(g, axis, keepdims=True)
                    - xhat * ops.mean(g * xhat, axis, keepdims=True))


def _affine_grad_vjp_x(h, ans, g, x, w, axis, eps, saved):
    _, pull = vjp(lambda xx: _affine_grad_composed(g, xx, w, axis, eps, saved), x)
    return as_tensor(pull(h)[0])


def _affine_grad_jvp_x(t, ans, g, x, w, axis, eps, saved):
    return as_tensor(
        jvp(lambda xx: _affine_grad_composed(g, xx, w, axis, eps, saved), (x,), (t,))[1])


def _affine_grad_vjp_w(h, ans, g, x, w, axis, eps, saved):
    unit = standardize_affine_grad(g, x, ops.ones_like(w), axis, eps, reuse=saved)
    r = ops.sum(h * unit, axis)  # batch + g's stack axes + channel
    stack = g.ndim - x.ndim  # g's own leading axes: summed (w has none)
    first = h.ndim - ans.ndim
    return ops.sum(r, tuple(range(first, first + stack))) if stack else r


def _affine_grad_jvp_w(t, ans, g, x, w, axis, eps, saved):
    n = batch_ndim(t, w)
    if not n:
        return standardize_affine_grad(g, x, t, axis, eps, reuse=saved)
    unit = standardize_affine_grad(g, x, ops.ones_like(w), axis, eps, reuse=saved)
    keep = (1,) * (g.ndim - x.ndim) + keepdims_shape(x.shape, axis)
    return ops.reshape(t, t.shape[:n] + keep) * unit


standardize_affine_grad_p = Primitive("standardize_affine_grad", _standardize_affine_grad_impl,
    vjp=(lambda h, ans, g, x, w, axis, eps, saved:
             standardize_affine_grad(h, x, w, axis, eps, reuse=saved),
         _affine_grad_vjp_x,
         _affine_grad_vjp_w),
    jvp=(lambda t, ans, g, x, w, axis, eps, saved:
             standardize_affine_grad(t, x, w, axis, eps, reuse=saved),
         _affine_grad_jvp_x,
         _affine_grad_jvp_w),
    saves=True, reuses=True)

PRIMITIVES = {p.name: p for p in (standardize_p, inv_std_p, standardize_affine_p,
                                  standardize_affine_grad_p)}


# -- the checked operations ---------------------------------------------------------------------
def _negative_axes(name: str, x: Tensor, axis) -> tuple[int, ...]:
    return tuple(a - x.ndim for a in _axes(name, axis, x.ndim))


def _raw_stats(saved) -> tuple:
    return saved["mean"], saved["var"]


def standardize(x, axis, eps: float = 1e-5, *, reuse=None) -> Tensor:
    """``(x - mean(x)) / sqrt(var(x) + eps)`` with the statistics over ``axis`` (biased
    variance), as batch norm computes it in training mode. ``reuse``: the ``saved`` statistics
    of one of this module's primitives on the same ``x`` (a derivative rule passes them), to
    skip recomputing them; it does not change the result."""
    x = as_tensor(x)
    axis = _negative_axes("standardize", x, axis)
    return bind(standardize_p, x, axis=axis, eps=float(eps), reuse=reuse)


def standardize_with_stats(x, axis, eps: float = 1e-5) -> tuple[Tensor, Any, Any]:
    """:func:`standardize` and the batch ``mean`` and (biased) ``var`` it computed, with kept
    dimensions, as backend arrays (constants: no derivative flows through them), for e.g.
    running averages."""
    x = as_tensor(x)
    axis = _negative_axes("standardize", x, axis)
    out, saved = bind_saving(standardize_p, (x,), {"axis": axis, "eps": float(eps)})
    return (out, *_raw_stats(saved))


def inv_std(x, axis, eps: float = 1e-5, *, reuse=None) -> Tensor:
    """``1 / sqrt(var(x) + eps)`` over ``axis`` (biased variance), with kept dimensions;
    ``reuse`` as in :func:`standardize`."""
    x = as_tensor(x)
    axis = _negative_axes("inv_std", x, axis)
    return bind(inv_std_p, x, axis=axis, eps=float(eps), reuse=reuse)


def _channel_param(name: str, what: str, p, x: Tensor, axis) -> Tensor:
    p = as_tensor(p)
    want = tuple(d for i, d in enumerate(x.shape) if i not in axis)
    if p.shape != want:
        raise ValueError(
            f"{name}: {what} must have shape {want} (one value per channel of x {x.shape}), got "
            f"{p.shape}"
        )
    return p


def _affine_operands(x, weight, bias, axis):
    x = as_tensor(x)
    pos = _axes("standardize_affine", axis, x.ndim)
    weight = _channel_param("standardize_affine", "weight", weight, x, pos)
    bias = _channel_param("standardize_affine", "bias", bias, x, pos)
    _check_dtypes("standardize_affine", (x, weight, bias))
    return (x, weight, bias), tuple(a - x.ndim for a in pos)


def standardize_affine(x, weight, bias, axis, eps: float = 1e-5) -> Tensor:
    """``standardize(x, axis, eps) * weight + bias`` as one primitive (batch norm in training
    mode); ``weight`` and ``bias`` have one value per channel: ``x``'s shape without the
    ``axis`` axes (``(C,)`` for ``axis=(0, 2, 3)``)."""
    args, axis = _affine_operands(x, weight, bias, axis)
    return bind(standardize_affine_p, *args, axis=axis, eps=float(eps))


def standardize_affine_with_stats(x, weight, bias, axis, eps: float = 1e-5
                                  ) -> tuple[Tensor, Any, Any]:
    """:func:`standardize_affine` and the batch ``mean`` and ``var`` it computed, as in
    :func:`standardize_with_stats`."""
    args, axis = _affine_operands(x, weight, bias, axis)
    out, saved = bind_saving(standardize_affine_p, args, {"axis": axis, "eps": float(eps)})
    return (out, *_raw_stats(saved))


def standardize_affine_grad(g, x, weight, axis, eps: float = 1e-5, *, reuse=None) -> Tensor:
    """The derivative of :func:`standardize_affine` in ``x`` applied to ``g`` (its VJP and its
    JVP: the Jacobian is symmetric), ``weight * inv_std(x) * (g - mean(g) - x^ mean(g x^))``
    with ``x^ = standardize(x)``; ``g`` may carry leading batch axes. ``reuse`` as in
    :func:`standardize`."""
    g, x = as_tensor(g), as_tensor(x)
    pos = _axes("standardize_affine_grad", axis, x.ndim)
    weight = _channel_param("standardize_affine_grad", "weight", weight, x, pos)
    if g.shape[g.ndim - x.ndim:] != x.shape:
        raise ValueError(
            f"standardize_affine_grad: g of shape {g.shape} must end with x's shape {x.shape}"
        )
    _check_dtypes("standardize_affine_grad", (g, x, weight))
    return bind(standardize_affine_grad_p, g, x, weight, axis=tuple(a - x.ndim for a in pos),
                eps=float(eps), reuse=reuse)


__all__ = ["inv_std", "standardize", "standardize_affine", "standardize_affine_grad",
           "standardize_affine_with_stats", "standardize_with_stats"]
