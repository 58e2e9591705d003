"""The transforms' contract: argnums in every form, what they return, and anomaly reports."""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import miniresnet as mr
from miniresnet import nn
from miniresnet.backend_choice import known_backend


def host(x):
    return mr.Tensor(x).numpy()


def _args(backend):
    rng = np.random.default_rng(1)
    return tuple(backend.asarray(rng.normal(size=3), "float64") for _ in range(3))


def scalar_f(a, b, c):
    return mr.sum(a * a * b + 3.0 * c * a)


def scalar_grads(a, b, c):
    """d scalar_f / d(a, b, c), by hand."""
    a, b, c = host(a), host(b), host(c)
    return 2 * a * b + 3 * c, a * a, 3 * a


def vector_f(a, b, c):
    return a * b + c * c


def vector_jacobians(a, b, c):
    a, b, c = host(a), host(b), host(c)
    return np.diag(b), np.diag(a), np.diag(2 * c)


argnums_tuples = st.lists(st.integers(-3, 2), min_size=1, max_size=5).map(tuple)


@given(nums=argnums_tuples)
def test_argnums_with_repeats_and_negative_positions(backend, nums):
    """Every slot of a repeated or negative argnum gets the exact derivative of its argument."""
    args = _args(backend)
    grads, jacs = scalar_grads(*args), vector_jacobians(*args)
    got = {
        "grad": mr.grad(scalar_f, argnums=nums)(*args),
        "value_and_grad": mr.value_and_grad(scalar_f, argnums=nums)(*args)[1],
        "jacobian": mr.jacobian(vector_f, argnums=nums)(*args),
    }
    for name, results in got.items():
        reference = jacs if name == "jacobian" else grads
        assert isinstance(results, tuple) and len(results) == len(nums), name
        for i, r in zip(nums, results):
            np.testing.assert_allclose(host(r), reference[i], rtol=1e-14, err_msg=f"{name} {i}")


@given(i=st.integers(-3, 2))
def test_a_single_argnum_gives_a_single_result(backend, i):
    args = _args(backend)
    np.testing.assert_allclose(host(mr.grad(scalar_f, argnums=i)(*args)),
                               scalar_grads(*args)[i], rtol=1e-14)
    np.testing.assert_allclose(host(mr.jacobian(vector_f, argnums=np.int64(i))(*args)),
                               vector_jacobians(*args)[i], rtol=1e-14)


@pytest.mark.parametrize("transform", [mr.grad, mr.value_and_grad, mr.jacobian])
@pytest.mark.parametrize("argnums", ["0", 1.0, True, (0, "1"), None])
def test_non_integer_argnums_is_a_type_error_naming_argnums(transform, argnums):
    with pytest.raises(TypeError, match="argnums must be an int or a tuple of ints"):
        transform(scalar_f, argnums=argnums)


@pytest.mark.parametrize("transform", [mr.grad, mr.jacobian])
def test_argnums_out_of_range_or_empty(backend, transform):
    with pytest.raises(ValueError, match=r"out of range for 3 arguments \(valid: -3 to 2\)"):
        transform(scalar_f, argnums=(0, 3))(*_args(backend))
    with pytest.raises(ValueError, match="argnums is empty"):
        transform(scalar_f, argnums=())


def _is_array(x) -> bool:
    return not isinstance(x, mr.Tensor) and known_backend(x) is not None


def test_parameters_closed_over_are_constants(backend):
    """A function of a model's parameters (requires_grad=True) but not of them as arguments:
    every transform returns backend arrays and records nothing on the eager tape."""
    model = nn.mlp(2, 6, in_features=3, norm=False)
    model.eval()
    x = backend.asarray(np.random.default_rng(0).normal(size=(4, 3)), "float64")
    loss = lambda x: mr.sum(mr.tanh(model(x)))  # noqa: E731
    results = [
        mr.grad(loss)(x),
        *mr.value_and_grad(loss)(x),
        mr.jacobian(model)(x),
        *mr.jvp(model, (x,), (x,)),
        mr.hvp(loss, x, x),
        mr.vjp(model, x)[0],
        mr.vjp(model, x)[1](mr.ones((4, 1)).raw)[0],
    ]
    for r in results:
        assert _is_array(r), type(r)
    assert np.isfinite(np.linalg.norm(host(results[0])))
    assert all(p.grad is None for p in model.parameters())
    # and they are still the exact derivatives: compare with the eager tape
    t = mr.Tensor(x, requires_grad=True)
    loss(t).backward()
    np.testing.assert_allclose(host(results[0]), t.grad.numpy(), rtol=1e-14)


def test_arguments_on_the_eager_tape_keep_results_differentiable(backend):
    """An argument with requires_grad=True puts the eager tape back on: the result is a Tensor
    and backward() reaches both the argument and the parameters the function closes over."""
    w = mr.Tensor(backend.asarray(np.array([0.5, -1.5]), "float64"), requires_grad=True)
    x = mr.Tensor(backend.asarray(np.array([2.0, 3.0]), "float64"), requires_grad=True)
    g = mr.grad(lambda x: mr.sum(w * x * x))(x)  # 2 w x
    assert isinstance(g, mr.Tensor) and g.requires_grad
    mr.sum(g).backward()
    np.testing.assert_allclose(x.grad.numpy(), [1.0, -3.0])  # d/dx sum(2 w x) = 2 w
    np.testing.assert_allclose(w.grad.numpy(), [4.0, 6.0])  # d/dw sum(2 w x) = 2 x


def test_nested_transforms_still_see_closed_over_outer_variables(backend):
    # d/dy [ d/dx sum(x^2 y) at x=1 ] = d/dy [2 y] = 2
    inner = lambda y: mr.sum(mr.grad(lambda x: mr.sum(x * x * y))(mr.ones((1,)).raw))  # noqa
    assert host(mr.grad(inner)(backend.asarray(np.array([3.0]), "float64"))) == pytest.approx(2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_anomaly_names_the_input_that_brought_nan_in(backend):
    bad = backend.asarray(np.array([np.nan, 1.0]), "float64")
    good = backend.asarray(np.array([1.0, 2.0]), "float64")
    with mr.detect_anomaly():
        with pytest.raises(FloatingPointError, match="grad: argument 1 holds nan"):
            mr.grad(lambda a, b: mr.sum(a * b))(good, bad)
        with pytest.raises(FloatingPointError, match="jvp: tangent 0 holds nan"):
            mr.jvp(mr.exp, (good,), (bad,))
        _, vjp_fn = mr.vjp(mr.exp, good)
        with pytest.raises(FloatingPointError, match="vjp_fn: the cotangent holds nan"):
            vjp_fn(bad)
        with pytest.raises(FloatingPointError,
                           match=r"'mul': argument 0 \(2,\) holds nan; no op .* produced it"):
            mr.Tensor(bad) * 2.0
        with pytest.raises(FloatingPointError, match=r"'mul': argument 1 inf holds inf"):
            mr.Tensor(good) * float("inf")


@pytest.mark.parametrize("value", ["nonsense", ""])
def test_unknown_backend_in_the_environment_fails_at_import(value):
    env = {**os.environ, "MINIRESNET_BACKEND": value}
    done = subprocess.run([sys.executable, "-c", "import miniresnet"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert f"MINIRESNET_BACKEND={value!r}" in last
    assert "numpy, array_api_strict, cupy" in last
