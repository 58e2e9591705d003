"""Every primitive and NN function against autograd (an independent autodiff of NumPy code).

For each case of ``tests/oracle.py`` and each backend (the autouse ``backend`` fixture):
forward values, VJPs, JVPs and second derivatives (forward-over-reverse and reverse-over-
reverse) against autograd in float64; finite differences up to order 2; stacked cotangents
against separate calls; and, for a few cases, float32 dtype preservation. Relative errors are
``max|ours - oracle| / max(max|oracle|, 1e-4)`` over whole arrays (see :func:`oracle.rel_error`)
and are recorded in ``oracle.MAX_ERRORS`` (per case) and ``oracle.MAX_ERRORS_BY_KIND``.
"""

from __future__ import annotations

import math

import autograd
import autograd.numpy as anp
import numpy as np
import pytest
from autograd import make_jvp, make_vjp
from autograd.differential_operators import make_jvp_reversemode
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st
from oracle import CASES, CASES_BY_NAME, SCALE_FLOOR, record_error, rel_error, to_host

import miniresnet as mr
import miniresnet.functional as F
from miniresnet.normalization import PRIMITIVES as NORMALIZATION_PRIMITIVES
from miniresnet.primitives import PRIMITIVES as CORE_PRIMITIVES
from miniresnet.testing import check_grads
from miniresnet.testing.strategies import to_backend_array
from miniresnet.tracing import as_tensor, leaf_node, new_level, toposort, wrap

# autograd warns when a (second) derivative is identically zero, as for linear functions
pytestmark = pytest.mark.filterwarnings("ignore:Output seems independent of input:UserWarning")

FORWARD_TOL = 1e-12  # forward values against the oracle
DERIV_TOL = 1e-10  # VJP, JVP and second derivatives against autograd
STACK_TOL = 1e-12  # a stack of cotangents against separate calls
FLOAT32_TOL = 1e-4  # float32 results against the float64 oracle (about 1e3 float32 ulps)
# In float32, O(1) terms that cancel leave ~1e-7 of rounding: a result whose entries are all
# below this floor (a tangent that happens to lie almost in the span a derivative projects out)
# is measured absolutely, at FLOAT32_TOL * FLOAT32_FLOOR = 1e-6; a wrong rule is off by O(1).
FLOAT32_FLOOR = 1e-2

by_case = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])


# -- helpers -------------------------------------------------------------------------------------


def _draw(data, case, dtype="float64"):
    """``(p, host inputs, backend inputs, rng)`` for one example of ``case``."""
    p, host = data.draw(case.strategy, label="example")
    host = tuple(np.asarray(h, dtype=dtype) for h in host)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    return p, host, tuple(to_backend_array(h) for h in host), rng


def _ours(case, p):
    return lambda *xs: case.fun(p, *xs)


def _theirs(case, p):
    return lambda *xs: case.oracle(p, *xs)


def _argnums(host):
    return tuple(range(len(host)))


def _normal(rng, shape, dtype="float64"):
    return np.asarray(rng.standard_normal(shape), dtype=dtype)


def _check(case, kind, ours, expected, tol, what=""):
    # float32 errors are kept apart from the float64 ones of the same case
    name = f"{case.name}[float32]" if kind == "float32" else case.name
    floor = FLOAT32_FLOOR if kind == "float32" else SCALE_FLOOR
    err = record_error(name, rel_error(ours, expected, floor), kind)
    assert err <= tol, f"{case.name}: {kind}{what} relative error {err:.3g} > {tol:g}"


def _check_dtype(ours, dtype, what):
    got = to_host(ours).dtype
    assert got == np.dtype(dtype), f"{what}: dtype {got}, expected {dtype}"


def _oracle_jvp(case, p, host, tangents):
    f, nums = _theirs(case, p), _argnums(host)
    if case.oracle_fwd:
        return make_jvp(f, argnum=nums)(*host)(tangents)[1]
    return make_jvp_reversemode(f, argnum=nums)(*host)(tangents)


def _oracle_hvp(case, p, host, u, v):
    """``H v`` of ``x -> sum(oracle(x) * u)`` w.r.t. all inputs (reverse over reverse)."""
    nums = _argnums(host)

    def f_scalar(*xs):
        return anp.sum(case.oracle(p, *xs) * u)

    def grad_dot_v(*xs):
        grads = autograd.grad(f_scalar, argnum=nums)(*xs)
        return sum(anp.sum(g * t) for g, t in zip(grads, v))

    return autograd.grad(grad_dot_v, argnum=nums)(*host)


# -- comparisons with autograd ---------------------------------------------------------------


@by_case
@given(data=st.data())
def test_forward(case, data):
    p, host, args, _ = _draw(data, case)
    out = case.fun(p, *(mr.Tensor(a) for a in args))
    expected = np.asarray(case.oracle(p, *host))
    _check_dtype(out, expected.dtype, "forward")
    _check(case, "forward", out, expected, FORWARD_TOL)


@by_case
@given(data=st.data())
def test_vjp(case, data):
    p, host, args, rng = _draw(data, case)
    out, vjp_fn = mr.vjp(_ours(case, p), *args)
    oracle_vjp, expected_out = make_vjp(_theirs(case, p), argnum=_argnums(host))(*host)
    _check(case, "forward", out, expected_out, FORWARD_TOL)
    u = _normal(rng, np.shape(expected_out))
    cts = vjp_fn(to_backend_array(u))
    assert isinstance(cts, tuple) and len(cts) == len(host)
    for i, (ct, expected) in enumerate(zip(cts, oracle_vjp(u))):
        _check_dtype(ct, "float64", f"vjp of input {i}")
        _check(case, "vjp", ct, expected, DERIV_TOL, f" (input {i})")


@by_case
@given(data=st.data())
def test_jvp(case, data):
    p, host, args, rng = _draw(data, case)
    tangents = tuple(_normal(rng, h.shape) for h in host)
    out, t_out = mr.jvp(_ours(case, p), args, tuple(to_backend_array(t) for t in tangents))
    _check(case, "forward", out, np.asarray(case.oracle(p, *host)), FORWARD_TOL)
    _check_dtype(t_out, "float64", "jvp")
    _check(case, "jvp", t_out, _oracle_jvp(case, p, host, tangents), DERIV_TOL)


@by_case
@given(data=st.data())
def test_second_order(case, data):
    """``H v`` of ``x -> sum(f(x) * u)`` by ``mr.hvp`` (forward over reverse) and by ``mr.grad`` of
    ``<vjp(u), v>`` (reverse over reverse), against autograd's reverse over reverse."""
    p, host, args, rng = _draw(data, case)
    u = _normal(rng, np.shape(case.oracle(p, *host)))
    v = tuple(_normal(rng, h.shape) for h in host)
    u_b, v_b = to_backend_array(u), tuple(to_backend_array(t) for t in v)
    expected = _oracle_hvp(case, p, host, u, v)

    def f_scalar(*xs):
        return mr.sum(case.fun(p, *xs) * u_b)

    def vjp_dot_v(*xs):
        _, vjp_fn = mr.vjp(_ours(case, p), *xs)
        # as_tensor: a cotangent that does not depend on xs comes back as a raw array
        return sum(mr.sum(as_tensor(ct) * t) for ct, t in zip(vjp_fn(u_b), v_b))

    fwd_rev = mr.hvp(f_scalar, args, v_b)
    rev_rev = mr.grad(vjp_dot_v, argnums=_argnums(host))(*args)
    for name, ours in (("fwd-over-rev", fwd_rev), ("rev-over-rev", rev_rev)):
        assert isinstance(ours, tuple) and len(ours) == len(host)
        for i, (h, e) in enumerate(zip(ours, expected)):
            _check(case, "second_order", h, e, DERIV_TOL, f" {name} (input {i})")


# every case but those not differentiable at the drawn points (max with ties)
@pytest.mark.parametrize("case", [c for c in CASES if c.fd],
                         ids=[c.name for c in CASES if c.fd])
@given(data=st.data())
def test_finite_differences(case, data):
    p, _, args, _ = _draw(data, case)
    check_grads(_ours(case, p), *args, order=2, modes=("fwd", "rev"), **case.fd_kwargs)


@by_case
@given(data=st.data())
def test_stacked_cotangents(case, data):
    """One reverse pass with a stack of cotangents equals separate passes."""
    p, host, args, rng = _draw(data, case)
    out, vjp_fn = mr.vjp(_ours(case, p), *args)
    out_shape = to_host(out).shape
    for batch in ((3,), (2, 2)):
        us = _normal(rng, batch + out_shape)
        stacked = vjp_fn(to_backend_array(us))
        flat = us.reshape((math.prod(batch),) + out_shape)
        singles = [vjp_fn(to_backend_array(np.asarray(flat[k]))) for k in range(len(flat))]
        for i, h in enumerate(host):
            expected = np.stack([to_host(s[i]) for s in singles]).reshape(batch + h.shape)
            _check(case, "stacked", stacked[i], expected, STACK_TOL, f" batch {batch} input {i}")


# -- float32 -----------------------------------------------------------------------------------

FLOAT32_CASES = ["tanh", "logsumexp", "matmul", "conv2d", "conv_transpose", "conv_weight_grad",
                 "standardize", "standardize_affine_grad", "batch_norm", "batch_norm_eval",
                 "cross_entropy",
                 "avg_pool2d", "getitem"]


@pytest.mark.parametrize("name", FLOAT32_CASES)
@given(data=st.data())
def test_float32_dtype_preserved(name, data):
    case = CASES_BY_NAME[name]
    p, host, args, rng = _draw(data, case, "float32")
    host64 = tuple(h.astype(np.float64) for h in host)
    oracle_vjp, expected_out = make_vjp(_theirs(case, p), argnum=_argnums(host))(*host64)
    out, vjp_fn = mr.vjp(_ours(case, p), *args)
    _check_dtype(out, "float32", "forward")
    _check(case, "float32", out, expected_out, FLOAT32_TOL, " forward")
    u = _normal(rng, np.shape(expected_out), "float32")
    for i, (ct, e) in enumerate(zip(vjp_fn(to_backend_array(u)), oracle_vjp(u.astype(float)))):
        _check_dtype(ct, "float32", f"vjp of input {i}")
        _check(case, "float32", ct, e, FLOAT32_TOL, f" vjp (input {i})")
    tangents = tuple(_normal(rng, h.shape, "float32") for h in host)
    _, t_out = mr.jvp(_ours(case, p), args, tuple(to_backend_array(t) for t in tangents))
    _check_dtype(t_out, "float32", "jvp")
    expected = _oracle_jvp(case, p, host64, tuple(t.astype(float) for t in tangents))
    _check(case, "float32", t_out, expected, FLOAT32_TOL, " jvp")
    hv = mr.hvp(lambda *xs: mr.sum(case.fun(p, *xs) * to_backend_array(u)), args,
                tuple(to_backend_array(t) for t in tangents))
    for i, h in enumerate(hv):
        _check_dtype(h, "float32", f"hvp of input {i}")


# -- coverage ----------------------------------------------------------------------------------


def _traced_primitives(case, p, host) -> set[str]:
    """Names of the primitives on the reverse-mode graph of ``case.fun`` at one example."""
    level = new_level()
    xs = [wrap(as_tensor(to_backend_array(np.asarray(h))), level, leaf_node()) for h in host]
    out = case.fun(p, *xs)
    if out._level != level:
        return set()
    return {node.prim.name for node in toposort(out._node) if node.prim is not None}


PRIMITIVES = {**CORE_PRIMITIVES, **NORMALIZATION_PRIMITIVES}


def test_every_primitive_has_a_case():
    declared = set().union(*(c.primitives for c in CASES))
    missing = sorted(set(PRIMITIVES) - declared)
    assert not missing, f"primitives without an autograd oracle case: {missing}"
    unknown = sorted(declared - set(PRIMITIVES))
    assert not unknown, f"cases declare unknown primitives: {unknown}"


@by_case
def test_case_exercises_its_primitives(case):
    """Some example of the case really puts every primitive it declares on the graph."""
    find(case.strategy, lambda ex: case.primitives <= _traced_primitives(case, *ex),
         settings=settings(max_examples=200, database=None, phases=[Phase.generate],
                           suppress_health_check=list(HealthCheck)))


def test_functional_activations_are_the_primitive_ops():
    assert F.relu is mr.relu and F.tanh is mr.tanh and F.sigmoid is mr.sigmoid
