"""Function transforms, named as in JAX and torch.func: grad, vjp, jvp, jacobian, hvp.

They accept backend arrays or Tensors and return backend arrays. One rule decides when they
return Tensors instead: a transform differentiates with respect to its own arguments, and the
eager tape records inside it only if one of its arguments is on that tape (a Tensor with
``requires_grad=True``, or computed from one). Tensors with ``requires_grad=True`` that ``f``
merely closes over, such as a model's parameters, are constants there: nothing is recorded for
them and the result is a backend array. A result is a Tensor only while something still traces
it: an enclosing transform (so that ``grad(grad(f))`` is the second derivative) or, through an
argument, the eager tape.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Sequence

from miniresnet import ops
from miniresnet.backend_choice import known_backend
from miniresnet.tracing import (
    Tensor,
    as_tensor,
    backward_pass,
    check_input_finite,
    dtype_name,
    eager_tape_off,
    finalize,
    is_on_eager_tape,
    leaf_node,
    new_level,
    toposort,
    wrap,
)


def _check_argnums(argnums, name: str) -> tuple[int, ...]:
    """``argnums`` as a tuple of ints (repeats and negative positions kept), or a TypeError."""
    nums = tuple(argnums) if isinstance(argnums, (tuple, list)) else (argnums,)
    if not nums:
        raise ValueError(f"{name}: argnums is empty; give an int or a tuple of ints")
    try:
        if any(isinstance(i, bool) for i in nums):
            raise TypeError
        return tuple(operator.index(i) for i in nums)
    except TypeError:
        raise TypeError(f"{name}: argnums must be an int or a tuple of ints, got {argnums!r}"
                        ) from None


def _positions(nums: tuple[int, ...], nargs: int, name: str) -> tuple[int, ...]:
    for i in nums:
        if not -nargs <= i < nargs:
            raise ValueError(f"{name}: argnums {nums} out of range for {nargs} arguments "
                             f"(valid: {-nargs} to {nargs - 1})")
    return tuple(i % nargs for i in nums)


def _differentiate(name: str, f: Callable, args: tuple, nums: tuple[int, ...]):
    """``vjp`` of ``f`` in the arguments ``nums`` (each once, however often it is named), the
    others held fixed; returns ``(out, vjp_fn)`` with ``vjp_fn`` giving one result per entry of
    ``nums``, so a repeated argnum gets the same derivative in each of its slots."""
    for i, a in enumerate(args):
        check_input_finite(name, a, f"argument {i}")
    unique = tuple(dict.fromkeys(nums))
    fixed = tuple(a if isinstance(a, Tensor) or known_backend(a) is None else as_tensor(a)
                  for a in args)  # arrays become Tensors, so that f sees Tensors everywhere

    def g(*diff):
        full = list(fixed)
        for i, d in zip(unique, diff):
            full[i] = d
        return f(*full)

    out, vjp_fn = _vjp(g, tuple(args[i] for i in unique), any(map(is_on_eager_tape, args)))
    slot = {i: k for k, i in enumerate(unique)}

    def vjp_in_order(cotangent):
        results = vjp_fn(cotangent)
        return tuple(results[slot[i]] for i in nums)

    return out, vjp_in_order


def _check_float(name: str, x: Tensor, what: str) -> None:
    xp = x.backend.xp
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{name}: {what} must be floating point to differentiate, not {x.dtype}")


def _output(name: str, out) -> Tensor:
    if not isinstance(out, Tensor):
        try:
            out = as_tensor(out)
        except Exception:
            raise TypeError(
                f"{name}: the function must return one array or Tensor, got {type(out).__name__}"
            ) from None
    return out


def vjp(f: Callable, *primals):
    """Evaluate ``f(*primals)`` and return ``(out, vjp_fn)``.

    ``vjp_fn(cotangent)`` returns a tuple with one cotangent per primal. It can be called many
    times (the graph is kept at the fixed linearisation point) and accepts a *stack* of
    cotangents of shape ``(k, ...) + out.shape`` (any number of leading axes), returning
    ``(k, ...) + primal.shape`` for each primal, all in one reverse pass.

    Examples
    --------
    >>> import numpy as np, miniresnet as mr
    >>> out, vjp_fn = mr.vjp(lambda x: x * x, np.array([1.0, 2.0]))
    >>> vjp_fn(np.eye(2))[0]          # two cotangents at once: the Jacobian's rows
    array([[2., 0.],
           [0., 4.]])
    """
    return _vjp(f, primals, any(map(is_on_eager_tape, primals)))


def _vjp(f: Callable, primals: Sequence, record_eager: bool):
    level = new_level()
    inputs = [as_tensor(p) for p in primals]
    for k, x in enumerate(inputs):
        _check_float("vjp", x, "every primal")
        check_input_finite("vjp", x, f"primal {k}")
    scope = contextlib.nullcontext if record_eager else eager_tape_off
    nodes = [leaf_node() for _ in inputs]
    with scope():
        out = _output("vjp", f(*(wrap(x, level, n) for x, n in zip(inputs, nodes))))
    root = out._node if out._level == level else None
    value = out._value if root is not None else out
    order = toposort(root) if root is not None else None

    def vjp_fn(cotangent):
        ct = as_tensor(cotangent)
        k = ct.ndim - value.ndim
        if k < 0 or ct.shape[k:] != value.shape:
            raise ValueError(
                f"vjp_fn: cotangent shape {ct.shape} must be the output shape {value.shape}, "
                "optionally with leading batch axes"
            )
        if ct.dtype != value.dtype:
            raise TypeError(f"vjp_fn: cotangent dtype {ct.dtype} != output dtype {value.dtype}")
        check_input_finite("vjp_fn", ct, "the cotangent")
        with scope():
            leaves = backward_pass(root, ct, order) if root is not None else {}
        batch = ct.shape[:k]
        results = []
        for x, node in zip(inputs, nodes):
            g = leaves.get(node)
            if g is None:
                g = ops.zeros_like(x, shape=batch + x.shape)
            elif g._level == 0 and g.raw is ct.raw:  # never hand back the caller's own array
                g = wrap(g.backend.xp.asarray(g.raw, copy=True))
            results.append(finalize(g))
        return tuple(results)

    return finalize(value), vjp_fn


def value_and_grad(f: Callable, argnums: int | Sequence[int] = 0) -> Callable:
    """Like :func:`grad`, but the returned function gives ``(f(*args), gradient)``."""
    nums = _check_argnums(argnums, "grad")
    single = not isinstance(argnums, (tuple, list))

    def wrapped(*args):
        out, vjp_fn = _differentiate("grad", f, args, _positions(nums, len(args), "grad"))
        out_t = as_tensor(out)
        if out_t.size != 1:
            raise ValueError(
                f"grad: the function must return a scalar, got shape {out_t.shape}; use vjp or "
                "jacobian for non-scalar outputs"
            )
        grads = vjp_fn(ops.ones_like(out_t))
        return out, grads[0] if single else grads

    return wrapped


def grad(f: Callable, argnums: int | Sequence[int] = 0) -> Callable:
    """The gradient of a scalar-valued ``f`` with respect to argument(s) ``argnums``.

    Examples
    --------
    >>> import miniresnet as mr
    >>> mr.grad(lambda x: (x ** 3).sum())(2.0)
    array(12.)
    >>> mr.grad(mr.grad(lambda x: (x ** 3).sum()))(2.0)
    array(12.)
    """
    vg = value_and_grad(f, argnums)
    return lambda *args: vg(*args)[1]


def jvp(f: Callable, primals: Sequence, tangents: Sequence):
    """Forward mode: ``(f(*primals), J(primals) @ tangents)`` in one pass.

    ``primals`` and ``tangents`` are tuples of equal length; each tangent has its primal's
    dtype and shape, optionally with leading batch axes, the same for every tangent: a *stack*
    of tangents of shape ``(k, ...) + primal.shape`` is pushed forward in one pass, and each
    output's tangent then has shape ``(k, ...) + out.shape`` (Jacobian columns k at a time).
    ``f`` may return one array or a tuple of arrays.

    Examples
    --------
    >>> import numpy as np, miniresnet as mr
    >>> out, jv = mr.jvp(lambda x: x * x, (np.array([1.0, 2.0]),), (np.eye(2),))
    >>> jv                            # two tangents at once: the Jacobian's columns, stacked
    array([[2., 0.],
           [0., 4.]])
    """
    if not isinstance(primals, (tuple, list)) or not isinstance(tangents, (tuple, list)):
        raise TypeError("jvp: primals and tangents must be tuples, e.g. jvp(f, (x,), (v,))")
    if len(primals) != len(tangents):
        raise ValueError(f"jvp: {len(primals)} primals but {len(tangents)} tangents")
    return _jvp(f, primals, tangents, any(map(is_on_eager_tape, (*primals, *tangents))))


def _jvp(f: Callable, primals: Sequence, tangents: Sequence, record_eager: bool):
    level = new_level()
    xs, batch = [], None
    for k, (p, t) in enumerate(zip(primals, tangents)):
        p, t = as_tensor(p), as_tensor(t)
        _check_float("jvp", p, "every primal")
        check_input_finite("jvp", p, f"primal {k}")
        check_input_finite("jvp", t, f"tangent {k}")
        n = t.ndim - p.ndim
        if n < 0 or t.shape[n:] != p.shape or t.dtype != p.dtype:
            raise ValueError(
                f"jvp: tangent {k} ({t.shape} {dtype_name(t.dtype)}) does not match primal {k} "
                f"({p.shape} {dtype_name(p.dtype)}): it must have the primal's dtype and shape, "
                "optionally with leading batch axes"
            )
        if batch is not None and t.shape[:n] != batch:
            raise ValueError(
                f"jvp: tangent {k} has batch axes {t.shape[:n]} (shape {t.shape} for primal "
                f"shape {p.shape}), but the tangents before it have {batch}; every tangent "
                "needs the same leading batch axes"
            )
        batch = t.shape[:n]
        xs.append(wrap(p, level, None, t))
    with contextlib.nullcontext() if record_eager else eager_tape_off():
        out = f(*xs)

    def split(o):
        o = _output("jvp", o)
        if o._level == level:
            return finalize(o._value), finalize(o._tangent)
        return finalize(o), finalize(ops.zeros_like(o, shape=(batch or ()) + o.shape))

    if isinstance(out, (tuple, list)):
        pairs = [split(o) for o in out]
        return tuple(p for p, _ in pairs), tuple(t for _, t in pairs)
    return split(out)


def _default_chunk(n: int, sizes) -> int:
    return max(1, min(n, 2**22 // max(1, *sizes)))


_MODES = ("reverse", "forward")


def jacobian(f: Callable, argnums: int | Sequence[int] = 0, *, chunk_size: int | None = None,
             mode: str = "reverse"):
    """The exact dense Jacobian of ``f``, of shape ``out.shape + arg.shape``.

    ``mode="reverse"`` (default) builds it from rows: reverse passes that each carry
    ``chunk_size`` basis cotangents at once, ``ceil(out.size / chunk_size)`` passes after one
    forward pass. ``mode="forward"`` builds it from columns: forward passes that each push
    ``chunk_size`` basis tangents (over all arguments in ``argnums`` together) through ``f``,
    ``ceil(n_in / chunk_size)`` passes, each also recomputing ``f``; cheaper when the inputs
    are fewer than the outputs. The default ``chunk_size`` keeps a stack to a few million
    numbers (in forward mode judged from the output, seen after a first one-column pass).
    """
    if mode not in _MODES:
        raise ValueError(f"jacobian: mode must be 'reverse' or 'forward', got {mode!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(
            chunk_size, int) or chunk_size < 1):
        raise ValueError(f"jacobian: chunk_size must be a positive int or None, got "
                         f"{chunk_size!r}")
    given = _check_argnums(argnums, "jacobian")
    single = not isinstance(argnums, (tuple, list))

    def wrapped(*args):
        nums = _positions(given, len(args), "jacobian")
        jacs = (_jacobian_forward if mode == "forward" else _jacobian_reverse)(
            f, args, nums, chunk_size)
        return jacs[0] if single else jacs

    return wrapped


def _jacobian_reverse(f, args, nums, chunk_size):
    out, vjp_fn = _differentiate("jacobian", f, args, nums)
    out_t = as_tensor(out)
    xs = [as_tensor(args[i]) for i in nums]
    n = out_t.size
    chunk = chunk_size or _default_chunk(n, [out_t.size] + [x.size for x in xs])
    xp = out_t.backend.xp
    blocks: list[list[Tensor]] = [[] for _ in nums]
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        eye = xp.eye(k, n, k=start, dtype=out_t.dtype, device=out_t.raw.device)
        basis = wrap(xp.reshape(eye, (k,) + out_t.shape))
        for block, ct in zip(blocks, vjp_fn(basis)):
            block.append(as_tensor(ct))
    return tuple(
        finalize(ops.reshape(ops.concat(b, 0) if len(b) > 1 else b[0], out_t.shape + x.shape))
        for b, x in zip(blocks, xs)
    )


def _jacobian_forward(f, args, nums, chunk_size):
    unique = tuple(dict.fromkeys(nums))
    fixed = tuple(a if isinstance(a, Tensor) or known_backend(a) is None else as_tensor(a)
                  for a in args)  # arrays become Tensors, so that f sees Tensors everywhere
    xs = [as_tensor(args[i]) for i in unique]
    record_eager = any(map(is_on_eager_tape, args))

    def g(*diff):
        full = list(fixed)
        for i, d in zip(unique, diff):
            full[i] = d
        return f(*full)

    sizes = [x.size for x in xs]
    offsets = [sum(sizes[:j]) for j in range(len(xs))]
    n = sum(sizes)
    xp = xs[0].backend.xp
    columns: list[Tensor] = []
    start, chunk = 0, chunk_size or 1  # without a chunk size: one column, to see the output
    while start < n:
        k = min(chunk, n - start)
        basis = tuple(  # columns start..start+k of the identity, cut into the arguments' parts
            wrap(xp.reshape(xp.eye(k, size, k=start - offset, dtype=x.dtype,
                                   device=x.raw.device), (k,) + x.shape))
            for x, size, offset in zip(xs, sizes, offsets))
        out, cols = _jvp(g, xs, basis, record_eager)
        if isinstance(out, (tuple, list)):
            raise TypeError("jacobian: the function must return one array or Tensor, got a "
                            f"{type(out).__name__}")
        columns.append(as_tensor(cols))
        if chunk_size is None and start == 0:
            chunk = _default_chunk(n, [as_tensor(out).size] + sizes)
        start += k
    out_shape = columns[0].shape[1:]
    whole = ops.concat(columns, 0) if len(columns) > 1 else columns[0]  # (n_in,) + out.shape
    r = len(out_shape)
    whole = ops.transpose(whole, tuple(range(1, r + 1)) + (0,))  # out.shape + (n_in,)
    jacs = {i: finalize(ops.reshape(
        ops.getitem(whole, (Ellipsis, slice(offset, offset + size))), out_shape + x.shape))
        for i, x, size, offset in zip(unique, xs, sizes, offsets)}
    return tuple(jacs[i] for i in nums)


def hvp(f: Callable, primals, tangents):
    """Hessian-vector product of a scalar ``f`` (forward-over-reverse: ``jvp`` of ``grad``).

    ``primals`` and ``tangents`` are arrays (or tuples of arrays, for several arguments); the
    result has the same structure. Tangents may carry leading batch axes, as in :func:`jvp`:
    a stack of ``k`` vectors gives ``k`` Hessian-vector products (with the basis vectors,
    ``k`` columns of the Hessian) from one forward-over-reverse pass.
    """
    single = not isinstance(primals, (tuple, list))
    primals = (primals,) if single else tuple(primals)
    tangents = (tangents,) if single else tuple(tangents)
    g = grad(f, argnums=tuple(range(len(primals))))
    _, out = jvp(g, primals, tangents)
    return out[0] if single else out
