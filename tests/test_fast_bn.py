"""The compiled batch-norm kernels (``backends/_fast_bn.py``) against the generic hooks.

The two paths differ only in the order in which the per-channel sums are rounded, so every
comparison here is a relative bound in units of the unit roundoff ``u`` of the dtype
(2**-24, 2**-53):

* kernels vs generic hooks, data with ``|mean| <= 2 std`` per channel: ``xhat`` and ``out``
  within ``BOUND u`` of their largest magnitude; ``mean`` within ``BOUND u`` of the channel's
  mean ``|x|``; ``var`` and ``inv`` within ``BOUND u`` of themselves; the gradient within
  ``BOUND u`` of ``max|w inv| max|g|`` (its terms' scale: the result may cancel);
* primitives, their derivatives of first and second order in both modes, and a ResNet-20
  training step in float64: within ``1e-10`` of the largest magnitude (conditioning of the
  composed maps on top of a few ``u``); a float32 step's loss within ``1e-5``.

The kernels are checked to have been used (a spy counts their calls), and eval-mode batch norm
and inspection, which use none of them, give identical results either way.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

pytest.importorskip("numba")

import miniresnet as mr  # noqa: E402
import miniresnet.functional as F  # noqa: E402
from miniresnet import inspect, nn  # noqa: E402
from miniresnet.backends import _fast_bn, get_backend  # noqa: E402

pytestmark = pytest.mark.backends("numpy")

AXIS = (-4, -2, -1)
BOUND = 32  # in units of u; the largest seen over 8000 random cases was 17.5 u (float32 var)
TIGHT = 1e-10


def _u(dtype) -> float:
    return float(np.finfo(dtype).eps) / 2


def _channel_major(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)


def _layout(a: np.ndarray, channel_major: bool) -> np.ndarray:
    return _channel_major(a) if channel_major else np.ascontiguousarray(a)


@pytest.fixture
def spy(monkeypatch):
    """Counts the kernel calls that did the work (None from an entry point: not the hot case)."""
    calls = {"forward": 0, "grad": 0}
    forward, grad = _fast_bn._forward_call, _fast_bn.standardize_affine_grad

    def counted_forward(*args):
        out = forward(*args)
        calls["forward"] += out is not None
        return out

    def counted_grad(*args):
        out = grad(*args)
        calls["grad"] += out is not None
        return out

    monkeypatch.setattr(_fast_bn, "_forward_call", counted_forward)
    monkeypatch.setattr(_fast_bn, "standardize_affine_grad", counted_grad)
    return calls


def _both(fn):
    """``fn()`` with the compiled kernels and with the generic hooks."""
    with _fast_bn.forced(True):
        fast = fn()
    with _fast_bn.forced(False):
        generic = fn()
    return fast, generic


def _flat_outputs(obj) -> list[np.ndarray]:
    if isinstance(obj, dict):
        return [a for k in sorted(obj) for a in _flat_outputs(obj[k])]
    if isinstance(obj, (tuple, list)):
        return [a for v in obj for a in _flat_outputs(v)]
    return [np.asarray(mr.to_numpy(obj) if isinstance(obj, mr.Tensor) else obj, np.float64)]


def _assert_close(fast, generic, rtol: float, what: str) -> None:
    """Equal where not finite; elsewhere within ``rtol`` of the largest finite magnitude."""
    a, b = _flat_outputs(fast), _flat_outputs(generic)
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape, (what, i)
        finite = np.isfinite(y)
        np.testing.assert_array_equal(x[~finite], y[~finite], err_msg=f"{what}[{i}]")
        x, y = x[finite], y[finite]
        scale = max(float(np.max(np.abs(y), initial=0.0)), np.finfo(np.float64).tiny)
        err = float(np.max(np.abs(x - y), initial=0.0)) / scale
        assert err <= rtol, f"{what}[{i}]: relative difference {err:.2e} > {rtol:.1e}"


# -- the kernels against the generic hooks ------------------------------------------------------

@st.composite
def bn_case(draw):
    n, c = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    h, w = draw(st.sampled_from([(1, 1), (1, 3), (2, 2), (3, 5), (8, 8), (16, 4)]))
    if draw(st.booleans()):  # a long run: several blocks and groups of the blocked sums
        n = draw(st.sampled_from([32, 70, 128]))
    assume(n * h * w >= 2)
    return {"shape": (n, c, h, w), "dtype": draw(st.sampled_from([np.float32, np.float64])),
            "x_cm": draw(st.booleans()), "g_cm": draw(st.booleans()),
            "eps": draw(st.sampled_from([1e-5, 0.1])), "seed": draw(st.integers(0, 2**31))}


def _bn_data(case):
    rng = np.random.default_rng(case["seed"])
    (n, c, h, w), dtype = case["shape"], case["dtype"]
    scale = np.exp(rng.uniform(-3, 3, size=(1, c, 1, 1)))
    x = (rng.uniform(-2, 2, size=(1, c, 1, 1)) + rng.standard_normal((n, c, h, w))) * scale
    x = _layout(x.astype(dtype), case["x_cm"])
    xd = x.astype(np.float64)
    # the bounds assume |mean| <= 2 std; a few values per channel can be far from that
    assume(np.all(np.abs(xd.mean(axis=(0, 2, 3))) <= 2.5 * xd.std(axis=(0, 2, 3))))
    g = _layout(rng.standard_normal((n, c, h, w)).astype(dtype), case["g_cm"])
    weight, bias = (rng.standard_normal(c).astype(dtype) for _ in range(2))
    return x, g, weight, bias


@given(bn_case())
def test_kernels_match_the_generic_hooks(spy, case):
    be = get_backend("numpy")
    x, g, weight, bias = _bn_data(case)
    eps, bound = case["eps"], BOUND * _u(case["dtype"])
    before = dict(spy)  # the fixture lives across hypothesis's examples

    def run():
        out, stats = be.standardize_affine(x, weight, bias, AXIS, eps)
        alone = be.batch_stats(x, AXIS, eps)
        return out, stats, alone, be.standardize_affine_grad(g, weight, stats, AXIS)

    (out, st_, alone, dx), (out0, st0, alone0, dx0) = _both(run)
    assert spy["forward"] - before["forward"] == 2 and spy["grad"] - before["grad"] == 1
    # the same layout and dtype as the generic path's results, channel-major for such an input
    assert out.dtype == out0.dtype == dx.dtype == x.dtype
    assert out.strides == x.strides and st_["xhat"].strides == x.strides
    assert dx.strides == x.strides
    for key in ("mean", "var", "inv"):
        assert st_[key].shape == st0[key].shape == (1, x.shape[1], 1, 1)
    for key in ("mean", "var", "inv", "xhat"):  # batch_stats alone is the same forward
        np.testing.assert_array_equal(alone[key], st_[key])

    def err(a, b, scale):
        return np.max(np.abs(a.astype(np.float64) - b) / scale)

    xd = x.astype(np.float64)
    assert err(st_["mean"], st0["mean"], np.mean(np.abs(xd), axis=AXIS, keepdims=True)) <= bound
    for key in ("var", "inv"):
        assert err(st_[key], st0[key], np.abs(st0[key].astype(np.float64))) <= bound, key
    for a, b, what in ((out, out0, "out"), (st_["xhat"], st0["xhat"], "xhat")):
        assert err(a, b, np.max(np.abs(b.astype(np.float64)))) <= bound, what
    k = np.abs(weight.astype(np.float64) * st0["inv"].reshape(-1))
    assert err(dx, dx0, np.max(k) * np.max(np.abs(g.astype(np.float64))) + 1e-300) <= bound


def test_sums_are_exact_on_exactly_representable_data():
    """Small integers with integer channel means: every partial sum (of x and of the centred
    squares) is exact, so the forward kernel equals the generic hook bit for bit (the
    elementwise operations are the same ones, in the same dtype)."""
    be = get_backend("numpy")
    for dtype in (np.float32, np.float64):
        rng = np.random.default_rng(0)
        v = rng.integers(-8, 9, size=(32, 3, 4, 4))
        x = np.concatenate([v, -v]) + np.array([3, -5, 0]).reshape(1, 3, 1, 1)
        x = _channel_major(x.astype(dtype))
        w, b = np.array([0.5, -2.0, 1.0], dtype), np.array([1.0, 0.0, -3.0], dtype)

        def run(x=x, w=w, b=b):
            out, stats = be.standardize_affine(x, w, b, AXIS, 1e-5)
            return [out, stats["mean"], stats["var"], stats["inv"], stats["xhat"]]

        for a, b_ in zip(*_both(run)):
            np.testing.assert_array_equal(a, b_)


def test_not_the_hot_case_runs_the_generic_hooks(spy):
    be = get_backend("numpy")
    rng = np.random.default_rng(1)
    x4 = rng.standard_normal((4, 3, 2, 2))
    w = np.ones(3)
    with _fast_bn.forced(True):
        be.batch_stats(x4, (-4,), 1e-5)  # another axis
        be.batch_stats(rng.standard_normal((5, 3)), (-2,), 1e-5)  # 2-D
        be.batch_stats(x4.astype(np.float16), AXIS, 1e-5)  # another dtype
        be.batch_stats(rng.standard_normal((4, 3, 2, 4))[..., ::2], AXIS, 1e-5)  # neither layout
        frozen = x4.copy()
        frozen.setflags(write=False)
        be.batch_stats(frozen, AXIS, 1e-5)  # read-only
        _, stats = be.standardize_affine(x4, w, w, AXIS, 1e-5)
        assert spy["forward"] == 1
        be.standardize_affine_grad(rng.standard_normal((2,) + x4.shape), w, stats, AXIS)  # stack
        assert spy["grad"] == 0
    assert spy["forward"] == 1


def test_forced_and_the_switch():
    on = _fast_bn.enabled()
    with _fast_bn.forced(False):
        assert not _fast_bn.enabled()
        with _fast_bn.forced(True):
            assert _fast_bn.enabled()
        assert not _fast_bn.enabled()
    assert _fast_bn.enabled() == on


def test_constant_channel_with_zero_eps_gives_what_numpy_gives():
    be = get_backend("numpy")
    x = np.ones((2, 2, 2, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        fast, generic = _both(lambda: be.batch_stats(x, AXIS, 0.0))
    for key in ("mean", "var", "inv", "xhat"):
        np.testing.assert_array_equal(fast[key], generic[key])


# -- primitives and their derivatives -----------------------------------------------------------

def _primitive_inputs(channel_major: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = _layout(rng.standard_normal((5, 3, 3, 4)) + 0.5, channel_major)
    g = _layout(rng.standard_normal(x.shape), channel_major)
    w, b = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    c = rng.standard_normal(x.shape)
    return x, g, w, b, c


@pytest.mark.parametrize("channel_major", [False, True])
def test_primitives_and_derivatives_of_every_order(spy, channel_major):
    x, g, w, b, c = _primitive_inputs(channel_major)
    rng = np.random.default_rng(1)
    tx, tw, tb = rng.standard_normal(x.shape), rng.standard_normal(3), rng.standard_normal(3)

    def f(x, w, b):  # a scalar through the forward primitive (nonlinear: real second order)
        return mr.sum(mr.tanh(mr.standardize_affine(x, w, b, (0, 2, 3))) * c)

    def h(g, x, w):  # and through the gradient primitive
        return mr.sum(mr.tanh(mr.standardize_affine_grad(g, x, w, (0, 2, 3))) * c)

    def run():
        out = {"f": f(x, w, b), "h": h(g, x, w)}
        out["grad f"] = mr.grad(f, argnums=(0, 1, 2))(x, w, b)  # reverse, first order
        out["jvp f"] = mr.jvp(f, (x, w, b), (tx, tw, tb))  # forward, first order
        out["grad h"] = mr.grad(h, argnums=(0, 1, 2))(g, x, w)
        out["jvp h"] = mr.jvp(h, (g, x, w), (tx, tx, tw))
        out["hvp f"] = mr.hvp(f, (x, w, b), (tx, tw, tb))  # forward over reverse
        out["hvp h"] = mr.hvp(h, (g, x, w), (tx, tx, tw))
        gf = mr.grad(f)  # reverse over reverse
        out["grad grad f"] = mr.grad(lambda v: mr.sum(gf(v, w, b) * tx))(x)
        gh = mr.grad(h, argnums=1)
        out["grad grad h"] = mr.grad(lambda v: mr.sum(gh(g, v, w) * tx))(x)
        jf = lambda v: mr.jvp(lambda u: f(u, w, b), (v,), (tx,))[1]  # reverse over forward
        out["grad jvp f"] = mr.grad(jf)(x)
        # every stacked-tangent path too: two Hessian columns at once
        out["hvp stack"] = mr.hvp(lambda v: f(v, w, b), x, np.stack([tx, c]))
        return out

    fast, generic = _both(run)
    assert spy["forward"] > 0 and spy["grad"] > 0
    for key in generic:
        _assert_close(fast[key], generic[key], TIGHT, key)


# -- networks -----------------------------------------------------------------------------------

def _step(model, x, y):
    params = list(model.parameters())

    def step():
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return [mr.to_numpy(loss)] + [mr.to_numpy(p.grad) for p in params]

    return step


def _net_data(dtype: str, batch: int = 16, size: int = 8):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((batch, 1, size, size)).astype(dtype)
    return x, rng.integers(0, 10, size=batch)


def test_resnet20_training_step_float64(spy):
    model = nn.resnet_cifar(3, in_channels=1, dtype="float64", seed=0)
    x, y = _net_data("float64")
    fast, generic = _both(_step(model, x, y))
    assert spy["forward"] >= 19 and spy["grad"] >= 19  # ResNet-20 has 19 batch norms
    _assert_close(fast, generic, TIGHT, "loss and gradients")


def test_resnet20_training_step_float32_loss(spy):
    """float32 gradients are compared through float64 above only: a ReLU whose input is within
    rounding of 0 may switch on one path and not the other (both right to rounding), which
    moves some gradients by O(1) relative; the loss is continuous in every rounding."""
    model = nn.resnet_cifar(3, in_channels=1, dtype="float32", seed=0)
    x, y = _net_data("float32")
    fast, generic = _both(_step(model, x, y))
    assert spy["forward"] >= 19
    assert abs(float(fast[0]) - float(generic[0])) <= 1e-5 * abs(float(generic[0]))


def test_eval_mode_and_inspection_are_unaffected():
    model = nn.resnet_cifar(1, width=0.5, in_channels=1, dtype="float64", seed=0)
    x, y = _net_data("float64", batch=6)
    model.train()
    model(x)  # non-trivial running statistics for eval mode
    model.eval()
    fast, generic = _both(lambda: mr.to_numpy(model(x)))
    # eval-mode batch norm uses none of the batch-norm kernels; the switch also moves the
    # convolutions onto the compiled kernels of _fast_conv, which round differently
    _assert_close(fast, generic, TIGHT, "eval-mode output")
    model.train()
    for fn in (lambda: inspect.profile(model, x, y), lambda: inspect.unit_statistics(model, x)):
        fast, generic = _both(fn)
        for field in dataclasses.fields(generic):
            a, b = getattr(fast, field.name), getattr(generic, field.name)
            if isinstance(b, np.ndarray) and b.dtype.kind == "f":
                _assert_close(a, b, TIGHT, field.name)
            elif isinstance(b, (list, tuple)) and b and isinstance(b[0], np.ndarray):
                _assert_close(list(a), list(b), TIGHT, field.name)


def test_warm_up_compiles_without_changing_anything():
    with _fast_bn.forced(True):
        _fast_bn.warm_up()
        assert _fast_bn._state["kernels"] is not None
