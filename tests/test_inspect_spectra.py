"""inspect: singular values (dense and matrix-free, largest and smallest), the exact loss
Hessian, and Orhan & Pitkow's unit statistics, on constructed cases with known answers."""

import math

import numpy as np
import pytest
from model_state import assert_same, snapshot, with_grads

import miniresnet as mr
import miniresnet.functional as F
from miniresnet import nn
from miniresnet.inspect.spectra import Hessian, hessian, singular_values
from miniresnet.inspect.units import unit_statistics

host = mr.to_numpy


def data(backend, shape, seed=0):
    return backend.asarray(np.random.default_rng(seed).normal(size=shape), "float64")




# -- singular_values ----------------------------------------------------------------------------

#: a 60 × 40 spectrum from 1 down to 1e-3, then three tiny values far below √eps
SPECTRUM = np.concatenate([np.logspace(0, -3, 37), [1e-8, 1e-10, 1e-12]])


def known_matrix(m=60, n=40, s=SPECTRUM, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(m, n)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return u @ np.diag(s) @ v.T


@pytest.mark.parametrize("transpose", [False, True])
def test_singular_values_of_a_known_spectrum(backend, transpose):
    a = known_matrix()
    a = a.T if transpose else a
    dense = singular_values(backend.asarray(a, "float64"))
    np.testing.assert_allclose(dense, SPECTRUM, rtol=0, atol=1e-15)
    largest = singular_values(a, k=6, which="largest", method="operator")
    np.testing.assert_allclose(largest, SPECTRUM[:6], rtol=1e-13)
    # the smallest, resolved without factorising: to 1e-15 absolute, i.e. 1e-12 is found to
    # three digits, where square roots of AᵀA's eigenvalues would give only ~1e-8 (√eps)
    smallest = singular_values(a, k=6, which="smallest", method="operator")
    np.testing.assert_allclose(smallest, SPECTRUM[-6:], rtol=0, atol=1e-15)
    np.testing.assert_allclose(singular_values(a, k=6, which="smallest"), SPECTRUM[-6:],
                               rtol=0, atol=1e-15)


def test_singular_values_of_a_functions_jacobian_agree_on_both_paths(backend):
    w = data(backend, (7, 5), seed=1)

    def f(x):  # (3, 5) -> (3, 7), nonlinear
        return mr.tanh(mr.matmul(x, mr.matrix_transpose(w)))

    x = data(backend, (3, 5), seed=2)
    jac = host(mr.jacobian(f)(x)).reshape(21, 15)
    exact = np.linalg.svd(jac, compute_uv=False)
    np.testing.assert_allclose(singular_values(f, x), exact, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(singular_values(f, x, k=4, which="largest", method="operator"),
                               exact[:4], rtol=1e-11)
    np.testing.assert_allclose(singular_values(f, x, k=4, which="smallest", method="operator"),
                               exact[-4:], rtol=0, atol=1e-13)


@pytest.mark.parametrize("train", [True, False])
def test_singular_values_of_a_network_leave_it_unchanged(backend, train):
    model = with_grads(nn.mlp(2, 5, in_features=3, out_features=2, seed=1), backend)
    model.train(train)
    x = data(backend, (4, 3), seed=3)
    before = snapshot(model)
    s = singular_values(model, x)
    top = singular_values(model, x, k=2, which="largest", method="operator")
    low = singular_values(model, x, k=2, which="smallest", method="operator")
    assert_same(before, snapshot(model))
    with nn.frozen_stats(model):
        jac = host(mr.jacobian(model)(x)).reshape(8, 12)
    exact = np.linalg.svd(jac, compute_uv=False)
    np.testing.assert_allclose(s, exact, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(top, exact[:2], rtol=1e-11)
    np.testing.assert_allclose(low, exact[-2:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", [nn.BatchNorm1d, nn.BatchNorm2d])
def test_training_mode_batch_norm_has_two_null_directions_per_channel(backend, norm):
    c = 3
    bn = norm(c, eps=0.0)  # with eps > 0 the scaling direction has a value of order eps/var
    bn.weight.data = backend.asarray(np.array([1.0, 2.0, 0.5]), "float64")
    x = data(backend, (6, c) if norm is nn.BatchNorm1d else (3, c, 2, 2), seed=4)
    s = singular_values(bn, x)
    assert np.all(s[-2 * c:] < 1e-14 * s[0])  # the mean and the scale of every channel
    assert s[-2 * c - 1] > 1e-3 * s[0]  # and nothing else
    low = singular_values(bn, x, k=2 * c + 1, which="smallest", method="operator")
    assert np.all(low[-2 * c:] < 1e-14 * s[0])
    assert low[0] == pytest.approx(s[-2 * c - 1], rel=1e-10)
    bn.eval()  # evaluation mode: a per-channel scaling, no null direction
    np.testing.assert_allclose(np.sort(singular_values(bn, x)),
                               np.sort(np.repeat(np.abs(host(bn.weight)), x.size // c)),
                               rtol=1e-12)


def test_singular_values_errors(backend):
    a = known_matrix(6, 4, np.arange(4.0, 0, -1))
    with pytest.raises(ValueError, match=r"unknown which 'top'; valid: 'all', 'largest'"):
        singular_values(a, which="top")
    with pytest.raises(ValueError, match=r"unknown method 'lanczos'; valid: 'auto', 'dense'"):
        singular_values(a, method="lanczos")
    with pytest.raises(ValueError, match=r"needs k, an int from 1 to 4 \(the map is 6×4\)"):
        singular_values(a, which="largest")
    with pytest.raises(ValueError, match="k is for which='largest' or 'smallest'"):
        singular_values(a, k=2)
    with pytest.raises(ValueError, match=r"finds k < min\(m, n\) = 4 values.*got k=4"):
        singular_values(a, k=4, which="largest", method="operator")
    with pytest.raises(ValueError, match="all 4 singular values of a 6×4 map need the dense"):
        singular_values(a, method="operator")
    with pytest.raises(ValueError, match="a function needs the point x"):
        singular_values(lambda v: v)
    with pytest.raises(ValueError, match="x is only for a function"):
        singular_values(a, data(backend, (2,)))
    with pytest.raises(ValueError, match=r"must be 2-d and real.*shape \(4,\)"):
        singular_values(np.ones(4))
    with pytest.raises(TypeError, match="expected a matrix .* got str"):
        singular_values("matrix")
    np.testing.assert_allclose(singular_values(a, k=2, which="smallest"), [2.0, 1.0])


# -- hessian ------------------------------------------------------------------------------------


def loss_of(model, x, y):
    names = [n for n, _ in model.named_parameters()]

    def loss(*arrays):
        return F.cross_entropy(nn.functional_call(model, dict(zip(names, arrays)), x), y)

    return loss, [p.raw for p in model.parameters()]


@pytest.mark.parametrize("train", [True, False])
def test_hessian_is_symmetric_and_equals_hvps_and_differences_of_gradients(backend, train):
    model = with_grads(nn.mlp(2, 3, in_features=2, out_features=3, residual=True, seed=2),
                       backend)
    x = data(backend, (5, 2), seed=5)
    y = backend.asarray(np.array([0, 1, 2, 1, 0]), "int64")
    model(x)  # running statistics that are not the initial ones
    model.train(train)
    before = snapshot(model)
    h = hessian(model, x, y)
    assert_same(before, snapshot(model))
    assert isinstance(h, Hessian)
    count = model.num_parameters()
    assert h.matrix.shape == (count, count)
    assert h.names == [n for n, _ in model.named_parameters()]
    np.testing.assert_allclose(h.matrix, h.matrix.T, rtol=0, atol=1e-13 * np.abs(h.matrix).max())
    loss, params = loss_of(model, x, y)
    rng = np.random.default_rng(6)
    with nn.frozen_stats(model):
        for _ in range(3):  # random directions through mr.hvp (forward over reverse)
            v = [rng.normal(size=p.shape) for p in params]
            hv = mr.hvp(loss, tuple(params), tuple(backend.asarray(t, "float64") for t in v))
            flat = np.concatenate([host(t).reshape(-1) for t in hv])
            np.testing.assert_allclose(h.matrix @ np.concatenate([t.reshape(-1) for t in v]),
                                       flat, rtol=1e-10, atol=1e-12)
        # central differences of the gradient along one direction
        v = [rng.normal(size=p.shape) for p in params]
        step = 1e-5
        g = mr.grad(loss, argnums=tuple(range(len(params))))

        def flat_grad(sign):
            shifted = [p + backend.asarray(sign * step * t, "float64") for p, t in zip(params, v)]
            return np.concatenate([host(t).reshape(-1) for t in g(*shifted)])

        fd = (flat_grad(1) - flat_grad(-1)) / (2 * step)
    np.testing.assert_allclose(h.matrix @ np.concatenate([t.reshape(-1) for t in v]), fd,
                               rtol=1e-6, atol=1e-8)
    where = h.slices()
    block = h.block("head.2.weight", "stem.weight")
    assert block.shape == (9, 6)
    np.testing.assert_array_equal(block, h.matrix[where["head.2.weight"], where["stem.weight"]])


def test_hessian_refuses_large_models(backend):
    model = nn.mlp(1, 8, in_features=2, out_features=2)
    x, y = data(backend, (3, 2)), backend.asarray(np.array([0, 1, 0]), "int64")
    with pytest.raises(ValueError, match=r"has 138 parameters, more than max_params=100"):
        hessian(model, x, y, max_params=100)
    with pytest.raises(KeyError, match="no parameter 'nope'"):
        hessian(nn.mlp(0, 2, out_features=2), x[:, :1], y).block("nope", "stem.bias")
    with pytest.raises(TypeError, match="must be a miniresnet Module"):
        hessian(None, x, y)


# -- unit_statistics ----------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_unit_statistics_of_constructed_layers(backend, train):
    rng = np.random.default_rng(7)
    first = nn.Linear(2, 4, rng=1)
    w = rng.normal(size=(4, 2))
    w[2] = 3.0 * w[0]  # a duplicated unit (scaled): overlap 1
    first.weight.data = backend.asarray(w, "float64")
    first.bias.data = backend.asarray(np.array([0.0, 0.0, 0.0, -100.0]), "float64")  # unit 3 dead
    second = nn.Linear(4, 3, rng=2)
    second.weight.data = backend.asarray(np.outer([1.0, 2.0, 0.5], [1.0, 0.5, -1.0, 2.0]),
                                         "float64")  # rank one
    # positive pre-activations: the second ReLU passes a rank-one (affine) signal through
    second.bias.data = backend.asarray(np.array([1e3, 2e3, 5e2]), "float64")
    net = with_grads(nn.Sequential(first, nn.ReLU(), second, nn.ReLU()), backend)
    net.train(train)
    x = data(backend, (50, 2), seed=8)
    before = snapshot(net)
    stats = unit_statistics(net, x)
    assert_same(before, snapshot(net))
    assert set(stats.active) == {"1", "3"} and set(stats.overlap) == {"0", "2"}
    h = np.maximum(host(x) @ w.T, 0)
    h[:, 3] = 0.0
    np.testing.assert_array_equal(stats.active["1"], (h > 0).mean(0))
    assert stats.eliminated["1"] == 0.25
    assert stats.overlap["0"] == pytest.approx(1.0, abs=1e-15)
    assert stats.overlap["2"] == pytest.approx(1.0, abs=1e-15)  # every row a multiple of one
    lam = np.linalg.eigvalsh(np.cov(h.T, bias=True))
    assert stats.participation_ratio["1"] == pytest.approx(lam.sum() ** 2 / (lam ** 2).sum(),
                                                           rel=1e-12)
    assert 1 < stats.participation_ratio["1"] <= 2 + 1e-12  # rank two: one live unit copies another
    assert stats.participation_ratio["3"] == pytest.approx(1.0, abs=1e-12)  # rank one
    assert stats.eliminated["3"] == 0.0 and np.all(stats.active["3"] == 1.0)


def test_unit_statistics_of_a_conv_net_treat_positions_as_samples(backend):
    model = nn.resnet_cifar(1, in_channels=1, width=0.25, seed=3)
    x = data(backend, (2, 1, 6, 6), seed=9)
    seen = {}
    handles = [m.register_forward_hook(lambda mod, _a, out, name=name: seen.__setitem__(
        name, host(out))) for name, m in model.named_modules() if isinstance(m, nn.ReLU)]
    with nn.frozen_stats(model):
        model(x)
    for h in handles:
        h.remove()
    stats = unit_statistics(model, x)
    assert set(stats.active) == set(seen)
    for name, out in seen.items():
        units = np.moveaxis(out, 1, -1).reshape(-1, out.shape[1])
        np.testing.assert_allclose(stats.active[name], (units > 0).mean(0), rtol=1e-15)
        lam = np.linalg.eigvalsh(np.cov(units.T, bias=True))
        assert stats.participation_ratio[name] == pytest.approx(
            lam.sum() ** 2 / (lam ** 2).sum(), rel=1e-10)
        assert 1.0 <= stats.participation_ratio[name] <= out.shape[1]
    conv = model.stem[0]
    rows = host(conv.weight).reshape(conv.weight.shape[0], -1)
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    cos = np.abs(rows @ rows.T) - 2 * np.eye(len(rows))
    assert stats.overlap["stem.0"] == pytest.approx(cos.max(), rel=1e-14)


def test_unit_statistics_edge_cases(backend):
    single = nn.Sequential(nn.Linear(2, 1, rng=0), nn.ReLU())
    x = data(backend, (4, 2))
    stats = unit_statistics(single, x)
    assert math.isnan(stats.overlap["0"])  # one unit: no pair to compare
    constant = nn.Sequential(nn.Linear(2, 3, bias=False, rng=0), nn.ReLU())
    stats = unit_statistics(constant, backend.asarray(np.zeros((4, 2)), "float64"))
    assert stats.eliminated["1"] == 1.0 and math.isnan(stats.participation_ratio["1"])
    with pytest.raises(TypeError, match="inspect.unit_statistics: model must be"):
        unit_statistics("net", x)
