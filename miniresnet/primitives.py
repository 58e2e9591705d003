"""The primitive table: every primitive's forward beside its derivative rules.

Each entry gives

* the forward ``impl(xp, *raw_args, **params)`` in the array-API namespace ``xp`` (backend-
  specific kernels are reached through ``backend_of(array)`` and live in ``backends/``);
* one VJP rule per argument, ``(g, ans, *args, **params) -> cotangent``;
* one JVP rule per argument, ``(t, ans, *args, **params) -> tangent``, or ``"linear"`` when the
  primitive is linear in each argument and its forward takes extra leading axes in each (then
  the JVP is the primitive applied to the tangent: ``neg``, ``astype``, ``im2col``, ``col2im``).

Rules are written with miniresnet's own operations (Tensor operators and :mod:`miniresnet.ops`),
never with raw arrays, so they are differentiable: derivatives of any order come for free.
VJP rules accept a cotangent with extra leading *batch* axes (shape ``batch + ans.shape``) and
return ``batch + arg.shape``; ``batch_ndim(g, ans)`` is the number of such axes. JVP rules
likewise accept a tangent of shape ``batch + arg.shape`` and return ``batch + ans.shape``
(``batch_ndim(t, arg)`` axes). This is what lets one reverse pass carry a whole stack of
cotangents and one forward pass a whole stack of tangents (exact Jacobians in a few passes).
The linear maps whose forward fixes the rank of an argument (reshape, transpose, sum, matmul,
conv...) apply themselves to a stack with shifted parameters, or fold the stack into an axis
they already map independently (a conv's filters or channels), as their VJP rules do for
cotangents.

Elementwise primitives see operands of one shape: :mod:`miniresnet.ops` broadcasts explicitly
with the ``broadcast_to`` primitive, whose VJP is the matching un-broadcast (a sum).

The table is grouped by family (elementwise, reductions, shape and indexing, linear algebra,
convolution), each family's helpers just above its entries. ``add`` is defined by
:mod:`miniresnet.tracing`, which sums cotangents with it; batch norm's statistics are in
:mod:`miniresnet.normalization`, above the transforms, because one of their rules is a nested
transform. :mod:`miniresnet.ops` (checked wrappers) and this table import each other: the one
declared cycle of the engine (rules are written with ops; ops bind these primitives).
"""

from __future__ import annotations

import math

from miniresnet import ops, tracing
from miniresnet.backends import backend_of, keepdims_shape
from miniresnet.tracing import Primitive

LINEAR = "linear"


def batch_ndim(g, ans) -> int:
    """Number of leading batch axes a cotangent carries beyond the primal output's axes."""
    return g.ndim - ans.ndim


def _mask(cond, like):
    """A constant 0/1 mask with ``like``'s dtype (no derivative flows through it)."""
    return ops.astype(cond, like.dtype)


def _expand(g, ans, x, axis, keepdims):
    """Reshape a reduction's cotangent so that it broadcasts against ``x`` (batch axes kept)."""
    lead = g.shape[: batch_ndim(g, ans)]
    return g if keepdims else ops.reshape(g, lead + keepdims_shape(x.shape, axis))


def _unbroadcast(g, x_shape, out_shape):
    """Sum ``g`` (shape ``batch + out_shape``) down to ``batch + x_shape``."""
    lead = g.ndim - len(out_shape)
    extra = len(out_shape) - len(x_shape)
    axes = tuple(range(lead, lead + extra)) + tuple(
        lead + extra + i for i, d in enumerate(x_shape) if d == 1 and out_shape[extra + i] != 1
    )
    if axes:
        g = ops.sum(g, axis=axes, keepdims=True)
    return ops.reshape(g, g.shape[:lead] + tuple(x_shape))


def _batched_index(g, ans, index):
    return (slice(None),) * batch_ndim(g, ans) + index


def _shifted(axes, n):
    return tuple(a + n for a in axes)


# == elementwise (operands of one shape: ops broadcasts explicitly) ==================
# fmt: off
add = tracing.add  # defined by the tracing core, which sums cotangents with it
sub = Primitive("sub", lambda xp, x, y: x - y,
    vjp=(lambda g, ans, x, y: g,
         lambda g, ans, x, y: -g),
    jvp=(lambda t, ans, x, y: t,
         lambda t, ans, x, y: -t))
mul = Primitive("mul", lambda xp, x, y: x * y,
    vjp=(lambda g, ans, x, y: g * y,
         lambda g, ans, x, y: g * x),
    jvp=(lambda t, ans, x, y: t * y,                      # (broadcasts over a stack of t)
         lambda t, ans, x, y: x * t))
div = Primitive("div", lambda xp, x, y: x / y,
    vjp=(lambda g, ans, x, y: g / y,
         lambda g, ans, x, y: -g * ans / y),
    jvp=(lambda t, ans, x, y: t / y,
         lambda t, ans, x, y: -t * ans / y))
neg = Primitive("neg", lambda xp, x: -x,
    vjp=(lambda g, ans, x: -g,),
    jvp=LINEAR)
power = Primitive("pow", lambda xp, x, p: x ** p,          # p: a Python scalar exponent
    vjp=(lambda g, ans, x, p: g * (p * x ** (p - 1)), None),
    jvp=(lambda t, ans, x, p: t * (p * x ** (p - 1)), None))
exp = Primitive("exp", lambda xp, x: xp.exp(x),
    vjp=(lambda g, ans, x: g * ans,),
    jvp=(lambda t, ans, x: t * ans,))
log = Primitive("log", lambda xp, x: xp.log(x),
    vjp=(lambda g, ans, x: g / x,),
    jvp=(lambda t, ans, x: t / x,))
sqrt = Primitive("sqrt", lambda xp, x: xp.sqrt(x),
    vjp=(lambda g, ans, x: g / (2.0 * ans),),
    jvp=(lambda t, ans, x: t / (2.0 * ans),))
tanh = Primitive("tanh", lambda xp, x: xp.tanh(x),
    vjp=(lambda g, ans, x: g * (1.0 - ans * ans),),
    jvp=(lambda t, ans, x: t * (1.0 - ans * ans),))
sigmoid = Primitive("sigmoid", lambda xp, x: 0.5 * (xp.tanh(0.5 * x) + 1.0),  # overflow-free
    vjp=(lambda g, ans, x: g * (ans * (1.0 - ans)),),
    jvp=(lambda t, ans, x: t * (ans * (1.0 - ans)),))
relu = Primitive("relu", lambda xp, x: xp.maximum(x, 0.0),  # d/dx = 0 at 0; relu(nan) = nan
    vjp=(lambda g, ans, x: g * _mask(ops.greater(ans, 0.0), ans),),  # a mask: fewer passes
    jvp=(lambda t, ans, x: t * _mask(ops.greater(ans, 0.0), ans),))
where = Primitive("where", lambda xp, c, x, y: xp.where(c, x, y),  # c: a boolean constant
    vjp=(None,
         lambda g, ans, c, x, y: ops.where(c, g, 0.0),
         lambda g, ans, c, x, y: ops.where(c, 0.0, g)),
    jvp=(None,
         lambda t, ans, c, x, y: ops.where(c, t, 0.0),
         lambda t, ans, c, x, y: ops.where(c, 0.0, t)))
astype = Primitive("astype", lambda xp, x, dtype: xp.astype(x, dtype),
    vjp=(lambda g, ans, x, dtype: ops.astype(g, x.dtype),),
    jvp=LINEAR)
# fmt: on


# == reductions (axis: a tuple of non-negative axes) ==================================
def _logsumexp_impl(xp, x, axis, keepdims):
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    out = xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else xp.reshape(
        out, tuple(d for i, d in enumerate(x.shape) if i not in axis))


def _max_weights(ans, x, axis, keepdims):
    """Where ``x`` attains its max, split evenly among ties (a constant)."""
    a = ans if keepdims else ops.reshape(ans, keepdims_shape(x.shape, axis))
    hit = _mask(ops.equal(x, a), x)
    return hit / ops.sum(hit, axis=axis, keepdims=True)


# fmt: off
sum_ = Primitive("sum", lambda xp, x, axis, keepdims: xp.sum(x, axis=axis, keepdims=keepdims),
    vjp=(lambda g, ans, x, axis, keepdims: ops.broadcast_to(
             _expand(g, ans, x, axis, keepdims), g.shape[:batch_ndim(g, ans)] + x.shape),),
    jvp=(lambda t, ans, x, axis, keepdims: ops.sum(t, _shifted(axis, batch_ndim(t, x)), keepdims),))
max_ = Primitive("max", lambda xp, x, axis, keepdims: xp.max(x, axis=axis, keepdims=keepdims),
    vjp=(lambda g, ans, x, axis, keepdims:
             _expand(g, ans, x, axis, keepdims) * _max_weights(ans, x, axis, keepdims),),
    jvp=(lambda t, ans, x, axis, keepdims: ops.sum(t * _max_weights(ans, x, axis, keepdims),
                                                 _shifted(axis, batch_ndim(t, x)), keepdims),))
logsumexp = Primitive("logsumexp", _logsumexp_impl,
    vjp=(lambda g, ans, x, axis, keepdims: _expand(g, ans, x, axis, keepdims)
             * ops.exp(x - _expand(ans, ans, x, axis, keepdims)),),
    jvp=(lambda t, ans, x, axis, keepdims: ops.sum(
             t * ops.exp(x - _expand(ans, ans, x, axis, keepdims)),
             _shifted(axis, batch_ndim(t, x)), keepdims),))
# fmt: on


# == shape and indexing ===============================================================
def _inverse(perm):
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _broadcast_jvp(t, ans, x, shape):
    n = batch_ndim(t, x)
    lead = t.shape[:n]
    if n and len(shape) > x.ndim:  # line x's axes up with the trailing axes of shape
        t = ops.reshape(t, lead + (1,) * (len(shape) - x.ndim) + x.shape)
    return ops.broadcast_to(t, lead + shape)


def _untake_impl(xp, g, index, shape):
    out = xp.zeros(shape, dtype=g.dtype, device=g.device)
    if any(i is None for i in index):  # the array API assigns through no None: drop those axes
        ellipsis = len(shape) - sum(1 for i in index if i is not None and i is not Ellipsis)
        keep, axis = [], 0
        for i in index:
            width = ellipsis if i is Ellipsis else 0 if isinstance(i, int) else 1
            if i is not None:
                keep.extend(range(axis, axis + width))
            axis += width
        g = xp.reshape(g, tuple(g.shape[k] for k in keep))
        index = tuple(i for i in index if i is not None)
    out[index] = g
    return out


def _pad_impl(xp, x, widths):
    out = xp.zeros(tuple(d + lo + hi for d, (lo, hi) in zip(x.shape, widths)), dtype=x.dtype,
                   device=x.device)
    out[tuple(slice(lo, lo + d) for d, (lo, _) in zip(x.shape, widths))] = x
    return out


def _unpad(g, ans, x, widths):
    index = tuple(slice(lo, lo + d) for d, (lo, _) in zip(x.shape, widths))
    return ops.getitem(g, _batched_index(g, ans, index))


def _concat_vjp(argnum):
    def rule(g, ans, *args, axis):
        start = sum(a.shape[axis] for a in args[:argnum])
        index = [slice(None)] * ans.ndim
        index[axis] = slice(start, start + args[argnum].shape[axis])
        return ops.getitem(g, _batched_index(g, ans, tuple(index)))

    return rule


def _concat_jvp(argnum):
    def rule(t, ans, *args, axis):
        before = sum(a.shape[axis] for a in args[:argnum])
        widths = [(0, 0)] * ans.ndim
        widths[axis] = (before, ans.shape[axis] - before - args[argnum].shape[axis])
        return ops.pad(t, ((0, 0),) * batch_ndim(t, ans) + tuple(widths))

    return rule


# fmt: off
reshape = Primitive("reshape", lambda xp, x, shape: xp.reshape(x, shape),
    vjp=(lambda g, ans, x, shape: ops.reshape(g, g.shape[:batch_ndim(g, ans)] + x.shape),),
    jvp=(lambda t, ans, x, shape: ops.reshape(t, t.shape[:batch_ndim(t, x)] + shape),))
transpose = Primitive("transpose", lambda xp, x, axes: xp.permute_dims(x, axes),
    vjp=(lambda g, ans, x, axes: ops.transpose(g, tuple(range(batch_ndim(g, ans))) + tuple(
             batch_ndim(g, ans) + i for i in _inverse(axes))),),
    jvp=(lambda t, ans, x, axes: ops.transpose(t, tuple(range(batch_ndim(t, x))) + _shifted(
             axes, batch_ndim(t, x))),))
broadcast_to = Primitive("broadcast_to", lambda xp, x, shape: xp.broadcast_to(x, shape),
    vjp=(lambda g, ans, x, shape: _unbroadcast(g, x.shape, shape),),
    jvp=(_broadcast_jvp,))
getitem = Primitive("getitem", lambda xp, x, index: x[index],  # basic indexing only
    vjp=(lambda g, ans, x, index: ops.untake(
             g, _batched_index(g, ans, index), g.shape[:batch_ndim(g, ans)] + x.shape),),
    jvp=(lambda t, ans, x, index: ops.getitem(t, _batched_index(t, x, index)),))
untake = Primitive("untake", _untake_impl,  # zeros(shape) with g written at index
    vjp=(lambda g, ans, x, index, shape: ops.getitem(g, _batched_index(g, ans, index)),),
    jvp=(lambda t, ans, x, index, shape: ops.untake(
             t, _batched_index(t, x, index), t.shape[:batch_ndim(t, x)] + shape),))
pad = Primitive("pad", _pad_impl,  # zero padding, widths: ((lo, hi), ...) per axis
    vjp=(_unpad,),
    jvp=(lambda t, ans, x, widths: ops.pad(t, ((0, 0),) * batch_ndim(t, x) + widths),))
concat = Primitive("concat", lambda xp, *xs, axis: xp.concat(xs, axis=axis),
    vjp=_concat_vjp,
    jvp=_concat_jvp)
# fmt: on


# == linear algebra ===================================================================
def _tensordot_impl(xp, x, y, axes):
    return xp.tensordot(x, y, axes=(list(axes[0]), list(axes[1])))


def _tensordot_vjp_x(g, ans, x, y, axes):
    xa, ya = axes
    n = batch_ndim(g, ans)
    x_free = [d for d in range(x.ndim) if d not in xa]
    y_free = [d for d in range(y.ndim) if d not in ya]
    g_y_axes = tuple(range(g.ndim - len(y_free), g.ndim))
    r = ops.tensordot(g, y, axes=(g_y_axes, tuple(y_free)))  # batch + x_free + sorted(ya)
    y_rest = sorted(ya)
    pos = {d: n + i for i, d in enumerate(x_free)}
    pos.update({d: n + len(x_free) + y_rest.index(e) for d, e in zip(xa, ya)})
    return ops.transpose(r, tuple(range(n)) + tuple(pos[d] for d in range(x.ndim)))


def _tensordot_vjp_y(g, ans, x, y, axes):
    xa, ya = axes
    n = batch_ndim(g, ans)
    x_free = [d for d in range(x.ndim) if d not in xa]
    y_free = [d for d in range(y.ndim) if d not in ya]
    r = ops.tensordot(x, g, axes=(tuple(x_free), tuple(n + i for i in range(len(x_free)))))
    x_rest = sorted(xa)  # r: sorted(xa) + batch + y_free
    pos = {e: len(xa) + n + i for i, e in enumerate(y_free)}
    pos.update({e: x_rest.index(d) for d, e in zip(xa, ya)})
    lead = tuple(len(xa) + i for i in range(n))
    return ops.transpose(r, lead + tuple(pos[e] for e in range(y.ndim)))


def _tensordot_jvp_y(t, ans, x, y, axes):
    xa, ya = axes
    n = batch_ndim(t, y)
    r = ops.tensordot(x, t, axes=(xa, _shifted(ya, n)))  # x_free + batch + y_free
    free = x.ndim - len(xa)
    return ops.transpose(r, tuple(range(free, free + n)) + tuple(range(free))
                       + tuple(range(free + n, r.ndim)))


# fmt: off
matmul = Primitive("matmul", lambda xp, x, y: xp.matmul(x, y),  # (..., n, k) @ (..., k, m)
    vjp=(lambda g, ans, x, y: ops.matmul(g, ops.matrix_transpose(y)),
         lambda g, ans, x, y: ops.matmul(ops.matrix_transpose(x), g)),
    jvp=(lambda t, ans, x, y: ops.matmul(t, y),             # (broadcasts over a stack of t)
         lambda t, ans, x, y: ops.matmul(x, t)))
tensordot = Primitive("tensordot", _tensordot_impl,  # axes: (x_axes, y_axes), non-negative
    vjp=(_tensordot_vjp_x, _tensordot_vjp_y),
    jvp=(lambda t, ans, x, y, axes: ops.tensordot(
             t, y, (_shifted(axes[0], batch_ndim(t, x)), axes[1])),
         _tensordot_jvp_y))
# fmt: on


# == convolution ======================================================================
# im2col: (..., C, H, W) -> (..., C, kh, kw, OH, OW) patches; col2im: its adjoint.
def _merge_lead(xp, a, core: int):
    """Fold all axes before the last ``core`` into one (for kernels that take fixed ranks)."""
    lead = a.shape[: a.ndim - core]
    return xp.reshape(a, (-1,) + tuple(a.shape[a.ndim - core :])), lead


def _im2col_impl(xp, x, kh, kw, stride, padding):
    x4, lead = _merge_lead(xp, x, 3)
    cols = backend_of(x).im2col(x4, kh, kw, stride, padding)
    return xp.reshape(cols, lead + tuple(cols.shape[1:]))


def _col2im_impl(xp, cols, height, width, stride, padding):
    c6, lead = _merge_lead(xp, cols, 5)
    img = backend_of(cols).col2im(c6, height, width, stride, padding)
    return xp.reshape(img, lead + tuple(img.shape[1:]))


def _im2col_vjp(g, ans, x, kh, kw, stride, padding):
    return ops.col2im(g, x.shape[-2], x.shape[-1], stride, padding)


def _col2im_vjp(g, ans, cols, height, width, stride, padding):
    return ops.im2col(g, cols.shape[-4], cols.shape[-3], stride, padding)


# fmt: off
im2col = Primitive("im2col", _im2col_impl,  # (..., C, H, W) -> (..., C, kh, kw, OH, OW)
    vjp=(_im2col_vjp,),
    jvp=LINEAR)
col2im = Primitive("col2im", _col2im_impl,  # the adjoint of im2col
    vjp=(_col2im_vjp,),
    jvp=LINEAR)
# fmt: on


# conv, conv_transpose and conv_weight_grad are one bilinear map and its two adjoints, so each
# one's derivative rules are the other two. Shapes (leading axes broadcast between arguments):
#   conv(x (*L, N, C, H, W), w (*M, F, C, kh, kw))            -> (*LM, N, F, OH, OW)
#   conv_transpose(g (*L, N, F, OH, OW), w (*M, F, C, kh, kw))  -> (*LM, N, C, H, W)
#   conv_weight_grad(x (*L, N, C, H, W), g (*M, N, F, OH, OW))  -> (*LM, F, C, kh, kw)
# conv saves what its kernel kept for the adjoints (patches, or a dense matrix) with its input
# and filter arrays (see Primitive's ``saves``), when ``keep`` (its filters are differentiated);
# its rules hand that to conv_transpose and conv_weight_grad as ``reuse``, which they use when
# called on the same arrays (checked by identity) instead of recomputing it.


def _shape_of(xp, a, lead, core):
    return xp.reshape(a, lead + tuple(a.shape[a.ndim - core:])) if lead != a.shape[:-core] else a


def _pairwise(xp, kernel, a, b, core_a: int, core_b: int):
    """Apply ``kernel`` to every pair of core blocks of ``a`` and ``b`` (leading axes broadcast)."""
    lead = ops.broadcast_shapes("conv", a.shape[: a.ndim - core_a], b.shape[: b.ndim - core_b])
    a = xp.reshape(xp.broadcast_to(a, lead + a.shape[a.ndim - core_a:]),
                   (-1,) + a.shape[a.ndim - core_a:])
    b = xp.reshape(xp.broadcast_to(b, lead + b.shape[b.ndim - core_b:]),
                   (-1,) + b.shape[b.ndim - core_b:])
    out = xp.stack([kernel(a[i, ...], b[i, ...]) for i in range(a.shape[0])])
    return xp.reshape(out, lead + out.shape[1:])


def _conv_impl(xp, x, w, stride, padding, keep):
    be = backend_of(x)
    if w.ndim > 4:  # a stack of filters (higher-order derivatives with stacked cotangents)
        return _pairwise(xp, lambda a, b: be.conv(a, b, stride, padding)[0], x, w, 4, 4), None
    x4, lead = _merge_lead(xp, x, 3)
    out, kernel = be.conv(x4, w, stride, padding, keep=keep)
    saved = {"input": x, "weight": w, "kernel": kernel} if keep and x.ndim == 4 else None
    return _shape_of(xp, out, lead, 3), saved


def _reused(reuse, key, array):
    """What conv's kernel kept, if ``reuse`` is conv's ``saved`` for this very ``array``."""
    return reuse["kernel"] if reuse is not None and reuse[key] is array else None


def _conv_transpose_impl(xp, g, w, height, width, stride, padding, reuse=None):
    be = backend_of(g)
    if w.ndim > 4:
        return _pairwise(xp, lambda a, b: be.conv_transpose(a, b, height, width, stride,
                                                               padding), g, w, 4, 4)
    g4, lead = _merge_lead(xp, g, 3)
    kernel = _reused(reuse, "weight", w)
    return _shape_of(xp, be.conv_transpose(g4, w, height, width, stride, padding, kernel),
                     lead, 3)


def _conv_weight_grad_impl(xp, x, g, kh, kw, stride, padding, reuse=None):
    be = backend_of(x)
    if x.ndim > 4:
        return _pairwise(xp, lambda a, b: be.conv_weight_grad(a, b, kh, kw, stride, padding),
                         x, g, 4, 4)
    return be.conv_weight_grad(x, g, kh, kw, stride, padding, _reused(reuse, "input", x))


def _unlead(r, arg, ans):
    """Sum ``r`` over the leading axes that ``arg`` was broadcast along."""
    full = ans.shape[: ans.ndim - 4] + arg.shape[arg.ndim - 4:]
    return r if full == arg.shape else _unbroadcast(r, arg.shape, full)


def _conv_vjp_x(g, ans, x, w, stride, padding, keep, saved):
    return _unlead(ops.conv_transpose(g, w, x.shape[-2], x.shape[-1], stride, padding,
                                      reuse=saved), x, ans)


def _conv_vjp_w(g, ans, x, w, stride, padding, keep, saved):
    return _unlead(ops.conv_weight_grad(x, g, w.shape[-2], w.shape[-1], stride, padding,
                                        reuse=saved), w, ans)


def _conv_transpose_vjp_g(h, ans, g, w, height, width, stride, padding):
    return _unlead(ops.conv(h, w, stride, padding), g, ans)


def _conv_transpose_vjp_w(h, ans, g, w, height, width, stride, padding):
    return _unlead(ops.conv_weight_grad(h, g, w.shape[-2], w.shape[-1], stride, padding), w, ans)


def _conv_weight_grad_vjp_x(h, ans, x, g, kh, kw, stride, padding):
    return _unlead(ops.conv_transpose(g, h, x.shape[-2], x.shape[-1], stride, padding), x, ans)


def _conv_weight_grad_vjp_g(h, ans, x, g, kh, kw, stride, padding):
    return _unlead(ops.conv(x, h, stride, padding), g, ans)


def _lead_ones(t, arg, ans):
    """``t`` with unit axes after its batch axes, so that ``arg``'s leading (stack) axes line up
    with ``ans``'s when a conv primitive broadcasts them against its other argument's."""
    n, missing = batch_ndim(t, arg), ans.ndim - arg.ndim
    return ops.reshape(t, t.shape[:n] + (1,) * missing + arg.shape) if n and missing > 0 else t


def _conv_jvp_direct(apply, which: int):
    """JVP in an argument whose leading axes the conv kernel merges into its sample axis: the
    primitive applied to the stack of tangents (``which``: the argument's position)."""
    def rule(t, ans, *args, **params):
        args = list(args)
        args[which] = _lead_ones(t, args[which], ans)
        return apply(*args, **params)

    return rule


def _conv_jvp_folded(apply, which: int, axis: int):
    """JVP in a filter-like argument of a conv primitive, which maps its ``axis`` (0..3 of its 4
    core axes) independently onto output axis 1 of 4: the batch of tangents is folded into that
    axis, one kernel call for the whole stack (``which``: the argument's position)."""
    def rule(t, ans, *args, **params):
        args = list(args)
        arg = args[which]
        n = batch_ndim(t, arg)
        if not n or arg.ndim > 4:  # no stack, or a stack of filters already: broadcast pairwise
            args[which] = _lead_ones(t, arg, ans)
            return apply(*args, **params)
        batch = t.shape[:n]
        b = math.prod(batch)
        t = ops.transpose(ops.reshape(t, (b,) + arg.shape),
                        tuple(range(1, axis + 1)) + (0,) + tuple(range(axis + 1, 5)))
        folded = arg.shape[:axis] + (b * arg.shape[axis],) + arg.shape[axis + 1:]
        args[which] = ops.reshape(t, folded)
        r = apply(*args, **params)  # lead + (core0, b * K, core2, core3)
        m = r.ndim - 3
        r = ops.reshape(r, r.shape[:m] + (b, r.shape[m] // b) + r.shape[m + 1:])
        r = ops.transpose(r, (m,) + tuple(range(m)) + tuple(range(m + 1, r.ndim)))
        return ops.reshape(r, batch + ans.shape)

    return rule


def _conv(x, w, stride, padding, keep, saved):
    return ops.conv(x, w, stride, padding)


def _conv_transpose(g, w, height, width, stride, padding):
    return ops.conv_transpose(g, w, height, width, stride, padding)


def _conv_weight_grad(x, g, kh, kw, stride, padding):
    return ops.conv_weight_grad(x, g, kh, kw, stride, padding)


# fmt: off
conv = Primitive("conv", _conv_impl,  # x (..., N, C, H, W) with w (..., F, C, kh, kw)
    vjp=(_conv_vjp_x, _conv_vjp_w),
    jvp=(_conv_jvp_direct(_conv, 0), _conv_jvp_folded(_conv, 1, 0)), saves=True)
conv_transpose = Primitive("conv_transpose", _conv_transpose_impl,  # adjoint of conv in x
    vjp=(_conv_transpose_vjp_g, _conv_transpose_vjp_w),
    jvp=(_conv_jvp_direct(_conv_transpose, 0), _conv_jvp_folded(_conv_transpose, 1, 1)),
    reuses=True)
conv_weight_grad = Primitive("conv_weight_grad", _conv_weight_grad_impl,  # adjoint in w
    vjp=(_conv_weight_grad_vjp_x, _conv_weight_grad_vjp_g),
    jvp=(_conv_jvp_folded(_conv_weight_grad, 0, 1), _conv_jvp_direct(_conv_weight_grad, 1)),
    reuses=True)
# fmt: on

PRIMITIVES = {
    p.name: p
    for p in (add, sub, mul, div, neg, power, exp, log, sqrt, tanh, sigmoid, relu, where, astype,
              sum_, max_, logsumexp, reshape, transpose, broadcast_to, getitem, untake, pad,
              concat, matmul, tensordot, im2col, col2im, conv, conv_transpose, conv_weight_grad)
}
