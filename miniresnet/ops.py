"""Array operations on Tensors: validation, broadcasting, then a primitive.

Every function accepts Tensors, backend arrays and (where it makes sense) Python scalars, and
returns a :class:`~miniresnet.tracing.Tensor`. Bad input raises an error that names the
operation and the shapes or dtypes involved.
"""

from __future__ import annotations

import builtins
import functools
from collections.abc import Sequence

from miniresnet import primitives
from miniresnet.backends import (
    PYTHON_SCALARS,
    backend_of,
    conv_geometry,
    conv_output_size,
    int_pair,
    python_scalar,
)
from miniresnet.tracing import (
    OPERATIONS,
    Tensor,
    as_tensor,
    bind,
    dtype_name,
    is_recorded,
    raise_mixed_backends,
    wrap,
)


# -- helpers ----------------------------------------------------------------------------------
def _operand(x):
    """A Tensor, or a Python (or NumPy) scalar as a Python scalar: it adopts the other
    operand's dtype, as in the array API."""
    if isinstance(x, Tensor) or type(x) in PYTHON_SCALARS:
        return x
    scalar = python_scalar(x)  # NumPy scalars are weak scalars too
    return as_tensor(x) if scalar is None else scalar


def _backends_differ(tensors) -> bool:
    """Whether the tensors' arrays belong to different backends (their types can differ within
    one: NumPy's 0-d results are NumPy scalars, e.g. a scalar parameter after an SGD step)."""
    try:
        return len({id(backend_of(t.raw)) for t in tensors}) > 1
    except TypeError:  # an array of no known backend
        return True


def _check_dtypes(name: str, tensors) -> None:
    if len({type(t.raw) for t in tensors}) > 1 and _backends_differ(tensors):
        raise_mixed_backends(primitives.PRIMITIVES.get(name) or name, tensors)
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        listed = " and ".join(sorted(dtype_name(d) for d in dtypes))
        raise TypeError(
            f"{name}: operands have different dtypes ({listed}); miniresnet never up- or "
            "down-casts silently: convert one explicitly with .astype(...)"
        )


def broadcast_shapes(name: str, *shapes) -> tuple[int, ...]:
    """The shape ``shapes`` broadcast to, or a ValueError naming ``name`` and the shapes."""
    try:
        return _broadcast_cached(tuple(shapes))
    except ValueError:
        pass
    return _broadcast(name, shapes)


@functools.lru_cache(maxsize=1024)
def _broadcast_cached(shapes: tuple) -> tuple[int, ...]:
    return _broadcast("", shapes)


def _broadcast(name: str, shapes) -> tuple[int, ...]:
    ndim = builtins.max(len(s) for s in shapes)
    out = []
    for i in range(ndim):
        dims = {s[i - ndim + len(s)] for s in shapes if i - ndim + len(s) >= 0} - {1}
        if len(dims) > 1:
            raise ValueError(
                f"{name}: shapes {', '.join(map(str, shapes))} cannot be broadcast together"
            )
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def _elementwise(prim, *args):
    if len(args) == 2:  # fast paths: same shape and dtype, or a Python scalar operand
        x, y = args
        if type(x) is Tensor:
            if type(y) is Tensor:
                if x.shape == y.shape and x.dtype == y.dtype:
                    return bind(prim, x, y)
            elif type(y) in PYTHON_SCALARS:
                return bind(prim, x, y)
        elif type(y) is Tensor and type(x) in PYTHON_SCALARS:
            return bind(prim, x, y)
    args = [_operand(a) for a in args]
    if not any(isinstance(a, Tensor) for a in args):  # scalars only: make the first an array
        args[0] = as_tensor(args[0])
    tensors = [a for a in args if isinstance(a, Tensor)]
    _check_dtypes(prim.name, [t for t in tensors if not _is_bool(t)])
    shapes = {t.shape for t in tensors}
    if len(shapes) > 1:
        shape = broadcast_shapes(prim.name, *(t.shape for t in tensors))
        args = [broadcast_to(a, shape) if isinstance(a, Tensor) and a.shape != shape else a
                for a in args]
    return bind(prim, *args)


def _is_bool(t: Tensor) -> bool:
    return t.dtype == t.backend.xp.bool


def _axes(name: str, axis, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"{name}: axis {a} is out of range for a tensor with {ndim} axes")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: repeated axis in {axis}")
    return tuple(sorted(out))


def _constant(fn, *args):
    """Evaluate a non-differentiable function on the raw data (the result is a constant)."""
    raws = [a.raw if isinstance(a, Tensor) else a for a in args]
    arrays = [r for r in raws if type(r) not in PYTHON_SCALARS]
    be = as_tensor(arrays[0]).backend
    return wrap(be.as_array(fn(be.xp, *raws)))


# -- elementwise --------------------------------------------------------------------------------
def add(x, y) -> Tensor:
    """``x + y`` with broadcasting."""
    return _elementwise(primitives.add, x, y)


def sub(x, y) -> Tensor:
    """``x - y`` with broadcasting."""
    return _elementwise(primitives.sub, x, y)


def mul(x, y) -> Tensor:
    """``x * y`` with broadcasting."""
    return _elementwise(primitives.mul, x, y)


def div(x, y) -> Tensor:
    """``x / y`` with broadcasting."""
    return _elementwise(primitives.div, x, y)


def neg(x) -> Tensor:
    return bind(primitives.neg, as_tensor(x))


def power(x, p: float) -> Tensor:
    """``x ** p`` for a Python scalar exponent ``p``."""
    if not isinstance(p, PYTHON_SCALARS):
        raise TypeError(f"pow: the exponent must be a Python scalar, got {type(p).__name__}")
    return bind(primitives.power, as_tensor(x), p)


def exp(x) -> Tensor:
    return bind(primitives.exp, as_tensor(x))


def log(x) -> Tensor:
    return bind(primitives.log, as_tensor(x))


def sqrt(x) -> Tensor:
    return bind(primitives.sqrt, as_tensor(x))


def tanh(x) -> Tensor:
    return bind(primitives.tanh, as_tensor(x))


def sigmoid(x) -> Tensor:
    return bind(primitives.sigmoid, as_tensor(x))


def relu(x) -> Tensor:
    """``max(x, 0)``; its derivative at 0 is taken to be 0."""
    return bind(primitives.relu, as_tensor(x))


def where(condition, x, y) -> Tensor:
    """``x`` where ``condition`` holds, else ``y`` (no derivative flows into ``condition``)."""
    c = as_tensor(condition).detach()
    if not _is_bool(c):
        raise TypeError(f"where: condition must be boolean, got {dtype_name(c.dtype)}")
    x, y = _operand(x), _operand(y)
    like = x if isinstance(x, Tensor) else y
    if not isinstance(like, Tensor):
        raise TypeError("where: x or y must be an array")
    x = full_like(like, x) if not isinstance(x, Tensor) else x
    y = full_like(like, y) if not isinstance(y, Tensor) else y
    return _elementwise(primitives.where, c, x, y)


def astype(x, dtype) -> Tensor:
    """Convert to ``dtype`` (a backend dtype or a name such as ``"float32"``)."""
    x = as_tensor(x)
    if isinstance(dtype, str):
        dtype = x.backend.dtype(dtype)
    return x if x.dtype == dtype else bind(primitives.astype, x, dtype=dtype)


# -- comparisons (constants: not differentiable) -------------------------------------------------
def greater(x, y) -> Tensor:
    return _constant(lambda xp, a, b: a > b, x, y)


def greater_equal(x, y) -> Tensor:
    return _constant(lambda xp, a, b: a >= b, x, y)


def less(x, y) -> Tensor:
    return _constant(lambda xp, a, b: a < b, x, y)


def less_equal(x, y) -> Tensor:
    return _constant(lambda xp, a, b: a <= b, x, y)


def equal(x, y) -> Tensor:
    return _constant(lambda xp, a, b: a == b, x, y)


def isfinite(x) -> Tensor:
    return _constant(lambda xp, a: xp.isfinite(a), x)


# -- creation (constants on the backend and dtype of a given tensor) ----------------------------
def zeros_like(x, shape=None) -> Tensor:
    """Zeros with the backend and dtype of ``x`` (and its shape, unless ``shape`` is given)."""
    x = as_tensor(x)
    shape = x.shape if shape is None else tuple(shape)
    return _constant(lambda xp, a: xp.zeros(shape, dtype=a.dtype, device=a.device), x)


def ones_like(x) -> Tensor:
    return _constant(lambda xp, a: xp.ones_like(a), as_tensor(x))


def full_like(x, value) -> Tensor:
    return _constant(lambda xp, a: xp.full_like(a, value), as_tensor(x))


# -- reductions ----------------------------------------------------------------------------------
def sum(x, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001
    """Sum over ``axis`` (an int, a tuple of ints or None for all axes)."""
    x = as_tensor(x)
    return bind(primitives.sum_, x, axis=_axes("sum", axis, x.ndim), keepdims=keepdims)


def mean(x, axis=None, keepdims: bool = False) -> Tensor:
    """Mean over ``axis``."""
    x = as_tensor(x)
    axes = _axes("mean", axis, x.ndim)
    count = 1
    for a in axes:
        count *= x.shape[a]
    return sum(x, axes, keepdims) * (1.0 / count)


def var(x, axis=None, keepdims: bool = False, correction: int = 0) -> Tensor:
    """Variance over ``axis``, dividing by ``count - correction`` (0: biased, 1: unbiased)."""
    x = as_tensor(x)
    axes = _axes("var", axis, x.ndim)
    count = 1
    for a in axes:
        count *= x.shape[a]
    centred = x - mean(x, axes, keepdims=True)
    return sum(centred * centred, axes, keepdims) * (1.0 / (count - correction))


def max(x, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001
    """Maximum over ``axis``; the derivative is shared equally among tied maxima."""
    x = as_tensor(x)
    if x.size == 0:
        raise ValueError(f"max: empty tensor of shape {x.shape}")
    return bind(primitives.max_, x, axis=_axes("max", axis, x.ndim), keepdims=keepdims)


def logsumexp(x, axis=None, keepdims: bool = False) -> Tensor:
    """``log(sum(exp(x), axis))`` computed without overflow."""
    x = as_tensor(x)
    return bind(primitives.logsumexp, x, axis=_axes("logsumexp", axis, x.ndim), keepdims=keepdims)


def log_softmax(x, axis: int = -1) -> Tensor:
    return as_tensor(x) - logsumexp(x, axis, keepdims=True)


def softmax(x, axis: int = -1) -> Tensor:
    return exp(log_softmax(x, axis))


# -- shape and indexing --------------------------------------------------------------------------
def reshape(x, shape) -> Tensor:
    """Reshape (one ``-1`` allowed)."""
    x = as_tensor(x)
    shape = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
    known = 1
    for d in shape:
        known *= d if d != -1 else 1
    if shape.count(-1) > 1 or (shape.count(-1) == 0 and known != x.size) or (
        shape.count(-1) == 1 and (known == 0 or x.size % known)
    ):
        raise ValueError(f"reshape: cannot reshape a tensor of shape {x.shape} into {shape}")
    if -1 in shape:
        shape = tuple(x.size // known if d == -1 else d for d in shape)
    return x if shape == x.shape else bind(primitives.reshape, x, shape=shape)


def transpose(x, axes=None) -> Tensor:
    """Permute axes (default: reverse them)."""
    x = as_tensor(x)
    axes = tuple(reversed(range(x.ndim))) if axes is None else tuple(a % x.ndim for a in axes)
    if sorted(axes) != list(range(x.ndim)):
        raise ValueError(f"transpose: {axes} is not a permutation of the axes of shape {x.shape}")
    return x if axes == tuple(range(x.ndim)) else bind(primitives.transpose, x, axes=axes)


def matrix_transpose(x) -> Tensor:
    """Swap the last two axes."""
    x = as_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"matrix_transpose: needs at least 2 axes, got shape {x.shape}")
    return transpose(x, tuple(range(x.ndim - 2)) + (x.ndim - 1, x.ndim - 2))


def broadcast_to(x, shape) -> Tensor:
    x = as_tensor(x)
    shape = tuple(shape)
    if broadcast_shapes("broadcast_to", x.shape, shape) != shape:
        raise ValueError(f"broadcast_to: cannot broadcast shape {x.shape} to {shape}")
    return x if x.shape == shape else bind(primitives.broadcast_to, x, shape=shape)


def _basic_index(index) -> tuple:
    index = index if isinstance(index, tuple) else (index,)
    for i in index:
        if not (i is None or i is Ellipsis or isinstance(i, (int, slice))) or isinstance(i, bool):
            raise IndexError(
                f"getitem: only basic indexing (ints, slices, None, ...) is supported, got "
                f"{type(i).__name__}; for picking entries use a one-hot mask or where()"
            )
    if not any(i is Ellipsis for i in index):
        index += (Ellipsis,)  # NumPy's implicit trailing axes, spelled out for the array API
    return index


def getitem(x, index) -> Tensor:
    """``x[index]`` for basic indices (ints, slices, ``None``, ``...``)."""
    x = as_tensor(x)
    index = _basic_index(index)
    try:
        return bind(primitives.getitem, x, index=index)
    except IndexError as e:
        raise IndexError(f"getitem: index {index} is invalid for shape {x.shape}: {e}") from None


def untake(g, index, shape) -> Tensor:
    """A zero tensor of ``shape`` with ``g`` written at ``index`` (the adjoint of getitem)."""
    return bind(primitives.untake, as_tensor(g), index=_basic_index(index), shape=tuple(shape))


def pad(x, widths) -> Tensor:
    """Zero-pad: ``widths`` gives ``(before, after)`` for every axis."""
    x = as_tensor(x)
    widths = tuple((int(lo), int(hi)) for lo, hi in widths)
    if len(widths) != x.ndim or any(lo < 0 or hi < 0 for lo, hi in widths):
        raise ValueError(
            f"pad: widths must give non-negative (before, after) pairs for each of the "
            f"{x.ndim} axes of shape {x.shape}, got {widths}"
        )
    return bind(primitives.pad, x, widths=widths)


def concat(xs: Sequence, axis: int = 0) -> Tensor:
    """Join tensors along an existing axis."""
    xs = [as_tensor(x) for x in xs]
    if not xs:
        raise ValueError("concat: needs at least one tensor")
    ndim = xs[0].ndim
    axis = _axes("concat", axis, ndim)[0]
    if any(x.ndim != ndim or x.shape[:axis] + x.shape[axis + 1 :] !=
           xs[0].shape[:axis] + xs[0].shape[axis + 1 :] for x in xs):
        raise ValueError(
            f"concat: shapes {[x.shape for x in xs]} differ outside axis {axis}"
        )
    _check_dtypes("concat", xs)
    return bind(primitives.concat, *xs, axis=axis)


def stack(xs: Sequence, axis: int = 0) -> Tensor:
    """Join tensors of one shape along a new axis."""
    xs = [as_tensor(x) for x in xs]
    if not xs or any(x.shape != xs[0].shape for x in xs):
        raise ValueError(f"stack: needs tensors of one shape, got {[x.shape for x in xs]}")
    axis = axis % (xs[0].ndim + 1)
    shape = xs[0].shape[:axis] + (1,) + xs[0].shape[axis:]
    return concat([reshape(x, shape) for x in xs], axis)


# -- linear algebra and convolution --------------------------------------------------------------
def matmul(x, y) -> Tensor:
    """Matrix product of the last two axes, batched (and broadcast) over the others."""
    x, y = as_tensor(x), as_tensor(y)
    if x.ndim < 2 or y.ndim < 2:
        raise ValueError(
            f"matmul: both operands need at least 2 axes, got shapes {x.shape} and {y.shape} "
            "(reshape vectors to (n, 1) or (1, n))"
        )
    if x.shape[-1] != y.shape[-2]:
        raise ValueError(
            f"matmul: shapes {x.shape} and {y.shape} are not aligned: "
            f"{x.shape[-1]} (last axis of x) != {y.shape[-2]} (second-to-last axis of y)"
        )
    _check_dtypes("matmul", (x, y))
    if x.shape[:-2] != y.shape[:-2]:
        batch = broadcast_shapes("matmul", x.shape[:-2], y.shape[:-2])
        x = broadcast_to(x, batch + x.shape[-2:])
        y = broadcast_to(y, batch + y.shape[-2:])
    return bind(primitives.matmul, x, y)


def tensordot(x, y, axes=2) -> Tensor:
    """Contract ``axes`` of ``x`` with ``axes`` of ``y`` (as in NumPy and the array API)."""
    x, y = as_tensor(x), as_tensor(y)
    if isinstance(axes, int):
        xa, ya = tuple(range(x.ndim - axes, x.ndim)), tuple(range(axes))
    else:
        xa, ya = axes
        xa = (xa,) if isinstance(xa, int) else tuple(xa)
        ya = (ya,) if isinstance(ya, int) else tuple(ya)
    xa = tuple(a % x.ndim for a in xa) if x.ndim else xa
    ya = tuple(a % y.ndim for a in ya) if y.ndim else ya
    if len(xa) != len(ya) or any(x.shape[a] != y.shape[b] for a, b in zip(xa, ya)):
        raise ValueError(
            f"tensordot: cannot contract axes {xa} of shape {x.shape} with axes {ya} of "
            f"shape {y.shape}"
        )
    _check_dtypes("tensordot", (x, y))
    return bind(primitives.tensordot, x, y, axes=(xa, ya))


def im2col(x, kh: int, kw: int, stride=1, padding=0) -> Tensor:
    """Patches of ``x`` (shape ``(..., C, H, W)``) as ``(..., C, kh, kw, OH, OW)``."""
    x = as_tensor(x)
    stride, padding = int_pair("im2col", stride, "stride"), int_pair("im2col", padding, "padding")
    if x.ndim < 3:
        raise ValueError(f"im2col: expected (..., C, H, W), got shape {x.shape}")
    stride, padding, _ = conv_geometry("im2col", x.shape[-2:], (kh, kw), stride, padding)
    return bind(primitives.im2col, x, kh=kh, kw=kw, stride=stride, padding=padding)


def col2im(cols, height: int, width: int, stride=1, padding=0) -> Tensor:
    """The adjoint of :func:`im2col`: sum patches back into a ``(..., C, H, W)`` image."""
    cols = as_tensor(cols)
    stride, padding = int_pair("col2im", stride, "stride"), int_pair("col2im", padding, "padding")
    if cols.ndim < 5:
        raise ValueError(f"col2im: expected (..., C, kh, kw, OH, OW), got shape {cols.shape}")
    stride, padding, _ = conv_geometry("col2im", (height, width), cols.shape[-4:-2], stride,
                                       padding, cols.shape[-2:])
    return bind(primitives.col2im, cols, height=height, width=width, stride=stride, padding=padding)


def _conv_operands(name: str, a, b, same: tuple[int, int], layout: str):
    """``a`` and ``b`` as Tensors, checked: both at least 4-D, sharing the axis ``same``."""
    a, b = as_tensor(a), as_tensor(b)
    if a.ndim < 4 or b.ndim < 4 or a.shape[same[0]] != b.shape[same[1]]:
        raise ValueError(f"{name}: expected {layout}, got shapes {a.shape} and {b.shape}")
    _check_dtypes(name, (a, b))
    return a, b


def _conv_geometry(name, image_shape, kernel_shape, stride, padding, out_shape=None):
    return conv_geometry(name, image_shape, kernel_shape, stride, padding, out_shape)[:2]


def conv(x, w, stride=1, padding=0) -> Tensor:
    """Cross-correlation of ``x`` (shape ``(..., N, C, H, W)``) with filters ``w`` (shape
    ``(..., F, C, kh, kw)``), giving ``(..., N, F, OH, OW)``; the primitive under
    :func:`miniresnet.functional.conv2d` (which adds a bias and checks its inputs)."""
    x, w = _conv_operands("conv", x, w, (-3, -3),
                          "x (..., N, C, H, W) and w (..., F, C, kh, kw) with equal C")
    stride, padding = _conv_geometry("conv", x.shape[-2:], w.shape[-2:], stride, padding)
    # keep the patches only if a filter gradient may be asked for (else a faster kernel may run)
    return bind(primitives.conv, x, w, stride=stride, padding=padding, keep=is_recorded(w))


def conv_transpose(g, w, height: int, width: int, stride=1, padding=0, *,
                   reuse=None) -> Tensor:
    """The adjoint of :func:`conv` in its input: ``(..., N, F, OH, OW)`` cotangents to
    ``(..., N, C, height, width)``. ``reuse``: what a conv with the same ``w`` saved (its
    node's ``saved``), to skip work; it does not change the result."""
    g, w = _conv_operands("conv_transpose", g, w, (-3, -4),
                          "g (..., N, F, OH, OW) and w (..., F, C, kh, kw) with equal F")
    stride, padding = _conv_geometry("conv_transpose", (height, width), w.shape[-2:], stride,
                                     padding, g.shape[-2:])
    return bind(primitives.conv_transpose, g, w, height=height, width=width, stride=stride,
                padding=padding, reuse=reuse)


def conv_weight_grad(x, g, kh: int, kw: int, stride=1, padding=0, *,
                     reuse=None) -> Tensor:
    """The adjoint of :func:`conv` in its filters: ``(..., F, C, kh, kw)`` from images ``x``
    ``(..., N, C, H, W)`` and cotangents ``g`` ``(..., N, F, OH, OW)`` (summed over N).
    ``reuse``: what a conv on the same ``x`` saved, to skip recomputing its patches."""
    x, g = _conv_operands("conv_weight_grad", x, g, (-4, -4),
                          "x (..., N, C, H, W) and g (..., N, F, OH, OW) with equal N")
    stride, padding = _conv_geometry("conv_weight_grad", x.shape[-2:], (kh, kw), stride,
                                     padding, g.shape[-2:])
    return bind(primitives.conv_weight_grad, x, g, kh=kh, kw=kw, stride=stride, padding=padding,
                reuse=reuse)


# -- what Tensor's operators and methods call ---------------------------------------------------
OPERATIONS.update({f.__name__: f for f in (
    add, sub, mul, div, neg, power, matmul, getitem, greater, greater_equal, less, less_equal,
    equal, sum, mean, var, max, logsumexp, reshape, transpose, matrix_transpose, exp, log, sqrt,
    tanh, sigmoid, relu, astype)})


__all__ = [
    "add", "sub", "mul", "div", "neg", "power", "exp", "log", "sqrt", "tanh", "sigmoid", "relu",
    "where", "astype", "greater", "greater_equal", "less", "less_equal", "equal", "isfinite",
    "zeros_like", "ones_like", "full_like", "sum", "mean", "var", "max", "logsumexp",
    "log_softmax", "softmax", "reshape", "transpose", "matrix_transpose", "broadcast_to",
    "getitem", "untake", "pad", "concat", "stack", "matmul", "tensordot", "im2col", "col2im",
    "conv", "conv_transpose", "conv_weight_grad",
    "broadcast_shapes", "conv_output_size",
]
