"""Forward mode with a stack of tangents: ``mr.jvp`` pushes tangents of shape
``batch + primal.shape`` through one pass, as ``vjp_fn`` pulls back stacked cotangents.

For every case of ``tests/oracle.py`` (every primitive), a stack equals the separate pushes,
alone and inside nested transforms (forward over reverse: Hessian columns; reverse over forward;
forward over forward); the forward-mode Jacobian equals the reverse-mode one; bad tangents and
rules that drop the batch axes fail clearly.

Tolerances: a stacked pass evaluates each tangent's products in the same order as a separate
one except where a kernel folds the stack into a wider matrix product or reduction (conv's
filters, ``sum`` over more axes), which may sum in another order: a few units of rounding of
the result's scale, so ``STACK_TOL = 1e-13`` relative to the largest entry (``oracle.rel_error``)
is ample and a wrong batched rule (a misplaced axis, a tangent mixed with another) is off by O(1).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from oracle import CASES, rel_error, to_host
from test_algebra import FUNCTIONS

import miniresnet as mr
from miniresnet.testing.strategies import host_arrays, to_backend_array
from miniresnet.tracing import as_tensor

STACK_TOL = 1e-13
JAC_TOL = 1e-12  # forward vs reverse Jacobian: other orders of the same products (see below)
BATCHES = ((3,), (2, 3))

WORST: dict[str, float] = {}  # the largest error seen per check (for reports only)

by_case = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])


def _draw(data, case):
    p, host = data.draw(case.strategy, label="example")
    host = tuple(np.asarray(h, dtype=np.float64) for h in host)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    return p, host, tuple(to_backend_array(h) for h in host), rng


def _dev(a):
    return to_backend_array(np.asarray(a, dtype=np.float64))


def _check(ours, expected, what, tol=STACK_TOL):
    """``max|ours - expected| <= tol * max(max|expected|, 1)``: inputs and tangents are O(1),
    so the terms of every result are too, and its rounding is relative to them even where they
    cancel (sigmoid'' near 0); a wrong batched rule errs by O(1) at the drawn points."""
    ours = to_host(ours)
    assert ours.shape == np.shape(expected), f"{what}: shape {ours.shape} != {np.shape(expected)}"
    err = rel_error(ours, expected, floor=1.0)
    WORST[what.split(",")[0]] = max(WORST.get(what.split(",")[0], 0.0), err)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def _separately(push, tangents, batch):
    """``push`` (one tangent tuple -> a tuple of host arrays) for every tangent of a stack,
    stacked back with the batch axes in front (the reference a stacked pass must equal)."""
    k = math.prod(batch)
    flat = [t.reshape((k,) + t.shape[len(batch):]) for t in tangents]
    outs = [push(tuple(_dev(f[i]) for f in flat)) for i in range(k)]
    return tuple(np.stack([o[j] for o in outs]).reshape(batch + outs[0][j].shape)
                 for j in range(len(outs[0])))


# -- every primitive ---------------------------------------------------------------------------


@by_case
@given(data=st.data())
def test_stacked_tangents_equal_separate_jvps(case, data):
    p, host, args, rng = _draw(data, case)
    f = lambda *xs: case.fun(p, *xs)  # noqa: E731

    def push(ts):
        return tuple(map(to_host, mr.jvp(f, args, ts)))

    for batch in BATCHES:
        tangents = tuple(rng.standard_normal(batch + h.shape) for h in host)
        out, stacked = mr.jvp(f, args, tuple(_dev(t) for t in tangents))
        outs, expected = _separately(push, tangents, batch)
        for index in np.ndindex(*batch):  # the same primal each time
            _check(out, outs[index], f"{case.name} primal, batch {batch}", 0.0)
        _check(stacked, expected, f"{case.name} jvp, batch {batch}")


@by_case
@given(data=st.data())
def test_stacked_tangents_in_nested_transforms(case, data):
    """Forward over reverse (``hvp``: a stack of Hessian columns), reverse over forward and
    forward over forward, each with a stack of tangents, equal the separate computations."""
    p, host, args, rng = _draw(data, case)
    out_shape = to_host(case.fun(p, *map(mr.Tensor, args))).shape
    u = _dev(rng.standard_normal(out_shape))
    nums = tuple(range(len(args)))
    batch = (2,)
    tangents = tuple(rng.standard_normal(batch + h.shape) for h in host)
    stack = tuple(_dev(t) for t in tangents)

    def scalar(*xs):
        return mr.sum(case.fun(p, *xs) * u)

    def hvp(ts):
        return tuple(to_host(h) for h in mr.hvp(scalar, args, ts))

    for i, (h, e) in enumerate(zip(mr.hvp(scalar, args, stack),
                                   _separately(hvp, tangents, batch))):
        _check(h, e, f"{case.name} hvp of a stack (input {i})")

    # reverse over forward: the gradient of sum_k <u_k, J v_k> in the primals
    us = rng.standard_normal(batch + out_shape)

    def pairing(ts, cts):
        def inner(*xs):
            return mr.sum(as_tensor(mr.jvp(lambda *ys: case.fun(p, *ys), xs, ts)[1]) * cts)
        return tuple(to_host(g) for g in mr.grad(inner, argnums=nums)(*args))

    grads = pairing(stack, _dev(us))
    singles = [pairing(tuple(_dev(t[k]) for t in tangents), _dev(us[k])) for k in range(2)]
    for i, g in enumerate(grads):
        _check(g, singles[0][i] + singles[1][i], f"{case.name} grad of stacked jvp (input {i})")

    # forward over forward: an outer stack of 2 over an inner stack of 2
    outer = tuple(rng.standard_normal(batch + h.shape) for h in host)

    def inner_jvp(*xs):
        return mr.jvp(lambda *ys: case.fun(p, *ys), xs, stack)[1]

    _, both = mr.jvp(inner_jvp, args, tuple(_dev(t) for t in outer))
    for k in range(2):
        _, one = mr.jvp(inner_jvp, args, tuple(_dev(t[k]) for t in outer))
        _check(to_host(both)[k], to_host(one), f"{case.name} jvp of stacked jvp, outer {k}")


# -- Jacobians ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@given(data=st.data())
def test_forward_jacobian_equals_reverse_jacobian(name, data):
    fn, inputs = FUNCTIONS[name]
    xs = [_dev(a) for a in data.draw(inputs(small=True), label="inputs")]
    nums = tuple(range(len(xs)))
    reverse = mr.jacobian(fn, argnums=nums)(*xs)
    scale = max(float(np.max(np.abs(to_host(j)), initial=0.0)) for j in reverse)
    # forward and reverse mode sum the same products in other orders (at most ~50 terms per
    # entry through a few layers): a few U of max |J|; JAC_TOL leaves a wide margin
    for chunk in (3, None):  # None: one column first (to see the output), then the rest
        forward = mr.jacobian(fn, argnums=nums, chunk_size=chunk, mode="forward")(*xs)
        assert isinstance(forward, tuple) and len(forward) == len(xs)
        for i, (jf, jr) in enumerate(zip(forward, reverse)):
            jf, jr = to_host(jf), to_host(jr)
            assert jf.shape == jr.shape, f"{name} input {i}: {jf.shape} != {jr.shape}"
            err = float(np.max(np.abs(jf - jr), initial=0.0)) / max(scale, 1e-300)
            assert err <= JAC_TOL, f"{name} chunk {chunk} input {i}: {err:.3g} of max |J|"
    # argnums: a single one, a subset in another order, repeats and negative positions
    last = len(xs) - 1
    single = mr.jacobian(fn, argnums=-1, mode="forward")(*xs)
    _check(single, to_host(reverse[last]), f"{name} argnums=-1", JAC_TOL)
    picked = mr.jacobian(fn, argnums=(last, 0, last), mode="forward")(*xs)
    for j, i in zip(picked, (last, 0, last)):
        _check(j, to_host(reverse[i]), f"{name} argnums=({last}, 0, {last})", JAC_TOL)


@given(data=st.data())
def test_hessian_columns_from_one_stacked_hvp(data):
    """The Hessian of a scalar function, column block by column block: ``hvp`` with the stacked
    basis vectors (one forward-over-reverse pass) equals the Jacobian of the gradient."""
    x = data.draw(host_arrays(st.sampled_from([(3,), (2, 3)])), label="x")
    w = _dev(data.draw(host_arrays(x.shape[-1:] * 2), label="w"))

    def f(v):
        return mr.sum(mr.tanh(mr.matmul(mr.reshape(v, (-1, x.shape[-1])), w)) ** 2) + mr.sum(v ** 3)

    n = x.size
    columns = mr.hvp(f, _dev(x), _dev(np.eye(n).reshape((n,) + x.shape)))
    hessian = mr.jacobian(mr.grad(f))(_dev(x))  # x.shape + x.shape
    _check(np.moveaxis(to_host(columns).reshape((n, n)), 0, 1),
           to_host(hessian).reshape((n, n)), "hvp columns vs jacobian of grad")
    h = to_host(hessian).reshape((n, n))
    assert rel_error(h, h.T) <= 1e-13, "the Hessian is symmetric"


def test_tuple_outputs_and_outputs_that_ignore_the_input(backend):
    x = backend.asarray(np.array([1.0, 2.0, 3.0]), "float64")
    stack = backend.asarray(np.arange(12.0).reshape(2, 2, 3), "float64")
    c = backend.asarray(np.array([5.0, 6.0]), "float64")
    (a, b), (ta, tb) = mr.jvp(lambda v: (v * v, c + 0.0), (x,), (stack,))
    assert np.array_equal(to_host(ta), 2.0 * np.array([1.0, 2.0, 3.0]) * to_host(stack))
    assert np.array_equal(to_host(tb), np.zeros((2, 2, 2)))  # no dependence: zeros, batched
    jac = mr.jacobian(lambda v: c * 1.0, mode="forward")(x)
    assert np.array_equal(to_host(jac), np.zeros((2, 3)))


def test_a_user_primitive_with_linear_jvp_takes_a_stack(backend):
    """``jvp="linear"`` applies the primitive to the stack: fine for a forward that takes
    leading axes (here elementwise), and checked: a rule that drops them is named."""
    triple = mr.Primitive("triple", lambda xp, x: 3.0 * x, vjp=(lambda g, ans, x: 3.0 * g,),
                          jvp="linear")
    x = backend.asarray(np.array([1.0, -2.0]), "float64")
    stack = backend.asarray(np.arange(6.0).reshape(3, 2), "float64")
    _, t = mr.jvp(lambda v: mr.bind(triple, v), (x,), (stack,))
    assert np.array_equal(to_host(t), 3.0 * np.arange(6.0).reshape(3, 2))
    bad = mr.Primitive("bad", lambda xp, x: 2.0 * x, vjp=(lambda g, ans, x: 2.0 * g,),
                       jvp=(lambda t, ans, x: 2.0 * mr.sum(t, 0),))  # loses the batch axis
    with pytest.raises(ValueError, match=r"bad: the JVP rule of argument 0 returned shape \(2,\)"
                                         r" for a tangent of shape \(3, 2\); expected \(3, 2\)"):
        mr.jvp(lambda v: mr.bind(bad, v), (x,), (stack,))


def test_bad_tangents_are_named(backend):
    x = backend.asarray(np.ones((2, 3)), "float64")
    y = backend.asarray(np.ones(4), "float64")
    f = lambda a, b: mr.sum(a) * b  # noqa: E731
    with pytest.raises(ValueError, match=r"tangent 0 \(\(3, 2\) float64\) does not match primal "
                                         r"0 \(\(2, 3\) float64\).*leading batch axes"):
        mr.jvp(f, (x, y), (backend.asarray(np.ones((3, 2)), "float64"), y))
    with pytest.raises(ValueError, match=r"tangent 1 \(\(4,\) float32\) does not match"):
        mr.jvp(f, (x, y), (x, backend.asarray(np.ones(4), "float32")))
    with pytest.raises(ValueError, match=r"tangent 1 has batch axes \(5,\).*before it have "
                                         r"\(2,\)"):
        mr.jvp(f, (x, y), (backend.asarray(np.ones((2, 2, 3)), "float64"),
                           backend.asarray(np.ones((5, 4)), "float64")))
    with pytest.raises(ValueError, match="tangent 0 .* does not match"):
        mr.jvp(f, (x, y), (backend.asarray(np.ones(3), "float64"), y))  # fewer axes


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "sideways"}, "mode must be 'reverse' or 'forward', got 'sideways'"),
    ({"chunk_size": 0}, "chunk_size must be a positive int or None, got 0"),
    ({"chunk_size": 2.5}, "chunk_size must be a positive int or None, got 2.5"),
])
def test_jacobian_rejects_bad_mode_and_chunk_size(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mr.jacobian(mr.tanh, **kwargs)
