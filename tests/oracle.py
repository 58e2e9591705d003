"""Oracle cases: every primitive and NN function beside its equivalent in ``autograd.numpy``.

A :class:`Case` pairs

* ``fun(p, *xs)``: the miniresnet computation, on Tensors ``xs`` (the differentiable inputs);
* ``oracle(p, *xs)``: the same function written with ``autograd.numpy`` on NumPy arrays, which
  autograd differentiates independently of miniresnet;
* ``strategy``: a hypothesis strategy drawing ``(p, xs)``: ``p`` a dict of non-differentiable
  parameters (axes, indices, pad widths, strides, boolean masks, integer targets ...) and
  ``xs`` a tuple of float64 host NumPy arrays, kept away from kinks and singularities.

``tests/test_vs_autograd.py`` compares values, VJPs, JVPs and second derivatives against the
oracle and checks every case with finite differences.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import miniresnet as mr
import miniresnet.functional as F
from miniresnet.testing.strategies import conv_configs, host_arrays, shapes, to_backend_array

__all__ = ["CASES", "CASES_BY_NAME", "Case", "MAX_ERRORS", "MAX_ERRORS_BY_KIND", "record_error",
           "rel_error"]

# -- error bookkeeping -----------------------------------------------------------------------

#: the largest relative error seen per case (over every kind of comparison and backend)
MAX_ERRORS: dict[str, float] = {}
#: the largest relative error seen per kind of comparison ("forward", "vjp", "jvp", ...)
MAX_ERRORS_BY_KIND: dict[str, dict[str, float]] = {}


def record_error(case_name: str, err: float, kind: str | None = None) -> float:
    """Remember ``err`` if it is the largest seen for ``case_name`` (and ``kind``); return it."""
    MAX_ERRORS[case_name] = max(MAX_ERRORS.get(case_name, 0.0), err)
    if kind is not None:
        per_kind = MAX_ERRORS_BY_KIND.setdefault(kind, {})
        per_kind[case_name] = max(per_kind.get(case_name, 0.0), err)
    return err


def to_host(x) -> np.ndarray:
    """A NumPy copy of a backend array, a Tensor or host data."""
    if isinstance(x, mr.Tensor):
        return np.asarray(x.numpy())
    if isinstance(x, np.ndarray | np.generic | float | int):
        return np.asarray(x)
    return np.asarray(mr.Tensor(x).numpy())


#: smallest scale an error is measured against (see :func:`rel_error`)
SCALE_FLOOR = 1e-4


def rel_error(ours, oracle, floor: float = SCALE_FLOOR) -> float:
    """``max|ours - oracle| / max(max|oracle|, floor)`` over whole arrays.

    One scale for the whole array, never per element, so that single near-zero entries do not
    count. Inputs, cotangents and tangents are O(1) here, and so are the values and derivatives
    of every case; an array whose entries are *all* below ``SCALE_FLOOR`` is the rounding noise
    of O(1) terms cancelling (a 0-d output at a stationary point such as sigmoid'' near 0, the
    variance of equal values, a softmax over one element), where a relative error means
    nothing: there the error is absolute, at ``tol * SCALE_FLOOR``. A wrong derivative rule is
    off by O(1) at the O(1) points that every strategy draws. Shapes must agree exactly (no
    broadcasting hides a wrong shape) and every value must be finite.
    """
    a = to_host(ours).astype(np.float64)
    b = np.asarray(oracle, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != oracle shape {b.shape}"
    assert np.all(np.isfinite(a)), "non-finite values"
    scale = max(float(np.max(np.abs(b), initial=0.0)), floor)
    return float(np.max(np.abs(a - b), initial=0.0)) / scale


# -- the case record -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    fun: Callable
    oracle: Callable
    strategy: st.SearchStrategy
    #: primitive names this case exercises (checked against the traced graph)
    primitives: frozenset[str] = frozenset()
    #: extra keyword arguments for ``check_grads`` (justified where used)
    fd_kwargs: dict = field(default_factory=dict)
    #: False where the function is not differentiable at the drawn points (finite differences
    #: are meaningless there, but the derivative convention is still compared with autograd)
    fd: bool = True
    #: False where autograd lacks a forward-mode rule for an op of the oracle (then the oracle's
    #: JVP is computed by autograd's reverse-of-reverse ``make_jvp_reversemode``)
    oracle_fwd: bool = True

    def __repr__(self) -> str:
        return self.name


CASES: list[Case] = []


def case(name, fun, oracle, strategy, primitives=(), **kw) -> Case:
    c = Case(name, fun, oracle, strategy, frozenset(primitives), **kw)
    CASES.append(c)
    return c


def _bk(host):
    """A parameter array (mask, target ...) on the current backend."""
    return to_backend_array(np.asarray(host))


# -- strategies ----------------------------------------------------------------------------------

def _ex(p=None, *xs):
    return (p or {}, tuple(xs))


def unary(low=-2.0, high=2.0, avoid=(), margin=1e-3, min_dims=0, max_dims=3):
    shape = shapes(min_dims=min_dims, max_dims=max_dims, max_side=4)
    return host_arrays(shape, low=low, high=high, avoid=avoid, margin=margin).map(
        lambda x: _ex({}, x))


@st.composite
def binary(draw, y_low=-2.0, y_high=2.0, y_avoid=(), y_margin=1e-3):
    """Two arrays of mutually broadcastable shapes (0 to 3 axes)."""
    bs = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3,
                                                max_side=3))
    x = draw(host_arrays(bs.input_shapes[0]))
    y = draw(host_arrays(bs.input_shapes[1], low=y_low, high=y_high, avoid=y_avoid,
                         margin=y_margin))
    return _ex({}, x, y)


@st.composite
def axis_spec(draw, ndim, allow_none=True, allow_empty=True):
    """``None``, an int or a tuple of distinct ints (each possibly negative)."""
    kinds = (["none"] if allow_none else []) + (["int"] if ndim else []) + ["tuple"]
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(-ndim, ndim - 1))
    if ndim == 0:
        return ()
    axes = draw(st.lists(st.integers(0, ndim - 1), unique=True,
                         min_size=0 if allow_empty else min(1, ndim), max_size=ndim))
    return tuple(a - ndim if draw(st.booleans()) else a for a in axes)


def _norm_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else axis
    return tuple(sorted(a % ndim for a in axes))


@st.composite
def reduction(draw, low=-2.0, high=2.0, allow_empty=True, min_dims=0):
    x = draw(host_arrays(shapes(min_dims=min_dims, max_dims=3, max_side=4), low=low, high=high))
    axis = draw(axis_spec(x.ndim, allow_empty=allow_empty))
    return _ex({"axis": axis, "keepdims": draw(st.booleans())}, x)


@st.composite
def distinct_values(draw, shape):
    """Values with pairwise gaps of at least 0.1 (no ties: max is differentiable)."""
    n = math.prod(shape)
    perm = np.array(draw(st.permutations(range(n))), dtype=np.float64).reshape(shape)
    noise = draw(host_arrays(shape, low=0.0, high=0.2))
    return np.asarray((perm - n / 2) * 0.3 + noise)


@st.composite
def max_example(draw):
    x = draw(distinct_values(draw(shapes(min_dims=0, max_dims=3, max_side=4))))
    axis = draw(axis_spec(x.ndim))
    return _ex({"axis": axis, "keepdims": draw(st.booleans())}, x)


@st.composite
def max_ties_example(draw):
    """Many ties: values from {-1, 0, 1} (autograd also splits the derivative evenly)."""
    shape = draw(shapes(min_dims=1, max_dims=3, max_side=4))
    x = draw(hnp.arrays(np.float64, shape, elements=st.sampled_from([-1.0, 0.0, 1.0])))
    axis = draw(axis_spec(x.ndim))
    return _ex({"axis": axis, "keepdims": draw(st.booleans())}, x)


@st.composite
def var_example(draw):
    x = draw(host_arrays(shapes(min_dims=1, max_dims=3, max_side=4)))
    axis = draw(axis_spec(x.ndim, allow_empty=False))
    count = math.prod(x.shape[a] for a in _norm_axes(axis, x.ndim))
    correction = draw(st.sampled_from([0, 1] if count > 1 else [0]))
    return _ex({"axis": axis, "keepdims": draw(st.booleans()), "correction": correction}, x)


@st.composite
def softmax_example(draw):
    x = draw(host_arrays(shapes(min_dims=1, max_dims=3, max_side=4), low=-3.0, high=3.0))
    return _ex({"axis": draw(st.integers(-x.ndim, x.ndim - 1))}, x)


@st.composite
def pow_example(draw):
    p = draw(st.sampled_from([2, 3, 0, 0.5, 1.5, -1, -2.5, 2.7]))
    x = draw(host_arrays(shapes(min_dims=0, max_dims=3, max_side=4), low=0.3, high=2.0))
    return _ex({"p": p}, x)


@st.composite
def pow_int_example(draw):
    """Integer exponents on inputs of either sign."""
    p = draw(st.sampled_from([1, 2, 3, 4]))
    x = draw(host_arrays(shapes(min_dims=0, max_dims=3, max_side=4), avoid=(0.0,), margin=0.1))
    return _ex({"p": p}, x)


@st.composite
def where_example(draw):
    bs = draw(hnp.mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=3,
                                                max_side=3))
    cond = draw(hnp.arrays(np.bool_, bs.input_shapes[0]))
    x = draw(host_arrays(bs.input_shapes[1]))
    if draw(st.booleans()):
        return _ex({"cond": cond, "y": draw(st.floats(-2, 2))}, x)  # Python scalar y
    return _ex({"cond": cond}, x, draw(host_arrays(bs.input_shapes[2])))


@st.composite
def reshape_example(draw):
    x = draw(host_arrays(shapes(min_dims=0, max_dims=3, max_side=4)))
    n, new = x.size, []
    while n > 1 and len(new) < 3:
        d = draw(st.sampled_from([k for k in range(1, n + 1) if n % k == 0]))
        new.append(d)
        n //= d
    new.append(n)
    new = draw(st.permutations(new))
    if draw(st.booleans()):
        new[draw(st.integers(0, len(new) - 1))] = -1
    return _ex({"shape": tuple(new)}, x)


@st.composite
def transpose_example(draw):
    x = draw(host_arrays(shapes(min_dims=0, max_dims=4, max_side=3)))
    axes = draw(st.permutations(range(x.ndim)))
    axes = tuple(a - x.ndim if draw(st.booleans()) else a for a in axes)
    return _ex({"axes": draw(st.sampled_from([axes, None]))}, x)


@st.composite
def broadcast_example(draw):
    target = draw(shapes(min_dims=0, max_dims=4, max_side=3))
    drop = draw(st.integers(0, len(target)))
    src = tuple(1 if draw(st.booleans()) else d for d in target[drop:])
    return _ex({"shape": target}, draw(host_arrays(src)))


@st.composite
def index_example(draw):
    shape = draw(shapes(min_dims=1, max_dims=3, max_side=4))
    index = draw(hnp.basic_indices(shape, allow_newaxis=True, allow_ellipsis=True))
    return shape, index


@st.composite
def getitem_example(draw):
    shape, index = draw(index_example())
    return _ex({"index": index}, draw(host_arrays(shape)))


@st.composite
def untake_example(draw):
    shape, index = draw(index_example())
    g_shape = np.zeros(shape)[index].shape
    return _ex({"index": index, "shape": shape}, draw(host_arrays(g_shape)))


@st.composite
def pad_example(draw):
    x = draw(host_arrays(shapes(min_dims=0, max_dims=3, max_side=3)))
    widths = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(x.ndim))
    return _ex({"widths": widths}, x)


@st.composite
def concat_example(draw):
    base = draw(shapes(min_dims=1, max_dims=3, max_side=3))
    axis = draw(st.integers(-len(base), len(base) - 1))
    k = draw(st.integers(1, 3))
    xs = []
    for _ in range(k):
        shape = list(base)
        shape[axis] = draw(st.integers(1, 3))
        xs.append(draw(host_arrays(tuple(shape))))
    return _ex({"axis": axis}, *xs)


@st.composite
def stack_example(draw):
    base = draw(shapes(min_dims=0, max_dims=3, max_side=3))
    axis = draw(st.integers(-len(base) - 1, len(base)))
    xs = [draw(host_arrays(base)) for _ in range(draw(st.integers(1, 3)))]
    return _ex({"axis": axis}, *xs)


@st.composite
def matmul_example(draw):
    bs = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=2,
                                                max_side=3))
    n, k, m = (draw(st.integers(1, 4)) for _ in range(3))
    x = draw(host_arrays(bs.input_shapes[0] + (n, k)))
    y = draw(host_arrays(bs.input_shapes[1] + (k, m)))
    return _ex({}, x, y)


@st.composite
def matrix_transpose_example(draw):
    return _ex({}, draw(host_arrays(shapes(min_dims=2, max_dims=4, max_side=3))))


@st.composite
def tensordot_example(draw):
    x_shape = draw(shapes(min_dims=0, max_dims=3, max_side=3))
    if draw(st.booleans()):  # integer axes: the last k of x against the first k of y
        k = draw(st.integers(0, len(x_shape)))
        y_shape = x_shape[len(x_shape) - k:] + draw(shapes(min_dims=0, max_dims=2, max_side=3))
        return _ex({"axes": k}, draw(host_arrays(x_shape)), draw(host_arrays(y_shape)))
    xa = draw(st.lists(st.integers(0, len(x_shape) - 1), unique=True, max_size=len(x_shape))
              if x_shape else st.just([]))
    free = list(draw(shapes(min_dims=0, max_dims=2, max_side=3)))
    y_dims = [x_shape[a] for a in xa] + free
    order = draw(st.permutations(range(len(y_dims))))
    y_shape = tuple(y_dims[i] for i in order)
    ya = [order.index(i) for i in range(len(xa))]
    xa = [a - len(x_shape) if draw(st.booleans()) else a for a in xa]
    ya = [a - len(y_shape) if draw(st.booleans()) else a for a in ya]
    return _ex({"axes": (tuple(xa), tuple(ya))}, draw(host_arrays(x_shape)),
               draw(host_arrays(y_shape)))


def _geometry(draw, cfg):
    """Stride and padding as ints when both sides agree (sometimes) else as pairs."""
    stride, padding = cfg["stride"], cfg["padding"]
    if stride[0] == stride[1] and draw(st.booleans()):
        stride = stride[0]
    if padding[0] == padding[1] and draw(st.booleans()):
        padding = padding[0]
    return stride, padding


@st.composite
def im2col_example(draw):
    cfg = draw(conv_configs())
    n, c, h, w = cfg["x_shape"]
    lead = draw(st.sampled_from([(), (n,), (n, 2)]))
    stride, padding = _geometry(draw, cfg)
    _, _, kh, kw = cfg["w_shape"]
    p = {"kh": kh, "kw": kw, "stride": stride, "padding": padding}
    return _ex(p, draw(host_arrays(lead + (c, h, w))))


@st.composite
def col2im_example(draw):
    cfg = draw(conv_configs())
    n, c, h, w = cfg["x_shape"]
    _, _, kh, kw = cfg["w_shape"]
    lead = draw(st.sampled_from([(), (n,), (n, 2)]))
    stride, padding = _geometry(draw, cfg)
    p = {"height": h, "width": w, "stride": stride, "padding": padding}
    return _ex(p, draw(host_arrays(lead + (c, kh, kw) + cfg["out_hw"])))


@st.composite
def conv_example(draw):
    cfg = draw(conv_configs())
    stride, padding = _geometry(draw, cfg)
    xs = [draw(host_arrays(cfg["x_shape"])), draw(host_arrays(cfg["w_shape"]))]
    if draw(st.booleans()):
        xs.append(draw(host_arrays((cfg["w_shape"][0],))))
    return _ex({"stride": stride, "padding": padding}, *xs)


_LEADS = [(), (2,)]  # leading axes of the conv primitives' arguments (stacks, broadcast)


@st.composite
def conv_primitive_example(draw, which):
    """Arguments of the conv / conv_transpose / conv_weight_grad primitives, each with
    optional leading axes (broadcast between the two arguments)."""
    cfg = draw(conv_configs())
    stride, padding = _geometry(draw, cfg)
    (n, c, h, w), (f, _, kh, kw) = cfg["x_shape"], cfg["w_shape"]
    la, lb = draw(st.sampled_from(_LEADS)), draw(st.sampled_from(_LEADS))
    image, out, filt = (n, c, h, w), (n, f) + cfg["out_hw"], (f, c, kh, kw)
    shapes_ = {"conv": (image, filt), "conv_transpose": (out, filt),
               "conv_weight_grad": (image, out)}[which]
    p = {"stride": stride, "padding": padding, "kh": kh, "kw": kw, "height": h, "width": w}
    return _ex(p, draw(host_arrays(la + shapes_[0])), draw(host_arrays(lb + shapes_[1])))


@st.composite
def standardize_example(draw):
    shape = list(draw(shapes(min_dims=1, max_dims=4, max_side=3)))
    axis = tuple(sorted(draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))))
    if math.prod(shape[a] for a in axis) <= 2:  # at least 3 values per statistic
        shape[axis[0]] = 3
    shape = tuple(shape)
    # away from zero variance (see batch_norm_example): drawn arrays often repeat one value, so
    # a fixed irregular pattern is added (as for g below) and the assume() rarely rejects
    x = draw(host_arrays(shape)) + 0.5 * np.sin(2.3 * np.arange(math.prod(shape))).reshape(shape)
    assume(np.min(np.var(x, axis=axis)) > 0.05)
    negative = draw(st.booleans())
    axis = tuple(a - len(shape) for a in axis) if negative else axis
    return _ex({"axis": axis, "eps": draw(st.sampled_from([1e-5, 0.1]))}, x)


@st.composite
def standardize_affine_example(draw, grad=False):
    """x (kept away from zero variance) with per-channel weight and bias; for the gradient
    primitive also g, with optional leading batch axes."""
    (p, (x,)) = draw(standardize_example())
    axis = tuple(a % x.ndim for a in p["axis"])
    param = tuple(d for i, d in enumerate(x.shape) if i not in axis)  # one value per channel
    w, b = draw(host_arrays(param)), draw(host_arrays(param))
    if not grad:
        return _ex(p, x, w, b)
    lead = draw(st.sampled_from([(), (2,)]))
    # not a g whose result is pure cancellation (g constant per channel, or along x^): there
    # the output is rounding noise of O(1) terms and no relative error means anything; a fixed
    # irregular pattern added to the drawn g makes that rare, the assume() below excludes it
    # (judged with unit weights: w only scales each channel, and is often drawn all zero)
    shape = lead + x.shape
    g = draw(host_arrays(shape)) + np.sin(1.7 * np.arange(math.prod(shape))).reshape(shape)
    unit = standardize_affine_grad_oracle(g, x, np.ones_like(w), axis, p["eps"])
    assume(np.max(np.abs(unit)) > 0.05)
    return _ex(p, g, x, w)


@st.composite
def batch_norm_example(draw):
    four_d = draw(st.booleans())
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    shape = (n, c) + ((draw(st.integers(1, 3)), draw(st.integers(1, 3))) if four_d else ())
    training = draw(st.booleans())
    if training:
        assume(math.prod(shape) // c > 1)
    x = draw(host_arrays(shape))
    if training:
        # keep every channel's batch variance away from 0, where 1/sqrt(var + eps) has a huge
        # derivative and finite differences lose all accuracy
        axes = (0,) if x.ndim == 2 else (0, 2, 3)
        assume(np.min(np.var(x, axis=axes)) > 0.05)
    # with two values per channel the normalised batch is +-1 whatever x is, up to eps: the
    # derivative w.r.t. x is O(eps) while its terms are O(1), pure cancellation; use a large eps
    eps = 0.1 if training and math.prod(shape) // c == 2 else draw(st.sampled_from([1e-5, 0.1]))
    p = {"training": training, "weight": draw(st.booleans()), "bias": draw(st.booleans()),
         "track": training and draw(st.booleans()), "eps": eps}
    xs = [x]
    if not training:
        xs += [draw(host_arrays((c,))), draw(host_arrays((c,), low=0.3, high=2.0))]
    xs += [draw(host_arrays((c,))) for key in ("weight", "bias") if p[key]]
    return _ex(p, *xs)


@st.composite
def batch_norm_eval_example(draw):
    """Evaluation mode with constant statistics, weight and bias (only x differentiated: the
    one-scale-one-shift path of batch_norm)."""
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    shape = (n, c) + ((draw(st.integers(1, 3)),) * 2 if draw(st.booleans()) else ())
    consts = (draw(host_arrays((c,))), draw(host_arrays((c,), low=0.3, high=2.0)),
              draw(host_arrays((c,))), draw(host_arrays((c,))))
    x, eps = draw(host_arrays(shape)), draw(st.sampled_from([1e-5, 0.1]))
    # not an output that is all cancellation (x at the running mean, or the bias cancelling the
    # rest): it is then the rounding of O(1) terms and no relative error means anything
    mean, var, w, b = (a.reshape((1, c) + (1,) * (x.ndim - 2)) for a in consts)
    assume(np.max(np.abs((x - mean) / np.sqrt(var + eps) * w + b)) > 0.05)
    return _ex({"eps": eps, "consts": consts}, x)


def batch_norm_eval_fun(p, x):
    dtype = x.backend.dtype_name(x.dtype)
    rm, rv, w, b = (_bk(a.astype(dtype)) for a in p["consts"])
    return F.batch_norm(x, rm, rv, w, b, training=False, eps=p["eps"])


@st.composite
def linear_example(draw):
    lead = draw(shapes(min_dims=0, max_dims=2, max_side=3))
    fin, fout = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    xs = [draw(host_arrays(lead + (fin,))), draw(host_arrays((fout, fin)))]
    if draw(st.booleans()):
        xs.append(draw(host_arrays((fout,))))
    return _ex({}, *xs)


@st.composite
def avg_pool_example(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel = kh if kh == kw and draw(st.booleans()) else (kh, kw)
    stride = draw(st.one_of(st.none(), st.integers(1, 2),
                            st.tuples(st.integers(1, 2), st.integers(1, 2))))
    padding = draw(st.tuples(st.integers(0, kh // 2), st.integers(0, kw // 2)))
    s = (kh, kw) if stride is None else ((stride, stride) if isinstance(stride, int) else stride)
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    assume(h + 2 * padding[0] >= kh and w + 2 * padding[1] >= kw)
    x = draw(host_arrays((draw(st.integers(1, 2)), draw(st.integers(1, 2)), h, w)))
    return _ex({"kernel": kernel, "stride": stride, "padding": padding, "s": s}, x)


@st.composite
def adaptive_pool_example(draw):
    oh, ow = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h, w = oh * draw(st.integers(1, 3)), ow * draw(st.integers(1, 3))
    out = 1 if (oh, ow) == (1, 1) and draw(st.booleans()) else (oh, ow)
    x = draw(host_arrays((draw(st.integers(1, 2)), draw(st.integers(1, 3)), h, w)))
    return _ex({"output_size": out}, x)


REDUCTIONS = st.sampled_from(["mean", "sum", "none"])


@st.composite
def cross_entropy_example(draw):
    n, c = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    target = np.array(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)),
                      dtype=np.int64)
    logits = draw(host_arrays((n, c), low=-3.0, high=3.0))
    return _ex({"target": target, "reduction": draw(REDUCTIONS)}, logits)


@st.composite
def mse_example(draw):
    shape = draw(shapes(min_dims=0, max_dims=3, max_side=4))
    return _ex({"reduction": draw(REDUCTIONS)}, draw(host_arrays(shape)),
               draw(host_arrays(shape)))


# -- oracles that autograd cannot express with one call ------------------------------------------


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _out_size(size, k, s, p):
    return (size + 2 * p - k) // s + 1


def _pad_hw(x, ph, pw):
    return anp.pad(x, ((0, 0),) * (x.ndim - 2) + ((ph, ph), (pw, pw)), "constant")


def _window(xpad, i, j, oh, ow, sh, sw):
    """``xpad[..., oh*sh + i, ow*sw + j]`` for every output position (a strided slice)."""
    return xpad[..., i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]


def im2col_oracle(x, kh, kw, stride, padding):
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    oh, ow = _out_size(x.shape[-2], kh, sh, ph), _out_size(x.shape[-1], kw, sw, pw)
    xpad = _pad_hw(x, ph, pw)
    rows = [anp.stack([_window(xpad, i, j, oh, ow, sh, sw) for j in range(kw)], axis=-3)
            for i in range(kh)]
    return anp.stack(rows, axis=-4)  # (..., C, kh, kw, OH, OW)


def _placement(size, out, k_offset, stride):
    """The 0/1 matrix that puts output row ``o`` at padded row ``o*stride + k_offset``."""
    e = np.zeros((size, out))
    e[np.arange(out) * stride + k_offset, np.arange(out)] = 1.0
    return e


def col2im_oracle(cols, height, width, stride, padding):
    """Sum every patch back at its place in the padded image, then crop the padding."""
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    kh, kw, oh, ow = cols.shape[-4:]
    total = 0.0
    for i in range(kh):
        rows = _placement(height + 2 * ph, oh, i, sh)
        for j in range(kw):
            colsT = _placement(width + 2 * pw, ow, j, sw).T
            total = total + anp.matmul(anp.matmul(rows, cols[..., i, j, :, :]), colsT)
    return total[..., ph:ph + height, pw:pw + width]


def conv2d_oracle(x, w, b, stride, padding):
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    _, _, kh, kw = w.shape
    oh, ow = _out_size(x.shape[2], kh, sh, ph), _out_size(x.shape[3], kw, sw, pw)
    xpad = _pad_hw(x, ph, pw)
    out = 0.0
    for i in range(kh):
        for j in range(kw):
            out = out + anp.einsum("nchw,fc->nfhw", _window(xpad, i, j, oh, ow, sh, sw),
                                   w[:, :, i, j])
    return out if b is None else out + b[None, :, None, None]


def _over_leads(fn, a, b, core_a=4, core_b=4):
    """``fn`` on every pair of core blocks of ``a`` and ``b``, leading axes broadcast."""
    la, lb = a.shape[:a.ndim - core_a], b.shape[:b.ndim - core_b]
    if not la and not lb:
        return fn(a, b)
    lead = np.broadcast_shapes(la, lb)
    outs = [fn(a[idx[len(lead) - len(la):]] if la else a, b[idx[len(lead) - len(lb):]] if lb else b)
            for idx in np.ndindex(*lead)]
    out = anp.stack(outs)
    return anp.reshape(out, lead + out.shape[1:])


def conv_transpose_oracle(g, w, height, width, stride, padding):
    def one(g, w):
        cols = anp.einsum("nfhw,fcij->ncijhw", g, w)
        return col2im_oracle(cols, height, width, stride, padding)
    return _over_leads(one, g, w)


def conv_weight_grad_oracle(x, g, kh, kw, stride, padding):
    def one(x, g):
        return anp.einsum("nfhw,ncijhw->fcij", g, im2col_oracle(x, kh, kw, stride, padding))
    return _over_leads(one, x, g)


def standardize_oracle(x, axis, eps):
    return (x - anp.mean(x, axis=axis, keepdims=True)) * inv_std_oracle(x, axis, eps)


def _per_channel(w, x, axis):
    """A per-channel parameter reshaped to broadcast against ``x`` (1 on the ``axis`` axes)."""
    return anp.reshape(w, tuple(1 if i in axis else d for i, d in enumerate(x.shape)))


def standardize_affine_grad_oracle(g, x, w, axis, eps):
    w = _per_channel(w, x, axis)
    axis = tuple(a - x.ndim for a in axis)  # g may carry batch axes
    xhat = standardize_oracle(x, axis, eps)
    mean = lambda v: anp.mean(v, axis=axis, keepdims=True)  # noqa: E731
    return w * inv_std_oracle(x, axis, eps) * (g - mean(g) - xhat * mean(g * xhat))


def inv_std_oracle(x, axis, eps):
    mean = anp.mean(x, axis=axis, keepdims=True)
    return 1.0 / anp.sqrt(anp.mean((x - mean) ** 2, axis=axis, keepdims=True) + eps)


def avg_pool_oracle(x, kernel, s, padding):
    kh, kw = _pair(kernel)
    (sh, sw), (ph, pw) = s, padding
    oh, ow = _out_size(x.shape[2], kh, sh, ph), _out_size(x.shape[3], kw, sw, pw)
    xpad = _pad_hw(x, ph, pw)
    total = 0.0
    for i in range(kh):
        for j in range(kw):
            total = total + _window(xpad, i, j, oh, ow, sh, sw)
    return total / (kh * kw)


def untake_oracle(g, index, shape):
    """Scatter ``g`` into zeros of ``shape`` at a basic ``index``, as a 0/1 matrix product."""
    positions = np.arange(math.prod(shape)).reshape(shape)[index].reshape(-1)
    scatter = np.zeros((positions.size, math.prod(shape)))
    scatter[np.arange(positions.size), positions] = 1.0
    return anp.reshape(anp.dot(anp.reshape(g, (-1,)), scatter), shape)


def _axes(axis, ndim):
    """``axis`` as a tuple of non-negative axes (autograd mishandles some negative ones)."""
    return _norm_axes(axis, ndim) if axis is not None else None


def lse_oracle(x, axis, keepdims):
    """``log(sum(exp(x)))`` shifted by the maximum (a constant: ``getval`` stops derivatives;
    the result does not depend on the shift)."""
    axis = _axes(axis, x.ndim)
    m = np.max(getval(x), axis=axis, keepdims=True)
    out = m + anp.log(anp.sum(anp.exp(x - m), axis=axis, keepdims=True))
    return out if keepdims else anp.reshape(out, np.sum(m, axis=axis).shape)


def var_oracle(x, axis, keepdims, ddof=0):
    axis = _axes(axis, x.ndim)
    count = math.prod(np.shape(x)[a] for a in _norm_axes(axis, x.ndim))
    centred = x - anp.mean(x, axis=axis, keepdims=True)
    return anp.sum(centred * centred, axis=axis, keepdims=keepdims) / (count - ddof)


def where_oracle(cond, x, y):
    """``anp.where`` on explicitly broadcast operands (autograd's where does not un-broadcast)."""
    shape = np.broadcast_shapes(np.shape(cond), np.shape(x), np.shape(y))
    return anp.where(cond, x + np.zeros(shape), y + np.zeros(shape))


def batch_norm_oracle(p, *xs):
    x, rest = xs[0], list(xs[1:])
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    if p["training"]:
        mean, var = anp.mean(x, axis=axes, keepdims=True), var_oracle(x, axes, True)
    else:
        mean, var = anp.reshape(rest.pop(0), shape), anp.reshape(rest.pop(0), shape)
    out = (x - mean) / anp.sqrt(var + p["eps"])
    if p["weight"]:
        out = out * anp.reshape(rest.pop(0), shape)
    if p["bias"]:
        out = out + anp.reshape(rest.pop(0), shape)
    return out


def batch_norm_fun(p, *xs):
    x, rest = xs[0], list(xs[1:])
    c = x.shape[1]
    if p["training"]:
        # running statistics, when tracked, are fresh constants updated in place (no effect
        # on the output or its derivatives)
        dtype = x.backend.dtype_name(x.dtype)
        rm, rv = (_bk(np.zeros(c, dtype)), _bk(np.ones(c, dtype))) if p["track"] else (None, None)
    else:
        rm, rv = rest.pop(0), rest.pop(0)
    w = rest.pop(0) if p["weight"] else None
    b = rest.pop(0) if p["bias"] else None
    return F.batch_norm(x, rm, rv, w, b, training=p["training"], eps=p["eps"])


def _reduce(losses, reduction):
    return {"mean": anp.mean, "sum": anp.sum, "none": lambda v: v}[reduction](losses)


def cross_entropy_oracle(p, z):
    lse = lse_oracle(z, 1, False)
    picked = z[np.arange(z.shape[0]), p["target"]]
    return _reduce(lse - picked, p["reduction"])


def _astype_roundtrip(x):
    return mr.astype(mr.astype(x, "float32"), x.dtype)


# -- the cases -----------------------------------------------------------------------------------
# elementwise (binary ops broadcast, which also exercises broadcast_to)
case("add", lambda p, x, y: mr.add(x, y), lambda p, x, y: x + y, binary(), ["add"])
case("sub", lambda p, x, y: x - y, lambda p, x, y: x - y, binary(), ["sub"])
case("mul", lambda p, x, y: x * y, lambda p, x, y: x * y, binary(), ["mul"])
case("div", lambda p, x, y: mr.div(x, y), lambda p, x, y: x / y,
     binary(y_avoid=(0.0,), y_margin=0.4), ["div"])
case("scalar_operands",
     lambda p, x: (2.0 - x) * 3.0 / (x + 3.5) + 1.0 / x - x / 4.0,
     lambda p, x: (2.0 - x) * 3.0 / (x + 3.5) + 1.0 / x - x / 4.0,
     unary(avoid=(0.0,), margin=0.4), ["sub", "mul", "div", "add"])
case("neg", lambda p, x: -x, lambda p, x: -x, unary(), ["neg"])
case("pow", lambda p, x: mr.power(x, p["p"]), lambda p, x: x ** p["p"], pow_example(), ["pow"])
case("pow_int", lambda p, x: x ** p["p"], lambda p, x: x ** p["p"], pow_int_example(), ["pow"])
case("exp", lambda p, x: mr.exp(x), lambda p, x: anp.exp(x), unary(), ["exp"])
case("log", lambda p, x: mr.log(x), lambda p, x: anp.log(x), unary(0.2, 3.0), ["log"])
case("sqrt", lambda p, x: mr.sqrt(x), lambda p, x: anp.sqrt(x), unary(0.2, 3.0), ["sqrt"])
case("tanh", lambda p, x: mr.tanh(x), lambda p, x: anp.tanh(x), unary(-3.0, 3.0), ["tanh"])
case("sigmoid", lambda p, x: mr.sigmoid(x), lambda p, x: 1.0 / (1.0 + anp.exp(-x)),
     unary(-4.0, 4.0), ["sigmoid"])
case("relu", lambda p, x: F.relu(x), lambda p, x: anp.maximum(x, 0.0),
     unary(avoid=(0.0,)), ["relu"])
case("where",
     lambda p, x, *y: mr.where(_bk(p["cond"]), x, y[0] if y else p["y"]),
     lambda p, x, *y: where_oracle(p["cond"], x, y[0] if y else p["y"]),
     where_example(), ["where"])
# float64 -> float32 -> float64: the same rounding in both; the map is linear, so a large
# finite-difference step is exact up to float32 rounding, which it keeps far below rtol
case("astype", lambda p, x: _astype_roundtrip(x),
     lambda p, x: x.astype(np.float32).astype(np.float64),
     unary(), ["astype"], fd_kwargs={"eps": 0.25}, oracle_fwd=False)

# reductions
case("sum", lambda p, x: mr.sum(x, p["axis"], p["keepdims"]),
     lambda p, x: anp.sum(x, axis=_axes(p["axis"], x.ndim), keepdims=p["keepdims"]),
     reduction(), ["sum"])
case("mean", lambda p, x: x.mean(p["axis"], p["keepdims"]),
     lambda p, x: anp.mean(x, axis=_axes(p["axis"], x.ndim), keepdims=p["keepdims"]),
     reduction(), ["sum"])
case("var", lambda p, x: mr.var(x, p["axis"], p["keepdims"], p["correction"]),
     lambda p, x: var_oracle(x, p["axis"], p["keepdims"], p["correction"]),
     var_example(), ["sum", "sub", "mul"])
case("max", lambda p, x: mr.max(x, p["axis"], p["keepdims"]),
     lambda p, x: anp.max(x, axis=_axes(p["axis"], x.ndim), keepdims=p["keepdims"]),
     max_example(), ["max"])
# ties: max is not differentiable there (no finite differences), but the convention (split
# evenly among the tied maxima) is autograd's too
case("max_ties", lambda p, x: mr.max(x, p["axis"], p["keepdims"]),
     lambda p, x: anp.max(x, axis=_axes(p["axis"], x.ndim), keepdims=p["keepdims"]),
     max_ties_example(),
     ["max"], fd=False)
case("logsumexp", lambda p, x: mr.logsumexp(x, p["axis"], p["keepdims"]),
     lambda p, x: lse_oracle(x, p["axis"], p["keepdims"]),
     reduction(-3.0, 3.0), ["logsumexp"])
case("log_softmax", lambda p, x: mr.log_softmax(x, p["axis"]),
     lambda p, x: x - lse_oracle(x, p["axis"], True), softmax_example(), ["logsumexp"])
case("softmax", lambda p, x: mr.softmax(x, p["axis"]),
     lambda p, x: anp.exp(x - lse_oracle(x, p["axis"], True)),
     softmax_example(), ["logsumexp", "exp"])

# shape and indexing
case("reshape", lambda p, x: x.reshape(p["shape"]),
     lambda p, x: anp.reshape(x, p["shape"]), reshape_example(), ["reshape"])
case("transpose", lambda p, x: mr.transpose(x, p["axes"]),
     lambda p, x: anp.transpose(x, p["axes"] and tuple(a % x.ndim for a in p["axes"])),
     transpose_example(), ["transpose"])
case("matrix_transpose", lambda p, x: x.mT, lambda p, x: anp.swapaxes(x, -1, -2),
     matrix_transpose_example(), ["transpose"])
case("broadcast_to", lambda p, x: mr.broadcast_to(x, p["shape"]),
     lambda p, x: x + np.zeros(p["shape"]),  # autograd's broadcast_to fails on added axes
     broadcast_example(), ["broadcast_to"])
case("getitem", lambda p, x: x[p["index"]], lambda p, x: x[p["index"]], getitem_example(),
     ["getitem"])
case("untake", lambda p, g: mr.untake(g, p["index"], p["shape"]),
     lambda p, g: untake_oracle(g, p["index"], p["shape"]), untake_example(), ["untake"])
case("pad", lambda p, x: mr.pad(x, p["widths"]),
     lambda p, x: anp.pad(x, p["widths"], "constant") if x.ndim else x, pad_example(),
     ["pad"])
case("concat", lambda p, *xs: mr.concat(xs, p["axis"]),
     lambda p, *xs: anp.concatenate(xs, axis=p["axis"]), concat_example(), ["concat"])
case("stack", lambda p, *xs: mr.stack(xs, p["axis"]),
     lambda p, *xs: anp.stack(xs, axis=p["axis"]), stack_example(), ["concat", "reshape"])

# linear algebra and convolution
case("matmul", lambda p, x, y: x @ y, lambda p, x, y: anp.matmul(x, y), matmul_example(),
     ["matmul"])
case("tensordot", lambda p, x, y: mr.tensordot(x, y, p["axes"]),
     lambda p, x, y: anp.tensordot(x, y, p["axes"]), tensordot_example(), ["tensordot"])
case("im2col", lambda p, x: mr.im2col(x, p["kh"], p["kw"], p["stride"], p["padding"]),
     lambda p, x: im2col_oracle(x, p["kh"], p["kw"], p["stride"], p["padding"]),
     im2col_example(), ["im2col"])
case("col2im",
     lambda p, c: mr.col2im(c, p["height"], p["width"], p["stride"], p["padding"]),
     lambda p, c: col2im_oracle(c, p["height"], p["width"], p["stride"], p["padding"]),
     col2im_example(), ["col2im"])
case("conv", lambda p, x, w: mr.conv(x, w, p["stride"], p["padding"]),
     lambda p, x, w: _over_leads(lambda a, b: conv2d_oracle(a, b, None, p["stride"],
                                                            p["padding"]), x, w),
     conv_primitive_example("conv"), ["conv"])
case("conv_transpose",
     lambda p, g, w: mr.conv_transpose(g, w, p["height"], p["width"], p["stride"], p["padding"]),
     lambda p, g, w: conv_transpose_oracle(g, w, p["height"], p["width"], p["stride"],
                                           p["padding"]),
     conv_primitive_example("conv_transpose"), ["conv_transpose"])
case("conv_weight_grad",
     lambda p, x, g: mr.conv_weight_grad(x, g, p["kh"], p["kw"], p["stride"], p["padding"]),
     lambda p, x, g: conv_weight_grad_oracle(x, g, p["kh"], p["kw"], p["stride"], p["padding"]),
     conv_primitive_example("conv_weight_grad"), ["conv_weight_grad"])

# normalisation
case("standardize", lambda p, x: mr.standardize(x, p["axis"], p["eps"]),
     lambda p, x: standardize_oracle(x, _axes(p["axis"], x.ndim), p["eps"]),
     standardize_example(), ["standardize"])
case("inv_std", lambda p, x: mr.inv_std(x, p["axis"], p["eps"]),
     lambda p, x: inv_std_oracle(x, _axes(p["axis"], x.ndim), p["eps"]),
     standardize_example(), ["inv_std"])
case("standardize_affine", lambda p, x, w, b: mr.standardize_affine(x, w, b, p["axis"], p["eps"]),
     lambda p, x, w, b: standardize_oracle(x, _axes(p["axis"], x.ndim), p["eps"])
     * _per_channel(w, x, _axes(p["axis"], x.ndim)) + _per_channel(b, x, _axes(p["axis"], x.ndim)),
     standardize_affine_example(), ["standardize_affine"])
case("standardize_affine_grad",
     lambda p, g, x, w: mr.standardize_affine_grad(g, x, w, p["axis"], p["eps"]),
     lambda p, g, x, w: standardize_affine_grad_oracle(g, x, w, _axes(p["axis"], x.ndim),
                                                       p["eps"]),
     standardize_affine_example(grad=True), ["standardize_affine_grad"])

# neural-network functions
case("conv2d",
     lambda p, x, w, *b: F.conv2d(x, w, b[0] if b else None, p["stride"], p["padding"]),
     lambda p, x, w, *b: conv2d_oracle(x, w, b[0] if b else None, p["stride"], p["padding"]),
     conv_example(), ["conv"])
case("batch_norm", batch_norm_fun, batch_norm_oracle, batch_norm_example(),
     ["standardize_affine"])
case("batch_norm_eval", batch_norm_eval_fun,
     lambda p, x: batch_norm_oracle({"training": False, "weight": True, "bias": True,
                                     "eps": p["eps"]}, x, *p["consts"]),
     batch_norm_eval_example(), ["mul", "add"])
case("linear", lambda p, x, w, *b: F.linear(x, w, *b),
     lambda p, x, w, *b: anp.dot(x, w.T) + (b[0] if b else 0.0), linear_example(),
     ["tensordot"])
case("avg_pool2d", lambda p, x: F.avg_pool2d(x, p["kernel"], p["stride"], p["padding"]),
     lambda p, x: avg_pool_oracle(x, p["kernel"], p["s"], p["padding"]), avg_pool_example(),
     ["im2col", "sum"])
case("adaptive_avg_pool2d", lambda p, x: F.adaptive_avg_pool2d(x, p["output_size"]),
     lambda p, x: anp.mean(anp.reshape(x, x.shape[:2] + (
         _pair(p["output_size"])[0], x.shape[2] // _pair(p["output_size"])[0],
         _pair(p["output_size"])[1], x.shape[3] // _pair(p["output_size"])[1])), axis=(3, 5)),
     adaptive_pool_example(), ["reshape", "sum"])
case("cross_entropy",
     lambda p, z: F.cross_entropy(z, _bk(p["target"]), reduction=p["reduction"]),
     cross_entropy_oracle, cross_entropy_example(), ["logsumexp", "sum"])
case("mse_loss", lambda p, x, t: F.mse_loss(x, t, reduction=p["reduction"]),
     lambda p, x, t: _reduce((x - t) ** 2, p["reduction"]), mse_example(), ["sub", "mul"])

CASES_BY_NAME = {c.name: c for c in CASES}
assert len(CASES_BY_NAME) == len(CASES), "duplicate case names"
