"""The engine's own behaviour: graphs, fan-out, depth, nesting, modes, dtypes, memory."""

import gc
import math
import sys
import weakref

import numpy as np
import pytest

import miniresnet as mr
import miniresnet.functional as F
from miniresnet import nn, tracing
from miniresnet.testing import check_grads


def arr(backend, values, dtype="float64"):
    return backend.asarray(np.asarray(values, dtype=dtype), dtype)


def host(x):
    return mr.Tensor(x).numpy()


def test_long_chain_first_and_second_derivative(backend):
    """10,000 ops, default recursion limit: x -> a x + b tanh(x), repeated."""
    assert sys.getrecursionlimit() <= 1000
    steps, a, b = 5000, 0.9999, 1e-4

    def chain(x):
        for _ in range(steps):
            x = x * a + b * mr.tanh(x)
        return mr.sum(x)

    x0 = np.array([0.3, -0.7])
    # reference by forward accumulation in NumPy: d/dx and d2/dx2 of the elementwise map
    v, d1, d2 = x0.copy(), np.ones(2), np.zeros(2)
    for _ in range(steps):
        t = np.tanh(v)
        s = a + b * (1 - t * t)
        ds = b * (-2 * t * (1 - t * t))
        d1, d2, v = s * d1, ds * d1 * d1 + s * d2, a * v + b * t
    g = host(mr.grad(chain)(arr(backend, x0)))
    np.testing.assert_allclose(g, d1, rtol=1e-12)
    h = host(mr.hvp(chain, arr(backend, x0), arr(backend, [1.0, 1.0])))
    np.testing.assert_allclose(h, d2, rtol=1e-10)


def test_fan_out_accumulates(backend):
    def f(a):
        b = a + a
        c = b + b
        return mr.sum(c * a)  # 4 a^2 -> 8 a

    x = arr(backend, [1.5, -2.0])
    np.testing.assert_allclose(host(mr.grad(f)(x)), 8 * host(x), rtol=1e-15)
    np.testing.assert_allclose(host(mr.grad(lambda a: mr.sum(a * a * a))(x)), 3 * host(x) ** 2)


def test_eager_tape_backward_accumulates_and_frees(backend):
    w = mr.Tensor(arr(backend, [1.0, 2.0, 3.0]), requires_grad=True)
    loss = mr.sum(w * w) + mr.sum(w)
    loss.backward()
    np.testing.assert_allclose(host(w.grad.raw), [3.0, 5.0, 7.0])
    with pytest.raises(RuntimeError, match="already freed"):
        loss.backward()
    loss = mr.sum(w * 2.0)
    loss.backward(retain_graph=True)
    loss.backward()
    np.testing.assert_allclose(host(w.grad.raw), [7.0, 9.0, 11.0])  # accumulated
    w.grad = None
    assert w.grad is None and w.is_leaf and w.requires_grad


def test_backward_errors(backend):
    x = mr.Tensor(arr(backend, [1.0, 2.0]))
    with pytest.raises(RuntimeError, match="does not require grad"):
        mr.sum(x).backward()
    w = mr.Tensor(arr(backend, [1.0, 2.0]), requires_grad=True)
    with pytest.raises(RuntimeError, match="non-scalar"):
        (w * 2.0).backward()


def test_no_grad_and_detach_stop_derivatives(backend):
    x = arr(backend, [1.0, 2.0])

    def f(x):
        with mr.no_grad():
            c = x * x
        assert not c.requires_grad and c._level == 0
        return mr.sum(c * x + x.detach() * x)

    # d/dx of (const * x + const * x) = x^2 + x
    np.testing.assert_allclose(host(mr.grad(f)(x)), host(x) ** 2 + host(x))
    assert mr.is_grad_enabled()
    w = mr.Tensor(x, requires_grad=True)
    with mr.no_grad():
        y = w * 3.0
    assert not y.requires_grad


def test_nested_transforms_do_not_confuse_perturbations(backend):
    # d/dx [x * d/dy (x * y)] = d/dx [x * x] = 2x
    f = lambda x: x * mr.grad(lambda y: mr.sum(x * y))(arr(backend, 3.0))  # noqa: E731
    assert host(mr.grad(f)(arr(backend, 2.0))) == pytest.approx(4.0)
    # third derivative of x^4 by nesting
    g3 = mr.grad(mr.grad(mr.grad(lambda x: x**4)))
    assert host(g3(arr(backend, 1.5))) == pytest.approx(24 * 1.5)
    # jvp of grad equals grad of grad
    d2 = mr.jvp(mr.grad(lambda x: mr.sum(mr.tanh(x))), (arr(backend, [0.4]),),
                (arr(backend, [1.0]),))[1]
    t = math.tanh(0.4)
    assert host(d2)[0] == pytest.approx(-2 * t * (1 - t * t), rel=1e-12)


def test_transform_outputs_are_backend_arrays(backend):
    x = arr(backend, [1.0, 2.0])
    g = mr.grad(lambda x: mr.sum(x * x))(x)
    assert type(g) is backend.array_type
    out, fn = mr.vjp(lambda x: x * 2.0, x)
    assert type(out) is backend.array_type and type(fn(x)[0]) is backend.array_type
    assert type(mr.jacobian(mr.tanh)(x)) is backend.array_type


def test_value_and_grad_and_argnums(backend):
    x, y = arr(backend, [1.0, 2.0]), arr(backend, [3.0, -1.0])
    val, (gx, gy) = mr.value_and_grad(lambda a, b: mr.sum(a * b * b), argnums=(0, 1))(x, y)
    assert host(val) == pytest.approx(1 * 9 + 2 * 1)
    np.testing.assert_allclose(host(gx), [9.0, 1.0])
    np.testing.assert_allclose(host(gy), [6.0, -4.0])
    # an argument the output does not depend on gets zeros
    np.testing.assert_array_equal(host(mr.grad(lambda a, b: mr.sum(a), argnums=1)(x, y)), [0, 0])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtypes_preserved(backend, dtype):
    x = arr(backend, [[0.5, -1.0], [2.0, 0.25]], dtype)
    f = lambda x: mr.sum(mr.tanh(x @ x) * 2.0 + 1.0)  # noqa: E731
    assert host(f(x)).dtype == np.dtype(dtype)
    assert host(mr.grad(f)(x)).dtype == np.dtype(dtype)
    assert host(mr.jvp(f, (x,), (x,))[1]).dtype == np.dtype(dtype)
    assert host(mr.hvp(f, x, x)).dtype == np.dtype(dtype)
    assert host(mr.jacobian(mr.tanh)(x)).dtype == np.dtype(dtype)
    assert mr.tensor([1.0, 2.0]).dtype == backend.dtype("float64")


def test_graph_is_freed_after_differentiation(backend):
    refs = []

    def f(x):
        h = mr.tanh(x) * 3.0
        refs.append(weakref.ref(h._node))
        return mr.sum(h * h)

    mr.grad(f)(arr(backend, [1.0, 2.0]))
    gc.collect()
    assert refs[0]() is None
    w = mr.Tensor(arr(backend, [1.0, 2.0]), requires_grad=True)
    h = mr.tanh(w)
    node = weakref.ref(h._node)
    loss = mr.sum(h)
    loss.backward()
    del h, loss
    assert node() is None  # without gc: no reference cycles keep the graph alive


def test_vjp_fn_is_reusable_and_takes_stacks(backend):
    x = arr(backend, [0.1, 0.2, 0.3])
    out, fn = mr.vjp(lambda x: mr.tanh(x) * mr.sum(x), x)
    e = backend.xp.eye(3, dtype=x.dtype, device=backend.device)
    stacked = host(fn(e)[0])
    rows = np.stack([host(fn(e[i, :])[0]) for i in range(3)])
    np.testing.assert_array_equal(stacked, rows)
    np.testing.assert_array_equal(host(fn(e)[0]), stacked)  # same again
    stack2 = backend.xp.reshape(backend.xp.concat([e, e]), (2, 3, 3))
    assert fn(stack2)[0].shape == (2, 3, 3)


def test_user_defined_primitive_is_checked(backend):
    """The README's example: a new primitive through the built-ins' mechanism."""
    softplus = mr.Primitive(
        "softplus",
        lambda xp, x: xp.log(1.0 + xp.exp(x)),
        vjp=(lambda g, ans, x: g * mr.sigmoid(x),),
        jvp=(lambda t, ans, x: t * mr.sigmoid(x),),
    )
    x = arr(backend, [-1.0, 0.5, 2.0])
    y = mr.bind(softplus, mr.tensor(x))
    np.testing.assert_allclose(host(y.raw), np.log1p(np.exp(host(x))))
    check_grads(lambda x: mr.bind(softplus, x), x, order=3)


def test_check_grads_catches_wrong_rules(backend):
    x = arr(backend, [-1.0, 0.5, 2.0])
    wrong_first = mr.Primitive("bad", lambda xp, x: xp.exp(x),
                               vjp=(lambda g, ans, x: g * ans * 1.001,),
                               jvp=(lambda t, ans, x: t * ans,))
    with pytest.raises(AssertionError, match="reverse"):
        check_grads(lambda x: mr.bind(wrong_first, x), x, order=1)
    wrong_fwd = mr.Primitive("bad", lambda xp, x: xp.exp(x),
                             vjp=(lambda g, ans, x: g * ans,),
                             jvp=(lambda t, ans, x: t * ans * 0.999,))
    with pytest.raises(AssertionError, match="forward"):
        check_grads(lambda x: mr.bind(wrong_fwd, x), x, order=1)
    # first derivative right, but the rule uses a detached value: wrong second derivative
    not_differentiable = mr.Primitive("bad", lambda xp, x: xp.exp(x),
                                      vjp=(lambda g, ans, x: g * ans.detach(),),
                                      jvp=(lambda t, ans, x: t * ans.detach(),))
    check_grads(lambda x: mr.bind(not_differentiable, x), x, order=1)
    with pytest.raises(AssertionError, match="order-2"):
        check_grads(lambda x: mr.bind(not_differentiable, x), x, order=2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_anomaly_mode_names_the_op(backend):
    x = arr(backend, [1.0, -1.0])
    with mr.detect_anomaly():
        with pytest.raises(FloatingPointError, match="'log' produced nan in the forward pass"):
            mr.log(x)
        with pytest.raises(FloatingPointError, match=r"'div' produced inf in the backward pass "
                                                      r"\(derivative rule of 'sqrt'\)"):
            mr.grad(lambda x: mr.sum(mr.sqrt(x * x)))(arr(backend, [0.0, 1.0]))
    assert tracing._state["backward_op"] is None
    # off by default: NaN just propagates
    assert np.isnan(host(mr.log(x).raw)[1])


def test_tensor_basics(backend):
    t = mr.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert t.shape == (2, 2) and t.ndim == 2 and t.size == 4 and len(t) == 2
    assert "shape=(2, 2)" in repr(t) and backend.name in repr(t)
    assert float(mr.sum(t)) == 10.0
    np.testing.assert_array_equal((t.T @ t).numpy(), np.array([[10.0, 14.0], [14.0, 20.0]]))
    np.testing.assert_array_equal((1.0 - t / 2.0).numpy(), 1.0 - np.array([[1, 2], [3, 4]]) / 2)
    assert isinstance(t.numpy(), np.ndarray)
    assert t[0, 1].item() == 2.0 and t[1:, None].shape == (1, 1, 2)


def test_backend_selection(backend):
    import os
    import subprocess

    with mr.use_backend("numpy") as be:
        assert mr.current_backend() is be and type(mr.tensor([1.0]).raw) is be.array_type
    assert mr.current_backend() is backend  # restored
    code = "import miniresnet as mr; print(mr.current_backend().name)"
    env = dict(os.environ, MINIRESNET_BACKEND=backend.name)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == backend.name, out.stderr
    x = mr.tensor([1.0, 2.0])
    assert type(mr.to_numpy(x)) is np.ndarray and type(mr.to_numpy(x.raw)) is np.ndarray


def test_numpy_scalars_and_zero_d_arrays(backend):
    if backend.name != "numpy":
        pytest.skip("NumPy scalars are NumPy data")
    assert mr.sum(np.float64(1.0)).item() == 1.0
    assert mr.exp(np.float64(0.0)).item() == 1.0
    assert mr.mul(np.asarray(2.0), np.asarray(3.0)).item() == 6.0
    assert mr.vjp(lambda x: -x, np.asarray(0.5))[1](np.float64(1.0))[0] == -1.0
    x = mr.tensor(np.ones(2, dtype=np.float32))
    assert (x * np.float64(2.0)).dtype == np.float32  # a scalar adopts the array's dtype


def test_vjp_never_returns_the_callers_array(backend):
    u = backend.asarray(np.ones(3), "float64")
    out = mr.vjp(lambda x: x, backend.asarray(np.zeros(3), "float64"))[1](u)[0]
    assert out is not u


def test_transforms_started_inside_no_grad_still_work(backend):
    x = arr(backend, [0.3, -0.2])
    with mr.no_grad():
        j = mr.jacobian(mr.tanh)(x)
        g = mr.grad(lambda x: mr.sum(x * x))(x)
    np.testing.assert_allclose(np.diag(host(j)), 1 - np.tanh(host(x)) ** 2, rtol=1e-14)
    np.testing.assert_allclose(host(g), 2 * host(x))
    assert mr.is_grad_enabled()


def test_conv_keeps_patches_only_when_its_filters_are_differentiated(backend):
    """With constant filters conv saves nothing (a faster kernel may run); derivatives in the
    input are the same either way, and the filter gradient still reuses the forward's patches."""
    rng = np.random.default_rng(5)
    x = backend.asarray(rng.standard_normal((3, 2, 7, 6)))
    w = backend.asarray(rng.standard_normal((4, 2, 3, 3)))
    u = backend.asarray(rng.standard_normal((3, 4, 7, 6)))
    f = lambda x, w: mr.sum(mr.conv(x, w, 1, 1) * u)  # noqa: E731
    gx_only = mr.grad(f)(x, w)
    gx, gw = mr.grad(f, argnums=(0, 1))(x, w)
    np.testing.assert_allclose(mr.to_numpy(gx_only), mr.to_numpy(gx), rtol=1e-13, atol=1e-13)
    check_grads(f, x, w, order=2)

    def conv_node(trace_w: bool):
        level = tracing.new_level()
        tx, tw = (tracing.wrap(mr.tensor(a), level, tracing.leaf_node()) for a in (x, w))
        return mr.conv(tx, tw if trace_w else w, 1, 1)._node

    assert conv_node(trace_w=False).saved is None  # filters constant: nothing kept
    assert conv_node(trace_w=True).saved["kernel"] is not None
    with mr.no_grad():
        assert mr.conv(x, w, 1, 1)._node is None


def test_every_tensor_operator_is_registered_by_ops():
    """Tensor's class body names its operators; miniresnet.ops registers exactly those."""
    assert tracing.OPERATION_NAMES == set(tracing.OPERATIONS)
    assert all(tracing.OPERATIONS[n] is getattr(mr.ops, n) for n in tracing.OPERATION_NAMES)
    for name in ("__add__", "__rmatmul__", "__getitem__", "sum", "reshape", "T", "mT"):
        assert name in vars(mr.Tensor), name  # declared in the class body, not set from outside


def test_primitive_parameters_are_static(backend):
    """Every node of a ResNet training step's graph, rules of a second derivative included, has
    hashable parameters (ints, floats, tuples, dtypes; no dict): what a forward keeps for its
    rules is on the node's ``saved`` slot, not in a parameter."""
    model = nn.resnet_cifar(1, width=0.25, in_channels=2, num_classes=5, seed=4).train()
    rng = np.random.default_rng(0)
    x = mr.Tensor(backend.asarray(rng.standard_normal((4, 2, 8, 8))), requires_grad=True)
    y = backend.asarray(np.array([0, 1, 2, 3]))
    # the input gradient of an input on the eager tape: its rules are recorded there too
    gx = mr.grad(lambda x: F.cross_entropy(model(x), y))(x)
    root = mr.sum(gx * gx) + F.cross_entropy(model(x), y)
    nodes = [n for n in tracing.toposort(root._node) if n.prim is not None]
    for node in nodes:
        hash(tuple(sorted(node.params.items())))  # TypeError for a dict or a list
    names = {n.prim.name for n in nodes}
    saved = {n.prim.name for n in nodes if n.saved is not None}
    assert {"conv", "conv_transpose", "standardize_affine", "standardize_affine_grad"} <= names
    assert {"conv", "standardize_affine"} <= saved
    root.backward()
    assert all(p.grad is not None for p in model.parameters())
