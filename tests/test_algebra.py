"""Algebraic identities that the engine's derivatives and layers must satisfy exactly (up to
rounding): adjointness (im2col/col2im, jvp/vjp), the Jacobian built three ways, Hessian-vector
products, conv2d as a dense matrix, batch-norm invariances and running statistics, positive
homogeneity, residual Jacobians and the linearity of pullbacks.

Tolerances are rounding-error bounds, not fudge factors. ``U = 2**-53`` is the unit roundoff;
a sum of ``k`` float64 products has an error of at most about ``k * U`` times the same sum taken
over absolute values (Higham, *Accuracy and Stability of Numerical Algorithms*, sec. 3.1).
Where a check compares two different evaluation orders of one quantity, its tolerance is such a
bound (with a small constant for the other rounding steps), or a fixed relative tolerance whose
reason is given beside it. Comparisons that must hold bit for bit (one-hot inputs, powers of two,
repeated evaluation) are asserted with exact equality.

``_WORST`` records the largest normalised error seen per property (for reports; it never
affects a verdict).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import miniresnet as mr
import miniresnet.functional as F
from miniresnet.ops import conv_output_size
from miniresnet.testing import relative_error
from miniresnet.testing.strategies import conv_configs, host_arrays, shapes, to_backend_array

U = float(np.finfo(np.float64).eps) / 2  # unit roundoff of float64, 2**-53
TINY = float(np.finfo(np.float64).smallest_subnormal)  # the spacing of float64 near 0

_WORST: dict[str, float] = {}


def _record(prop: str, value: float) -> float:
    _WORST[prop] = max(_WORST.get(prop, 0.0), float(value))
    return value


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def host(a) -> np.ndarray:
    """A float64 NumPy copy of a backend array or Tensor."""
    return np.array(mr.tensor(a).numpy(), dtype=np.float64)


def dev(a: np.ndarray):
    """Host data onto the current backend (as a copy: in-place updates never reach ``a``)."""
    return to_backend_array(np.array(a, dtype=np.float64))


def _inner_and_scale(pairs) -> tuple[float, float]:
    """``sum <a, b>`` over the pairs, and the same sum over absolute values (its condition)."""
    value = scale = 0.0
    for a, b in pairs:
        ha, hb = host(a).ravel(), host(b).ravel()
        value += float(ha @ hb)
        scale += float(np.abs(ha) @ np.abs(hb))
    return value, scale


def assert_inner_products_agree(left, right, rtol: float, what: str, floor: float = 0.0) -> float:
    """``sum <a, b>`` over ``left`` equals the same over ``right``, relative to the larger of the
    two absolute-value sums (the size of the terms that were added) and ``floor``."""
    lv, ls = _inner_and_scale(left)
    rv, rs = _inner_and_scale(right)
    scale = max(ls, rs, floor, 1e-300)
    err = abs(lv - rv) / scale
    assert err <= rtol, (
        f"{what}: {lv!r} != {rv!r}; difference {abs(lv - rv):.3e} is {err:.3e} of the "
        f"scale {scale:.3e} (allowed {rtol:.1e})"
    )
    return err


def assert_close(actual, expected, rtol: float, what: str) -> float:
    """``max|actual - expected| <= rtol * max|expected|`` (miniresnet.testing.relative_error)."""
    a, e = host(actual), host(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    err = relative_error(a, e)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"
    return err


def assert_identical(actual, expected, what: str) -> None:
    """Bit-for-bit equality of values (``-0.0 == 0.0``)."""
    a, e = host(actual), host(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    if not np.array_equal(a, e):
        bad = np.argwhere(a != e)
        first = tuple(int(i) for i in bad[0])
        raise AssertionError(
            f"{what}: {len(bad)} of {a.size} entries differ, e.g. at {first}: {a[first]!r} != "
            f"{e[first]!r} (max abs difference {np.max(np.abs(a - e)):.3e})"
        )


def _ratio(err: np.ndarray, bound: np.ndarray) -> float:
    """The largest ``err / bound`` (for the record; 0 where both are 0)."""
    return float(np.max(np.divide(err, bound, out=np.zeros(np.shape(err)), where=bound > 0)))


def _no_tiny(a: np.ndarray) -> np.ndarray:
    """Flush magnitudes below 2**-30 to zero, so products and sums never underflow (power-of-two
    scaling is then exact in floating point)."""
    return np.where(np.abs(a) < 2.0**-30, 0.0, a)


def _unit(a: np.ndarray) -> np.ndarray:
    """``a`` scaled to max-norm 1 (all ones if ``a`` is zero): a direction of definite size."""
    m = float(np.max(np.abs(a), initial=0.0))
    return a / m if m > 0 else np.ones_like(a)


# ----------------------------------------------------------------------------------------------
# functions under test: name -> (f, strategy of host input tuples)
# ----------------------------------------------------------------------------------------------


def _conv_bn_relu_net(x, w1, gamma, beta, w2):
    h = F.conv2d(x, w1, padding=1)
    h = F.batch_norm(h, None, None, gamma, beta, training=True)
    return F.conv2d(F.relu(h), w2, stride=2)


@st.composite
def _conv_bn_relu_inputs(draw, small: bool = False):
    side = 3 if small else 4
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    f = draw(st.integers(1, 2 if small else 3))
    h, w = draw(st.integers(2, side)), draw(st.integers(2, side))
    k = 2 if small else 3
    return (draw(host_arrays((n, c, h, w))), draw(host_arrays((f, c, k, k))),
            draw(host_arrays((f,), low=0.5, high=2.0)), draw(host_arrays((f,))),
            draw(host_arrays((2, f, 2, 2))))


def _mlp_tanh(x, w1, w2):
    # mr.matmul, not @: under jacobian(argnums=...) the other arguments may arrive as raw
    # arrays (see test_jacobian_argnums_of_a_bilinear_map)
    return mr.tanh(mr.matmul(mr.tanh(mr.matmul(x, w1)), w2)) * mr.sigmoid(x[..., :1])


@st.composite
def _mlp_tanh_inputs(draw, small: bool = False):
    b, n = draw(st.integers(1, 2)), draw(st.integers(1, 2 if small else 3))
    d, h, o = (draw(st.integers(1, 3)) for _ in range(3))
    return (draw(host_arrays((b, n, d))), draw(host_arrays((d, h))), draw(host_arrays((h, o))))


def _reductions(x):
    z = (x - mr.mean(x, 1, keepdims=True)) / mr.sqrt(mr.var(x, 1, keepdims=True) + 1.0)
    parts = [mr.sum(x, 0), mr.mean(x, 1), mr.var(x, 0), mr.max(x, 1), mr.logsumexp(x, 0),
             mr.reshape(mr.sum(x * x), (1,)), mr.reshape(mr.max(x), (1,)), mr.reshape(z, (-1,))]
    return mr.concat(parts, 0)


@st.composite
def _reductions_inputs(draw, small: bool = False):
    side = 3 if small else 4
    return (draw(host_arrays((draw(st.integers(1, side)), draw(st.integers(1, side))))),)


def _indexing(x, y):
    a, b, c = x.shape
    p = mr.pad(x[1:, ::2], ((1, 0), (0, b - (b + 1) // 2), (0, 0)))  # back to (a, b, c)
    q = mr.reshape(mr.transpose(y, (1, 0, 2)), (a, b, c))
    s = mr.stack([p, q], axis=1)  # (a, 2, b, c)
    d = mr.concat([s, mr.broadcast_to(mr.reshape(x[:, :, :1], (a, 1, b, 1)), (a, 2, b, 1))], 3)
    e = mr.where(d > 0, d, d * d * 0.5)
    # (indices with None are covered by test_getitem_vjp_is_untake)
    return e * mr.reshape(x[0, :, :1], (1, 1, b, 1)) + mr.reshape(y[-1, :, 1:2], (1, 1, b, 1))


@st.composite
def _indexing_inputs(draw, small: bool = False):
    shape = (draw(st.integers(2, 3)), draw(st.integers(2, 3 if small else 4)),
             draw(st.integers(2, 3)))
    return draw(host_arrays(shape)), draw(host_arrays(shape))


def _elementwise(x, y):
    return (mr.exp(-y) * mr.log(x) + mr.sqrt(x) / mr.sigmoid(y) - x**3 / (1.0 + y * y)
            + mr.relu(y) * x)


@st.composite
def _elementwise_inputs(draw, small: bool = False):
    shape = draw(st.sampled_from([(3,), (2, 3), (2, 1, 2)]))
    return draw(host_arrays(shape, low=0.5, high=2.0)), draw(host_arrays(shape))


FUNCTIONS = {
    "conv_bn_relu": (_conv_bn_relu_net, _conv_bn_relu_inputs),
    "mlp_tanh": (_mlp_tanh, _mlp_tanh_inputs),
    "reductions": (_reductions, _reductions_inputs),
    "indexing": (_indexing, _indexing_inputs),
    "elementwise": (_elementwise, _elementwise_inputs),
}


def _draw_inputs(data, name: str, small: bool = False):
    fn, inputs = FUNCTIONS[name]
    return fn, [dev(a) for a in data.draw(inputs(small=small), label="inputs")]


def _draw_like(data, arrays, label: str, unit: bool = False):
    """Arrays shaped like ``arrays``; with ``unit``, each of max-norm 1 (see :func:`_unit`)."""
    drawn = [data.draw(host_arrays(tuple(a.shape)), label=label) for a in arrays]
    return [dev(_unit(d) if unit else d) for d in drawn]


# ----------------------------------------------------------------------------------------------
# 1. im2col / col2im are adjoint
# ----------------------------------------------------------------------------------------------


@given(cfg=conv_configs(), lead=st.integers(0, 1), data=st.data())
def test_col2im_is_the_adjoint_of_im2col(cfg, lead, data):
    (n, c, h, w), (_, _, kh, kw) = cfg["x_shape"], cfg["w_shape"]
    stride, padding = cfg["stride"], cfg["padding"]
    extra = (2,) * lead  # im2col / col2im also take leading batch axes
    x = data.draw(host_arrays(extra + cfg["x_shape"]), label="x")
    y = data.draw(host_arrays(extra + (n, c, kh, kw) + cfg["out_hw"]), label="y")
    cols = mr.im2col(dev(x), kh, kw, stride, padding)
    img = mr.col2im(dev(y), h, w, stride, padding)
    # Both sides are the same products y_p * x_q, summed in different orders: error <= n U scale
    # with n <= 2 * 2 * 3 * 3 * 3 * 36 ~ 4000 terms in the worst drawn case, so 1e-12.
    _record("1 im2col adjoint", assert_inner_products_agree(
        [(img, x)], [(y, cols)], 1e-12, "<col2im(y), x> vs <y, im2col(x)>"))


@given(cfg=conv_configs(max_batch=1, max_channels=2, max_size=5))
def test_im2col_and_col2im_matrices_are_exact_transposes(cfg):
    (n, c, h, w), (_, _, kh, kw) = cfg["x_shape"], cfg["w_shape"]
    stride, padding = cfg["stride"], cfg["padding"]
    cols_shape = (n, c, kh, kw) + cfg["out_hw"]
    n_in, n_out = math.prod(cfg["x_shape"]), math.prod(cols_shape)
    # Row i of A is im2col(e_i); row j of B is col2im(e_j): one-hot data, so both are exact 0/1
    # matrices (a sum of one 1.0 and zeros) and must be exact transposes.
    a = host(mr.im2col(dev(np.eye(n_in).reshape((n_in,) + cfg["x_shape"])), kh, kw, stride,
                       padding)).reshape(n_in, n_out)
    b = host(mr.col2im(dev(np.eye(n_out).reshape((n_out,) + cols_shape)), h, w, stride,
                       padding)).reshape(n_out, n_in)
    assert set(np.unique(a)) <= {0.0, 1.0}
    assert np.all(a.sum(axis=0) <= 1.0)  # every patch entry is one pixel or padding
    assert_identical(b, a.T, "col2im matrix vs transpose of im2col matrix")


# ----------------------------------------------------------------------------------------------
# 2. jvp and vjp are adjoint: <J v, u> = <v, J^T u>
# ----------------------------------------------------------------------------------------------


def check_jvp_vjp_adjoint(fn, xs, vs, u, rtol: float) -> float:
    """<u, J v> by forward mode equals <J^T u, v> by reverse mode.

    The scale is the larger of the absolute-value sums of the two inner products and
    ``|u|_1 max|J| |v|_1``, a bound of |<u, J v>| through the largest Jacobian entry in any
    argument (all inputs are O(1), so the blocks share one scale). The second term matters
    where O(1) terms cancel exactly inside the function: batch norm of a constant channel, say,
    whose output cannot depend on the centred direction of its input, leaves both sides pure
    rounding noise of a few U times the terms, while the absolute-value sums of the final
    inner products are themselves that small.
    """
    _, jv = mr.jvp(fn, tuple(xs), tuple(vs))
    _, vjp_fn = mr.vjp(fn, *xs)
    cts = vjp_fn(u)
    assert len(cts) == len(xs)
    jac = mr.jacobian(fn, argnums=tuple(range(len(xs))))(*xs)
    j_max = max(float(np.max(np.abs(host(j)), initial=0.0)) for j in jac)
    floor = (float(np.sum(np.abs(host(u)))) * j_max
             * sum(float(np.sum(np.abs(host(v)))) for v in vs))
    return assert_inner_products_agree(
        [(u, jv)], list(zip(cts, vs)), rtol, "<u, J v> (jvp) vs <J^T u, v> (vjp)", floor)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@given(data=st.data())
def test_jvp_and_vjp_are_adjoint(name, data):
    fn, xs = _draw_inputs(data, name)
    vs = _draw_like(data, xs, "tangents")
    out, _ = mr.vjp(fn, *xs)
    u = dev(data.draw(host_arrays(tuple(out.shape)), label="cotangent"))
    # Forward and reverse mode evaluate the same linear map through different orders of the
    # same products: a few U of the scale (see check_jvp_vjp_adjoint; largest seen in 300
    # examples per function and backend: 6e-16); allowance 1e-12.
    _record(f"2 jvp/vjp adjoint [{name}]", check_jvp_vjp_adjoint(fn, xs, vs, u, 1e-12))


GETITEM_INDICES = {
    "slices": (slice(1, None), slice(None, None, 2), slice(None)),
    "partial": (slice(1, None), slice(None, None, 2)),  # trailing axes implied, as in NumPy
    "int-ellipsis": (0, Ellipsis, 1),
    "negative": (slice(None), -1, slice(1, 3)),
    "reversed": (slice(None, None, -1), slice(None), slice(None, None, -2)),
    "none": (None, slice(None), None, 0, slice(None)),
    "ellipsis-none": (Ellipsis, None),
}


@pytest.mark.parametrize("kind", sorted(GETITEM_INDICES))
@given(data=st.data())
def test_getitem_vjp_is_untake_and_adjoint(kind, data):
    index = GETITEM_INDICES[kind]
    shape = (data.draw(st.integers(2, 3)), data.draw(st.integers(3, 4)),
             data.draw(st.integers(3, 4)))
    x = data.draw(host_arrays(shape), label="x")
    picked = x[index]
    g = data.draw(host_arrays((2,) + picked.shape), label="cotangents")  # a stack of two
    v = data.draw(host_arrays(shape), label="tangent")
    out, vjp_fn = mr.vjp(lambda t: t[index], dev(x))
    assert_identical(out, picked, f"x{index}")
    (ct,) = vjp_fn(dev(g))
    expected = np.zeros((2,) + shape)
    expected[(slice(None),) + index] = g  # the adjoint of picking: writing into zeros
    assert_identical(ct, expected, f"vjp of x{index}")
    assert_identical(mr.jvp(lambda t: t[index], (dev(x),), (dev(v),))[1], v[index],
                     f"jvp of x{index}")
    # <x[index], g> = <x, untake(g)>: the same <= 48 products, summed in other orders
    _record("2 getitem adjoint", assert_inner_products_agree(
        [(out, g[0])], [(dev(x), host(ct)[0])], 1e-14, "<x[index], g> vs <x, vjp(g)>"))


# ----------------------------------------------------------------------------------------------
# 3. the Jacobian: reverse rows, forward columns, chunk sizes, argnums
# ----------------------------------------------------------------------------------------------


def _basis(n: int, k: int, shape) -> np.ndarray:
    e = np.zeros(n)
    e[k] = 1.0
    return e.reshape(shape)


@pytest.mark.parametrize("name", ["conv_bn_relu", "mlp_tanh", "reductions", "indexing"])
@given(data=st.data())
def test_jacobian_equals_stacked_vjps_and_jvps(name, data):
    fn, xs = _draw_inputs(data, name, small=True)
    nums = tuple(range(len(xs)))
    out, vjp_fn = mr.vjp(fn, *xs)
    out_shape = tuple(out.shape)
    m = math.prod(out_shape)
    jac = mr.jacobian(fn, argnums=nums)(*xs)
    assert isinstance(jac, tuple) and len(jac) == len(xs)
    for j, x in zip(jac, xs):
        assert tuple(j.shape) == out_shape + tuple(x.shape)

    def whole(blocks, rows=m):
        """The Jacobian in all arguments as one (outputs, inputs) matrix."""
        return np.concatenate([np.reshape(host(b), (rows, -1)) for b in blocks], axis=1)

    # Comparisons are relative to the largest entry of this whole matrix, the natural scale of
    # its rounding: a block can be tiny by cancellation of O(1) terms (batch norm is nearly
    # invariant to the scale of its input, so d out / d x can be ~eps = 1e-5 while the terms
    # summed are O(1)), and relative to such a block's own size any rounding looks large.
    full = whole(jac)

    # one reverse pass per output basis vector
    rows = [vjp_fn(dev(_basis(m, i, out_shape))) for i in range(m)]
    by_rows = np.concatenate([whole(r, rows=1) for r in rows])
    # the same reverse pass, batched over a stack of cotangents or one row at a time: the
    # batched contractions may sum in another order, a few U of max |J|
    _record("3 jacobian vs vjp rows", assert_close(full, by_rows, 1e-13,
                                                   "jacobian vs stacked vjps"))

    # one forward pass per input basis vector
    zeros = [dev(np.zeros(tuple(x.shape))) for x in xs]
    cols = []
    for k, x in enumerate(xs):
        n = math.prod(x.shape)
        for i in range(n):
            tangents = list(zeros)
            tangents[k] = dev(_basis(n, i, tuple(x.shape)))
            cols.append(host(mr.jvp(fn, tuple(xs), tuple(tangents))[1]).reshape(m))
    # forward vs reverse mode: other orders of the same products (at most ~50 per entry here,
    # through a few layers), under 1e-14 of max |J| in practice; allowance 1e-12
    _record("3 jacobian vs jvp columns", assert_close(full, np.stack(cols, axis=-1), 1e-12,
                                                      "jacobian vs stacked jvps"))

    # chunking only splits the stack of basis cotangents
    for chunk in (1, 3, None):
        chunked = mr.jacobian(fn, argnums=nums, chunk_size=chunk)(*xs)
        _record("3 jacobian chunk sizes", assert_close(
            whole(chunked), full, 1e-13, f"jacobian chunk_size={chunk}"))


@given(data=st.data())
def test_jacobian_with_several_argnums(data):
    fn, xs = _draw_inputs(data, "mlp_tanh", small=True)
    full = mr.jacobian(fn, argnums=(0, 1, 2))(*xs)
    # each argument alone, by position and by negative position
    for k in range(3):
        _record("3 jacobian argnums", assert_close(
            mr.jacobian(fn, argnums=k)(*xs), full[k], 1e-14, f"argnums={k}"))
        _record("3 jacobian argnums", assert_close(
            mr.jacobian(fn, argnums=k - 3)(*xs), full[k], 1e-14, f"argnums={k - 3}"))
    # a subset in another order comes back in that order
    j2, j0 = mr.jacobian(fn, argnums=(2, 0))(*xs)
    _record("3 jacobian argnums", assert_close(j2, full[2], 1e-14, "argnums=(2, 0)[0]"))
    _record("3 jacobian argnums", assert_close(j0, full[0], 1e-14, "argnums=(2, 0)[1]"))
    # and the Jacobians contract with tangents to the jvp in all arguments at once, up to
    # (number of terms) U of the same contraction over absolute values
    vs = _draw_like(data, xs, "tangents")
    _, jv = mr.jvp(fn, tuple(xs), tuple(vs))
    total = sum(np.tensordot(host(j), host(v), axes=host(v).ndim) for j, v in zip(full, vs))
    size = sum(np.tensordot(np.abs(host(j)), np.abs(host(v)), axes=host(v).ndim)
               for j, v in zip(full, vs))
    err = float(np.max(np.abs(host(jv) - total))) / max(float(np.max(size)), 1e-300)
    assert err <= 1e-12, f"sum_k J_k v_k vs jvp: {err:.3e} of the absolute-value size"
    _record("3 jacobian argnums", err)


@given(data=st.data())
def test_jacobian_argnums_of_a_bilinear_map(data):
    n, k, m = (data.draw(st.integers(1, 3)) for _ in range(3))
    x = data.draw(host_arrays((n, k)), label="x")
    w = data.draw(host_arrays((k, m)), label="w")
    f = lambda a, b: a @ b  # noqa: E731  (the argument not differentiated is used as is)
    # d(x w)_ij / dw_pq = x_ip [j = q] and d(x w)_ij / dx_pq = [i = p] w_qj: every Jacobian
    # entry is one product with 1.0 (plus exact zeros), so the comparisons are exact
    expected_w = np.einsum("ip,jq->ijpq", x, np.eye(m))
    expected_x = np.einsum("ip,qj->ijpq", np.eye(n), w)
    jw, jx = mr.jacobian(f, argnums=(1, 0))(dev(x), dev(w))
    assert_identical(jw, expected_w, "argnums=(1, 0)[0]: d(x @ w)/dw")
    assert_identical(jx, expected_x, "argnums=(1, 0)[1]: d(x @ w)/dx")
    assert_identical(mr.jacobian(f, argnums=1)(dev(x), dev(w)), expected_w, "argnums=1")
    assert_identical(mr.jacobian(f, argnums=0)(dev(x), dev(w)), expected_x, "argnums=0")


# ----------------------------------------------------------------------------------------------
# 4. Hessian-vector products
# ----------------------------------------------------------------------------------------------


def _scalar_mlp(x, w):
    return (mr.sum(mr.tanh(x @ w) ** 2) + mr.logsumexp(x * x) + mr.sum(mr.sigmoid(x) * x))


def _scalar_conv(x, w):
    y = F.conv2d(x, w, padding=1)
    return mr.logsumexp(y) + mr.mean(mr.tanh(y) ** 2) + mr.sum(mr.exp(-(x * x)))


@st.composite
def _scalar_inputs(draw, name: str):
    if name == "mlp":
        n, d, h = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
        return draw(host_arrays((n, d))), draw(host_arrays((d, h)))
    n, c, f, s = (draw(st.integers(1, 2)) for _ in range(4))
    return (draw(host_arrays((n, c, s + 1, s + 1))),
            draw(host_arrays((f, c, 3, 3), low=-1.0, high=1.0)))


SCALAR_FUNCTIONS = {"mlp": _scalar_mlp, "conv": _scalar_conv}


@pytest.mark.parametrize("name", sorted(SCALAR_FUNCTIONS))
@given(data=st.data())
def test_hvp_is_symmetric_and_matches_finite_differences(name, data):
    f = SCALAR_FUNCTIONS[name]
    xs = tuple(dev(a) for a in data.draw(_scalar_inputs(name), label="primals"))
    u = tuple(dev(_unit(data.draw(host_arrays(tuple(x.shape)), label="u"))) for x in xs)
    v = tuple(dev(_unit(data.draw(host_arrays(tuple(x.shape)), label="v"))) for x in xs)
    hv = mr.hvp(f, xs, v)
    hu = mr.hvp(f, xs, u)
    assert isinstance(hv, tuple) and len(hv) == 2
    # <u, H v> and <v, H u>: forward-over-reverse twice, different products summed; relative
    # to the absolute-value sums they agree to ~1e-14, allowance 1e-12
    _record(f"4 hvp symmetric [{name}]", assert_inner_products_agree(
        list(zip(u, hv)), list(zip(v, hu)), 1e-12, "<u, H v> vs <v, H u>"))

    # central differences of the gradient: truncation eps^2 |f'''| / 6 ~ 1e-10, and the
    # gradient's own rounding (some tens of U of its terms) divided by 2 eps, ~1e-9 relative to
    # max(|H v|, |grad f|); the largest seen in 300-example runs is 6e-8; allowance 1e-6
    eps = 1e-5
    g = mr.grad(f, argnums=(0, 1))
    plus = g(*(dev(host(x) + eps * host(t)) for x, t in zip(xs, v)))
    minus = g(*(dev(host(x) - eps * host(t)) for x, t in zip(xs, v)))
    fd = np.concatenate([((host(p) - host(q)) / (2 * eps)).ravel() for p, q in zip(plus, minus)])
    exact = np.concatenate([host(h).ravel() for h in hv])
    grad_scale = max(float(np.max(np.abs(host(t)))) for t in g(*xs))
    scale = max(float(np.max(np.abs(exact))), grad_scale)
    err = float(np.max(np.abs(fd - exact))) / scale
    assert err <= 1e-6, f"hvp vs central differences of grad: {err:.3e} of scale {scale:.3e}"
    _record(f"4 hvp vs finite differences [{name}]", err)


@pytest.mark.parametrize("name", sorted(SCALAR_FUNCTIONS))
@given(data=st.data())
def test_hvp_equals_jacobian_of_grad_times_v(name, data):
    x, w = (dev(a) for a in data.draw(_scalar_inputs(name), label="primals"))
    v = dev(data.draw(host_arrays(tuple(x.shape)), label="v"))
    f = lambda t: SCALAR_FUNCTIONS[name](t, w)  # noqa: E731
    n = math.prod(x.shape)
    hess = host(mr.jacobian(mr.grad(f))(x)).reshape(n, n)
    hv = host(mr.hvp(f, x, v)).ravel()
    # reverse-over-reverse then a matrix-vector product (n <= 36 terms) vs forward-over-
    # reverse: relative to the product over absolute values, |H| |v|, a few tens of U; 1e-12
    size = max(float(np.max(np.abs(hess) @ np.abs(host(v)).ravel())), 1e-300)
    err = float(np.max(np.abs(hv - hess @ host(v).ravel()))) / size
    assert err <= 1e-12, f"hvp vs jacobian(grad(f)) @ v: {err:.3e} of max(|H| |v|)"
    _record(f"4 hvp vs jacobian(grad) v [{name}]", err)
    _record(f"4 hessian symmetric [{name}]", assert_close(
        hess, hess.T, 1e-12, "jacobian(grad(f)) is symmetric"))


# ----------------------------------------------------------------------------------------------
# 5. conv2d is multiplication by a dense matrix
# ----------------------------------------------------------------------------------------------


def explicit_conv_matrix(w: np.ndarray, x_shape, stride, padding) -> np.ndarray:
    """The matrix of x -> conv2d(x, w) (cross-correlation), entry by entry from ``w``."""
    n, c, h, wd = x_shape
    f, _, kh, kw = w.shape
    oh = conv_output_size(h, kh, stride[0], padding[0])
    ow = conv_output_size(wd, kw, stride[1], padding[1])
    m = np.zeros((n, f, oh, ow, n, c, h, wd))
    for b in range(n):
        for fo in range(f):
            for r in range(oh):
                for s in range(ow):
                    for ci in range(c):
                        for i in range(kh):
                            for j in range(kw):
                                row = r * stride[0] + i - padding[0]
                                col = s * stride[1] + j - padding[1]
                                if 0 <= row < h and 0 <= col < wd:
                                    m[b, fo, r, s, b, ci, row, col] += w[fo, ci, i, j]
    return m.reshape(n * f * oh * ow, n * c * h * wd)


def conv_matrix_by_basis(w, x_shape, stride, padding) -> np.ndarray:
    """The matrix of x -> conv2d(x, w): conv2d applied to every basis input at once."""
    n_in = math.prod(x_shape)
    basis = dev(np.eye(n_in).reshape((n_in * x_shape[0],) + tuple(x_shape[1:])))
    out = host(F.conv2d(basis, w, stride=stride, padding=padding))
    return out.reshape(n_in, -1).T


@given(cfg=conv_configs(), data=st.data())
def test_conv2d_is_multiplication_by_its_dense_matrix(cfg, data):
    stride, padding = cfg["stride"], cfg["padding"]
    w_host = data.draw(host_arrays(cfg["w_shape"]), label="w")
    x_host = data.draw(host_arrays(cfg["x_shape"]), label="x")
    bias = data.draw(host_arrays((cfg["w_shape"][0],)), label="bias")
    w, x = dev(w_host), dev(x_host)
    explicit = explicit_conv_matrix(w_host, cfg["x_shape"], stride, padding)
    # With one-hot inputs (or one-hot cotangents) every output is one weight times 1.0 plus
    # exact zeros, so all three constructions agree bit for bit.
    assert_identical(conv_matrix_by_basis(w, cfg["x_shape"], stride, padding), explicit,
                     "conv2d on basis inputs vs explicit matrix")
    jac = host(mr.jacobian(lambda t: F.conv2d(t, w, stride=stride, padding=padding))(x))
    assert_identical(jac.reshape(explicit.shape), explicit, "jacobian(conv2d) vs explicit matrix")

    out = host(F.conv2d(x, w, dev(bias), stride=stride, padding=padding))
    mx = (explicit @ x_host.ravel()).reshape(out.shape) + bias.reshape(1, -1, 1, 1)
    # each output is a sum of k = C kh kw products plus the bias, computed twice in different
    # orders: |difference| <= 2 (k + 2) U (|M| |x| + |bias|), entry by entry
    k = cfg["w_shape"][1] * cfg["w_shape"][2] * cfg["w_shape"][3]
    bound = 2 * (k + 2) * U * ((np.abs(explicit) @ np.abs(x_host).ravel()).reshape(out.shape)
                               + np.abs(bias).reshape(1, -1, 1, 1))
    diff = np.abs(out - mx)
    assert np.all(diff <= bound), f"conv2d(x) vs M @ vec(x) + b: {np.max(diff - bound):.3e}"
    _record("5 conv2d vs M vec(x) (rel. to bound)", float(np.max(diff / (bound + 1e-300))))
    _record("5 conv2d vs M vec(x) (abs)", float(np.max(diff)))


# ----------------------------------------------------------------------------------------------
# 6. batch normalisation
# ----------------------------------------------------------------------------------------------


def _channels(a: np.ndarray) -> np.ndarray:
    """(C, count): every channel's values in one row (channel axis 1)."""
    return np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


@st.composite
def bn_inputs(draw, ndim: int):
    """(N, C) or (N, C, H, W) input whose every channel has a standard deviation >= 0.1."""
    if ndim == 2:
        shape = (draw(st.integers(2, 6)), draw(st.integers(1, 3)))
    else:
        shape = tuple(draw(st.integers(1, 3)) for _ in range(4))
    count = math.prod(shape) // shape[1]
    assume(count >= 2)
    x = draw(host_arrays(shape), label="x")
    rows = _channels(x) + np.linspace(-2.0, 2.0, count)  # a ramp gives every channel spread
    assume(float(rows.std(axis=1).min()) >= 0.1)
    rest = (shape[0],) + shape[2:]
    return np.ascontiguousarray(np.moveaxis(rows.reshape((shape[1],) + rest), 0, 1))


def _conditioning(x: np.ndarray) -> tuple[int, np.ndarray]:
    """The per-channel count and kappa = max|x| / sigma + max|x_hat|: rounding in x_hat is
    below about count * U * kappa (the mean's error, max|x| count U, divided by sigma, plus the
    variance's relative error count U times |x_hat|)."""
    rows = _channels(x)
    sigma = rows.std(axis=1)
    x_hat = (rows - rows.mean(axis=1, keepdims=True)) / sigma[:, None]
    return rows.shape[1], np.abs(rows).max(axis=1) / sigma + np.abs(x_hat).max(axis=1)


@pytest.mark.parametrize("ndim", [2, 4])
@given(data=st.data())
def test_batch_norm_training_output_is_standardised(ndim, data):
    x = data.draw(bn_inputs(ndim))
    eps = data.draw(st.sampled_from([0.0, 1e-5, 0.5]), label="eps")
    out = _channels(host(F.batch_norm(dev(x), None, None, training=True, eps=eps)))
    var_x = _channels(x).var(axis=1)
    count, kappa = _conditioning(x)
    tol = 8 * count * U * kappa  # see _conditioning
    mean_err = np.abs(out.mean(axis=1))
    var_err = np.abs(out.var(axis=1) - var_x / (var_x + eps))  # eps shrinks the variance
    assert np.all(mean_err <= tol), f"per-channel mean {mean_err} > {tol}"
    assert np.all(var_err <= 4 * tol), f"per-channel variance error {var_err} > {4 * tol}"
    _record("6 bn standardised (rel. to bound)", float(np.max(
        np.concatenate([mean_err / tol, var_err / (4 * tol)]))))
    _record("6 bn standardised (abs)", float(np.max(np.concatenate([mean_err, var_err]))))


@pytest.mark.parametrize("ndim", [2, 4])
@given(data=st.data())
def test_batch_norm_training_is_invariant_to_per_channel_affine_maps(ndim, data):
    x = data.draw(bn_inputs(ndim))
    c = x.shape[1]
    scale = data.draw(host_arrays((c,), low=0.25, high=4.0), label="scale")
    shift = data.draw(host_arrays((c,), low=-3.0, high=3.0), label="shift")
    gamma = data.draw(host_arrays((c,)), label="gamma")
    beta = data.draw(host_arrays((c,)), label="beta")
    moved = x * _per_channel(scale, ndim) + _per_channel(shift, ndim)

    def bn(t, eps):
        return _channels(host(F.batch_norm(dev(t), None, None, dev(gamma), dev(beta),
                                           training=True, eps=eps)))

    y = bn(x, 0.0)
    y_moved = bn(moved, 0.0)
    count, k1 = _conditioning(x)
    _, k2 = _conditioning(moved)
    # both x_hat within count U kappa of the truth (see _conditioning), times |gamma|, plus the
    # rounding of gamma x_hat + beta on each side
    tol = (8 * count * U * (k1 + k2) * np.abs(gamma) + 4 * U * np.abs(y).max(axis=1))[:, None]
    diff = np.abs(y_moved - y)
    assert np.all(diff <= tol), f"batch_norm(a x + b) != batch_norm(x): {np.max(diff - tol):.3e}"
    _record("6 bn affine invariance (rel. to bound)", _ratio(diff, tol))
    _record("6 bn affine invariance (abs)", float(np.max(diff)))
    # a shift alone leaves the batch variance unchanged, so any eps is fine
    shifted = x + _per_channel(shift, ndim)
    _, k3 = _conditioning(shifted)
    tol = (8 * count * U * (k1 + k3) * np.abs(gamma) + 4 * U * np.abs(y).max(axis=1))[:, None]
    diff = np.abs(bn(shifted, 1e-3) - bn(x, 1e-3))
    assert np.all(diff <= tol), f"batch_norm(x + b) != batch_norm(x): {np.max(diff - tol):.3e}"
    _record("6 bn affine invariance (rel. to bound)", _ratio(diff, tol))
    _record("6 bn affine invariance (abs)", float(np.max(diff)))


@pytest.mark.parametrize("ndim", [2, 4])
@given(data=st.data())
def test_batch_norm_input_gradient_is_orthogonal_to_ones_and_x_hat(ndim, data):
    x = data.draw(bn_inputs(ndim))
    g = data.draw(host_arrays(x.shape), label="cotangent")
    _, vjp_fn = mr.vjp(lambda t: F.batch_norm(t, None, None, training=True, eps=0.0), dev(x))
    (dx,) = vjp_fn(dev(g))
    dx = _channels(host(dx))
    rows = _channels(x)
    sigma = rows.std(axis=1)
    x_hat = (rows - rows.mean(axis=1, keepdims=True)) / sigma[:, None]
    count, kappa = _conditioning(x)
    # dx = (g - mean g - x_hat mean(g x_hat)) / sigma: its terms are at most
    # |g|(2 + max|x_hat|^2) / sigma, each carrying a relative rounding of ~count U kappa
    size = np.abs(_channels(g)).sum(axis=1) * (2 + np.abs(x_hat).max(axis=1) ** 2) / sigma
    tol = 8 * count * U * kappa * size + 1e-300
    along_ones = np.abs(dx.sum(axis=1))
    along_x_hat = np.abs((dx * x_hat).sum(axis=1))
    assert np.all(along_ones <= tol), f"<dx, 1> per channel {along_ones} > {tol}"
    assert np.all(along_x_hat <= tol), f"<dx, x_hat> per channel {along_x_hat} > {tol}"
    _record("6 bn gradient orthogonality (rel. to bound)",
            float(np.max(np.concatenate([along_ones / tol, along_x_hat / tol]))))
    _record("6 bn gradient orthogonality (abs)",
            float(np.max(np.concatenate([along_ones, along_x_hat]))))


@pytest.mark.parametrize("container", ["array", "tensor"])
@pytest.mark.parametrize("ndim", [2, 4])
@given(data=st.data())
def test_batch_norm_updates_running_statistics_like_pytorch(ndim, container, data):
    x = data.draw(bn_inputs(ndim))
    c = x.shape[1]
    rm0 = data.draw(host_arrays((c,)), label="running_mean")
    rv0 = data.draw(host_arrays((c,), low=0.1, high=3.0), label="running_var")
    momentum = data.draw(st.floats(0.0, 1.0), label="momentum")
    eps = data.draw(st.sampled_from([0.0, 1e-5]), label="eps")
    wrap = dev if container == "array" else (lambda a: mr.tensor(dev(a)))
    rm, rv = wrap(rm0), wrap(rv0)
    y = F.batch_norm(dev(x), rm, rv, training=True, momentum=momentum, eps=eps)

    rows = _channels(x)
    count = rows.shape[1]
    # PyTorch: running = (1 - momentum) running + momentum batch, the variance unbiased
    expected_mean = (1 - momentum) * rm0 + momentum * rows.mean(axis=1)
    expected_var = (1 - momentum) * rv0 + momentum * rows.var(axis=1, ddof=1)
    # the batch statistics are sums of count terms (the variance of squares of centred values
    # whose centring error is count U max|x|): 4 count U of the absolute-value sizes
    tol_mean = 4 * count * U * (np.abs(rm0) + np.abs(rows).max(axis=1))
    tol_var = 4 * count * U * (rv0 + 2 * np.abs(rows).max(axis=1) ** 2 * count / (count - 1))
    err_mean, err_var = np.abs(host(rm) - expected_mean), np.abs(host(rv) - expected_var)
    assert np.all(err_mean <= tol_mean), f"running mean {host(rm)} != {expected_mean}"
    assert np.all(err_var <= tol_var), f"running var {host(rv)} != {expected_var}"
    _record("6 bn running stats (rel. to bound)",
            float(np.max(np.concatenate([err_mean / tol_mean, err_var / tol_var]))))
    _record("6 bn running stats (abs)", float(np.max(np.concatenate([err_mean, err_var]))))
    # the statistics do not change the training output...
    assert_identical(y, F.batch_norm(dev(x), None, None, training=True, eps=eps),
                     "training output with vs without running statistics")
    # ...and an update made while differentiating stores the same plain numbers
    rm2, rv2 = wrap(rm0), wrap(rv0)
    out, vjp_fn = mr.vjp(lambda t: F.batch_norm(t, rm2, rv2, training=True, momentum=momentum,
                                                  eps=eps), dev(x))
    vjp_fn(out)
    assert_identical(rm2, rm, "running mean updated under vjp")
    assert_identical(rv2, rv, "running var updated under vjp")


@pytest.mark.parametrize("ndim", [2, 4])
@given(data=st.data())
def test_batch_norm_eval_mode_uses_running_statistics(ndim, data):
    x = data.draw(bn_inputs(ndim))
    c = x.shape[1]
    # no subnormal parameters: the bounds below are relative (a scale of 1e-311 loses digits)
    rm0 = _no_tiny(data.draw(host_arrays((c,)), label="running_mean"))
    rv0 = data.draw(host_arrays((c,), low=0.1, high=3.0), label="running_var")
    gamma = _no_tiny(data.draw(host_arrays((c,)), label="gamma"))
    beta = _no_tiny(data.draw(host_arrays((c,)), label="beta"))
    eps = data.draw(st.sampled_from([0.0, 1e-5, 0.1]), label="eps")
    rm, rv = dev(rm0), dev(rv0)
    y = host(F.batch_norm(dev(x), rm, rv, dev(gamma), dev(beta), training=False, eps=eps))
    pc = lambda v: _per_channel(v, ndim)  # noqa: E731
    expected = (x - pc(rm0)) / np.sqrt(pc(rv0) + eps) * pc(gamma) + pc(beta)
    # five roundings per entry on each side, relative to the sizes of the terms; in the
    # subnormal range a rounding's error is absolute (up to half the smallest subnormal), so
    # each of the ten roundings may add that much
    size = (np.abs(x) + np.abs(pc(rm0))) / np.sqrt(pc(rv0) + eps) * np.abs(pc(gamma))
    tol = 8 * U * (size + np.abs(pc(beta))) + 5 * TINY
    assert np.all(np.abs(y - expected) <= tol), "eval-mode batch_norm vs NumPy"
    _record("6 bn eval (rel. to bound)", _ratio(np.abs(y - expected), tol))
    _record("6 bn eval (abs)", float(np.max(np.abs(y - expected))))
    assert_identical(rm, rm0, "eval mode leaves running_mean alone")
    assert_identical(rv, rv0, "eval mode leaves running_var alone")

    # eval mode with the batch's own (biased) statistics is training mode
    rows = _channels(x)
    y_eval = _channels(host(F.batch_norm(dev(x), dev(rows.mean(axis=1)), dev(rows.var(axis=1)),
                                         dev(gamma), dev(beta), training=False, eps=eps)))
    y_train = _channels(host(F.batch_norm(dev(x), None, None, dev(gamma), dev(beta),
                                          training=True, eps=eps)))
    count, kappa = _conditioning(x)
    tol = (8 * count * U * kappa * np.abs(gamma) + 4 * U * np.abs(y_train).max(axis=1))[:, None]
    diff = np.abs(y_eval - y_train)
    assert np.all(diff <= tol), f"eval with batch statistics != training: {np.max(diff):.3e}"
    _record("6 bn eval (rel. to bound)", _ratio(diff, tol))
    _record("6 bn eval (abs)", float(np.max(diff)))


# ----------------------------------------------------------------------------------------------
# 7. positive homogeneity
# ----------------------------------------------------------------------------------------------


@given(data=st.data())
def test_relu_is_positively_homogeneous(data):
    x = data.draw(host_arrays(data.draw(shapes(), label="shape")), label="x")
    a = data.draw(st.floats(0.0, 16.0, exclude_min=True), label="a")
    # relu(fl(a x)) is fl(a x) or 0, exactly as fl(a relu(x)) is: equal bit for bit
    assert_identical(mr.relu(dev(a * x)), a * mr.relu(dev(x)), "relu(a x) vs a relu(x)")


def _conv_net(x, w1, w2, stride, padding):
    h = F.relu(F.conv2d(x, w1, stride=stride, padding=padding))
    return F.adaptive_avg_pool2d(F.conv2d(h, w2, padding=1), 1)


def _dense_net(x, w1, w2):
    return F.linear(F.relu(F.linear(x, w1)), w2)


@st.composite
def _homogeneous_nets(draw):
    """(net, x, w1, w2, k): a bias-free net, its host inputs, and k, the most products any
    output sums along one path (its rounding-error count)."""
    if draw(st.booleans()):
        cfg = draw(conv_configs(max_channels=2, max_size=5))
        f2 = draw(st.integers(1, 2))
        w2_shape = (f2, cfg["w_shape"][0], 3, 3)
        stride, padding = cfg["stride"], cfg["padding"]
        net = lambda x, w1, w2: _conv_net(x, w1, w2, stride, padding)  # noqa: E731
        k = (math.prod(cfg["w_shape"][1:]) + math.prod(w2_shape[1:]) + math.prod(cfg["out_hw"]))
        arg_shapes = (cfg["x_shape"], cfg["w_shape"], w2_shape)
    else:
        n, d, h, o = (draw(st.integers(1, 4)) for _ in range(4))
        net, k, arg_shapes = _dense_net, d + h, ((n, d), (h, d), (o, h))
    x, w1, w2 = (_no_tiny(draw(host_arrays(s), label="arg")) for s in arg_shapes)
    return net, x, w1, w2, k


@given(nets=_homogeneous_nets(), data=st.data())
def test_bias_free_relu_networks_are_positively_homogeneous(nets, data):
    net, x, w1, w2, k = nets
    y = host(net(dev(x), dev(w1), dev(w2)))
    # powers of two: every product and sum scales exactly (no tiny values, so no underflow)
    i, j = data.draw(st.integers(-4, 4), label="i"), data.draw(st.integers(-4, 4), label="j")
    assert_identical(net(dev(2.0**i * x), dev(w1), dev(w2)), 2.0**i * y, "f(2^i x) = 2^i f(x)")
    assert_identical(net(dev(x), dev(2.0**i * w1), dev(2.0**j * w2)), 2.0 ** (i + j) * y,
                     "f(x; 2^i w1, 2^j w2) = 2^(i+j) f(x; w1, w2)")
    # any a > 0: both sides within (k + 2) U of the truth relative to the net evaluated on
    # absolute values (which bounds every partial sum; relu is then the identity)
    a = data.draw(st.floats(0.1, 10.0), label="a")
    scaled = host(net(dev(a * x), dev(w1), dev(w2)))
    abs_net = host(net(dev(np.abs(x)), dev(np.abs(w1)), dev(np.abs(w2))))
    bound = 2 * (k + 2) * U * a * abs_net + 1e-300
    diff = np.abs(scaled - a * y)
    assert np.all(diff <= bound), f"f(a x) vs a f(x): {np.max(diff - bound):.3e} over the bound"
    _record("7 homogeneity, general a (rel. to bound)", float(np.max(diff / bound)))
    _record("7 homogeneity, general a (abs)", float(np.max(diff)))


# ----------------------------------------------------------------------------------------------
# 8. residual Jacobians: d(x + beta F(x)) = I + beta J_F
# ----------------------------------------------------------------------------------------------


@st.composite
def _residual_branches(draw):
    if draw(st.booleans()):
        n, c = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        x = draw(host_arrays((n, c, h, w)), label="x")
        w1 = draw(host_arrays((c, c, 3, 3), low=-0.5, high=0.5), label="w1")
        w2 = draw(host_arrays((c, c, 3, 3), low=-0.5, high=0.5), label="w2")
        branch = lambda t: F.conv2d(F.relu(F.conv2d(t, dev(w1), padding=1)), dev(w2),  # noqa
                                    padding=1)
        return "conv", x, branch
    n, d, h = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    x = draw(host_arrays((n, d)), label="x")
    w1 = draw(host_arrays((h, d), low=-0.5, high=0.5), label="w1")
    w2 = draw(host_arrays((d, h), low=-0.5, high=0.5), label="w2")
    return "mlp", x, lambda t: F.linear(F.relu(F.linear(t, dev(w1))), dev(w2))


@given(case=_residual_branches(), beta=st.floats(-2.0, 2.0))
def test_residual_jacobian_is_identity_plus_branch_jacobian(case, beta):
    kind, x_host, branch = case
    x = dev(x_host)
    n = x_host.size
    j_branch = host(mr.jacobian(branch)(x)).reshape(n, n)
    j_res = host(mr.jacobian(lambda t: t + branch(t))(x)).reshape(n, n)
    # the identity path adds exactly 1.0 to the diagonal of the same reverse pass
    err = float(np.max(np.abs(j_res - (np.eye(n) + j_branch))))
    assert err <= 1e-13, f"[{kind}] J(x + F(x)) - (I + J_F): max abs {err:.3e}"
    _record("8 residual jacobian, beta = 1 (abs)", err)
    # beta enters the reverse pass at the branch's output instead of at the end: products of
    # |w| <= 0.5 along paths keep |J_F| small, and the difference within 1e-13 absolute
    j_beta = host(mr.jacobian(lambda t: t + beta * branch(t))(x)).reshape(n, n)
    err = float(np.max(np.abs(j_beta - (np.eye(n) + beta * j_branch))))
    assert err <= 1e-13, f"[{kind}] J(x + beta F(x)) - (I + beta J_F): max abs {err:.3e}"
    _record("8 residual jacobian, beta (abs)", err)


# ----------------------------------------------------------------------------------------------
# 9. pullbacks and pushforwards are linear; pullbacks can be reused
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@given(data=st.data())
def test_vjp_fn_is_linear_in_the_cotangent_and_reusable(name, data):
    fn, xs = _draw_inputs(data, name)
    out, vjp_fn = mr.vjp(fn, *xs)
    shape = tuple(out.shape)
    u = data.draw(host_arrays(shape), label="u")
    w = data.draw(host_arrays(shape), label="w")
    a, b = data.draw(st.floats(-3.0, 3.0), label="a"), data.draw(st.floats(-3.0, 3.0), label="b")
    r_u, r_w = vjp_fn(dev(u)), vjp_fn(dev(w))
    r_ab = vjp_fn(dev(a * u + b * w))
    stacked = vjp_fn(dev(np.stack([u, w])))
    again = vjp_fn(dev(u))
    flat = lambda r: np.concatenate([host(c).ravel() for c in r])  # noqa: E731
    # the pullback is a fixed linear map; a u + b w and the final combination round
    # differently. Relative to the whole cotangent (all arguments: a block can be tiny by
    # cancellation, see the Jacobian test) that is a few U; allowance 1e-12
    size = max(abs(a) * float(np.max(np.abs(flat(r_u)))),
               abs(b) * float(np.max(np.abs(flat(r_w)))), 1e-300)
    err = float(np.max(np.abs(flat(r_ab) - (a * flat(r_u) + b * flat(r_w))))) / size
    assert err <= 1e-12, f"vjp(a u + b w) vs a vjp(u) + b vjp(w): {err:.3e}"
    _record("9 vjp linear", err)
    scale = max(float(np.max(np.abs(flat(r_u)))), float(np.max(np.abs(flat(r_w)))), 1e-300)
    for k in range(len(xs)):
        # a stack of cotangents in one pass equals the passes one by one (batched contractions
        # may sum in another order: a few U of the whole cotangent)
        stack_k = np.stack([host(r_u[k]), host(r_w[k])])
        err = float(np.max(np.abs(host(stacked[k]) - stack_k), initial=0.0)) / scale
        assert err <= 1e-13, f"stacked vjp, argument {k}: {err:.3e}"
        _record("9 vjp stacked", err)
        # the graph is reused: calling again (after other calls) gives identical numbers
        assert_identical(again[k], r_u[k], f"vjp_fn(u) called twice, argument {k}")


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@given(data=st.data())
def test_jvp_is_linear_in_the_tangent(name, data):
    fn, xs = _draw_inputs(data, name)
    # Tangents of max-norm 1 in every argument. Tangents that vanish except along a nearly
    # invariant direction (the scale of batch norm's input) give an output tangent that is
    # itself ~eps = 1e-5 of the terms summed, and no relative comparison of rounding is then
    # meaningful; linearity does not depend on the tangents' sizes.
    v = [host(t) for t in _draw_like(data, xs, "v", unit=True)]
    t = [host(s) for s in _draw_like(data, xs, "t", unit=True)]
    a, b = data.draw(st.floats(-3.0, 3.0), label="a"), data.draw(st.floats(-3.0, 3.0), label="b")

    def push(tangents):
        return host(mr.jvp(fn, tuple(xs), tuple(dev(s) for s in tangents))[1])

    j_v, j_t = push(v), push(t)
    j_ab = push([a * p + b * q for p, q in zip(v, t)])
    size = max(abs(a) * float(np.max(np.abs(j_v))), abs(b) * float(np.max(np.abs(j_t))), 1e-300)
    err = float(np.max(np.abs(j_ab - (a * j_v + b * j_t)))) / size
    # a v + b t rounds once per entry, then the same linear map: a few U (5e-15 seen); 1e-12
    assert err <= 1e-12, f"jvp(a v + b t) vs a jvp(v) + b jvp(t): {err:.3e}"
    _record("9 jvp linear", err)
    assert_identical(push(v), j_v, "jvp repeated")


# ----------------------------------------------------------------------------------------------
# the checks can fail: mutated results must be rejected
# ----------------------------------------------------------------------------------------------


def test_checks_reject_a_wrong_conv_matrix():
    rng = np.random.default_rng(0)
    x_shape, stride, padding = (1, 2, 4, 5), (2, 1), (1, 0)
    w_host = rng.standard_normal((2, 2, 3, 2))
    w = dev(w_host)
    explicit = explicit_conv_matrix(w_host, x_shape, stride, padding)
    engine = conv_matrix_by_basis(w, x_shape, stride, padding)
    assert_identical(engine, explicit, "unmutated")
    # one entry off by one unit in the last place
    row, col = np.argwhere(explicit != 0)[7]
    mutated = explicit.copy()
    mutated[row, col] = np.nextafter(mutated[row, col], np.inf)
    with pytest.raises(AssertionError, match="1 of"):
        assert_identical(engine, mutated, "one-ulp mutation")
    # a true convolution (flipped kernel) is not the cross-correlation conv2d computes
    flipped = explicit_conv_matrix(w_host[:, :, ::-1, ::-1], x_shape, stride, padding)
    with pytest.raises(AssertionError):
        assert_identical(engine, flipped, "flipped kernel")


def test_checks_reject_a_wrong_vjp_or_adjoint():
    rng = np.random.default_rng(1)
    fn = _mlp_tanh
    xs = [dev(rng.standard_normal(s)) for s in [(2, 3, 2), (2, 3), (3, 2)]]
    vs = [dev(rng.standard_normal(tuple(x.shape))) for x in xs]
    out, vjp_fn = mr.vjp(fn, *xs)
    u = dev(rng.standard_normal(tuple(out.shape)))
    check_jvp_vjp_adjoint(fn, xs, vs, u, 1e-12)
    _, jv = mr.jvp(fn, tuple(xs), tuple(vs))
    cts = [host(c) for c in vjp_fn(u)]
    # a cotangent with one entry wrong by 1e-8 relative breaks <u, J v> = <J^T u, v>
    cts[1].flat[4] *= 1 + 1e-8
    with pytest.raises(AssertionError, match="J v"):
        assert_inner_products_agree([(u, jv)], list(zip(cts, vs)), 1e-12, "<u, J v> mutated")
    # and a wrong "adjoint" of im2col (im2col of the flipped image) fails the adjoint test
    x = rng.standard_normal((1, 1, 4, 4))
    y = rng.standard_normal((1, 1, 2, 2, 3, 3))
    cols = mr.im2col(dev(x), 2, 2, 1, 0)
    wrong = dev(host(mr.col2im(dev(y), 4, 4, 1, 0))[..., ::-1, ::-1])
    with pytest.raises(AssertionError):
        assert_inner_products_agree([(wrong, x)], [(y, cols)], 1e-12, "flipped col2im")
