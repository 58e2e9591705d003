"""inspect: input gradients (frozen and coupled batch statistics), autocorrelation, gradient
correlation across initialisations and the gradient SNR, against independent oracles."""

import math

import numpy as np
import pytest
from model_state import assert_same, snapshot, with_grads

import miniresnet as mr
import miniresnet.functional as F
from miniresnet import nn
from miniresnet.inspect.gradients import (
    autocorrelation,
    gradient_correlation,
    gradient_snr,
    input_gradients,
)

host = mr.to_numpy


def data(backend, shape, seed=0):
    return backend.asarray(np.random.default_rng(seed).normal(size=shape), "float64")


def labels(backend, values):
    return backend.asarray(np.asarray(values), "int64")




def diagonal_blocks(jac, output):
    """``J[n, output, n, ...]`` of a batch Jacobian of shape (N, K, N, ...)."""
    return np.stack([jac[n, output, n] for n in range(jac.shape[0])])


# -- input_gradients ----------------------------------------------------------------------------


def small_bn_net(backend):
    """Linear -> BatchNorm1d -> ReLU -> Linear, with a non-trivial batch-norm scale and shift."""
    net = nn.Sequential(nn.Linear(2, 5, rng=1), nn.BatchNorm1d(5), nn.ReLU(),
                        nn.Linear(5, 3, rng=2))
    rng = np.random.default_rng(3)
    net[1].weight.data = backend.asarray(rng.uniform(0.5, 2.0, 5), "float64")
    net[1].bias.data = backend.asarray(rng.normal(size=5), "float64")
    net[0].bias.data = backend.asarray(rng.normal(size=5), "float64")
    return net


def test_frozen_input_gradient_equals_the_hand_derivation(backend):
    net = small_bn_net(backend)
    x = data(backend, (7, 2), seed=4)
    w1, b1 = host(net[0].weight), host(net[0].bias)
    gamma, beta, eps = host(net[1].weight), host(net[1].bias), net[1].eps
    w2, b2 = host(net[3].weight), host(net[3].bias)
    xs = host(x)
    z = xs @ w1.T + b1
    mu, var = z.mean(0), z.var(0)  # the batch's statistics, held constant

    def frozen(xn, o):  # one sample's output with the statistics fixed
        h = gamma * (xn @ w1.T + b1 - mu) / np.sqrt(var + eps) + beta
        return np.maximum(h, 0) @ w2[o] + b2[o]

    for o in range(3):
        mask = (gamma * (z - mu) / np.sqrt(var + eps) + beta) > 0
        expected = (mask * gamma / np.sqrt(var + eps) * w2[o]) @ w1
        got = input_gradients(net, x, output=o)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-13)
        step = 1e-6  # central differences of the frozen-statistics function
        fd = np.array([[(frozen(xs[n] + step * e, o) - frozen(xs[n] - step * e, o)) / (2 * step)
                        for e in np.eye(2)] for n in range(7)])
        np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("make", [
    lambda: nn.mlp(3, 6, in_features=2, out_features=3, residual=True, seed=1),
    lambda: nn.resnet_cifar(1, in_channels=1, width=0.25, num_classes=3, seed=2),
])
def test_coupled_input_gradient_is_the_batch_jacobians_diagonal(backend, make):
    model = with_grads(make(), backend)
    x = data(backend, (4, 2) if model.config["model"] == "mlp" else (3, 1, 6, 6), seed=5)
    before = snapshot(model)
    coupled = input_gradients(model, x, output=2, batch_stats="coupled")
    frozen = input_gradients(model, x, output=2)
    assert_same(before, snapshot(model))
    with nn.frozen_stats(model):
        jac = host(mr.jacobian(model)(x))
    np.testing.assert_allclose(coupled, diagonal_blocks(jac, 2), rtol=1e-10, atol=1e-12)
    assert coupled.shape == frozen.shape == tuple(x.shape)
    assert not np.allclose(coupled, frozen)  # training-mode batch norm couples the samples


def test_frozen_input_gradient_on_a_conv_net_equals_eval_mode_with_the_batch_statistics(backend):
    model = nn.resnet_cifar(1, in_channels=1, width=0.25, num_classes=3, seed=2)
    x = data(backend, (3, 1, 6, 6), seed=6)
    frozen = input_gradients(model, x, output=1)
    norms = {m: name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    stats = {}

    def record(m, inputs, _out):
        h = host(inputs[0])
        stats[f"{norms[m]}.running_mean"] = h.mean(axis=(0, 2, 3))
        stats[f"{norms[m]}.running_var"] = h.var(axis=(0, 2, 3))

    handles = [m.register_forward_hook(record) for m in norms]
    with nn.frozen_stats(model):
        model(x)
    for h in handles:
        h.remove()
    model.eval()
    model.load_state_dict({**{k: host(v) for k, v in model.state_dict().items()}, **stats})
    jac = host(mr.jacobian(model)(x))
    np.testing.assert_allclose(frozen, diagonal_blocks(jac, 1), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("norm", [True, False])
def test_in_eval_mode_or_without_batch_norm_both_are_the_plain_gradient(backend, norm):
    model = with_grads(nn.mlp(2, 5, in_features=1, out_features=2, norm=norm, seed=3), backend)
    x = data(backend, (6, 1), seed=7)
    if norm:
        model(x)  # running statistics that are not the initial ones
        model.eval()
    before = snapshot(model)
    frozen = input_gradients(model, x, output=1)
    coupled = input_gradients(model, x, output=1, batch_stats="coupled")
    assert_same(before, snapshot(model))
    with nn.frozen_stats(model):
        plain = host(mr.grad(lambda v: mr.sum(model(v) * backend.asarray(
            np.array([0.0, 1.0]), "float64")))(x))
    np.testing.assert_allclose(frozen, plain, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(coupled, plain, rtol=1e-12, atol=1e-14)


def test_input_gradient_errors(backend):
    model = nn.mlp(1, 4, in_features=1, out_features=2)
    x = data(backend, (3, 1))
    with pytest.raises(IndexError, match=r"output=2 is out of range.*2 output units, 0 to 1"):
        input_gradients(model, x, output=2)
    with pytest.raises(IndexError, match="output=-1"):
        input_gradients(model, x, output=-1)
    with pytest.raises(TypeError, match="output must be an int"):
        input_gradients(model, x, output=1.0)
    with pytest.raises(ValueError, match=r"unknown batch_stats 'both'; valid: 'frozen', 'coupled'"):
        input_gradients(model, x, batch_stats="both")
    with pytest.raises(TypeError, match="must be a miniresnet Module.*got function"):
        input_gradients(lambda v: v, x)
    with pytest.raises(ValueError, match=r"must give \(N, K\) outputs"):
        input_gradients(nn.Identity(), data(backend, (2, 1, 3)))


# -- autocorrelation ----------------------------------------------------------------------------


def test_autocorrelation_of_an_alternating_series_is_exact():
    m = 40
    t = np.arange(m)
    expected = (m - np.arange(6)) / m * (-1.0) ** np.arange(6)  # mean 0, every product ±1
    for series in ((-1.0) ** t, 3.0 - 2.5 * (-1.0) ** t):  # affine maps change nothing
        np.testing.assert_allclose(autocorrelation(series, 5), expected, rtol=0, atol=1e-15)


def test_autocorrelation_matches_its_definition_column_by_column(backend):
    s = np.random.default_rng(0).normal(size=(30, 3)).cumsum(axis=0)
    got = autocorrelation(backend.asarray(s, "float64"), 7)
    assert got.shape == (8, 3)
    for c in range(3):
        d = s[:, c] - s[:, c].mean()
        for k in range(8):
            ref = sum(d[t] * d[t + k] for t in range(30 - k)) / sum(v * v for v in d)
            assert got[k, c] == pytest.approx(ref, rel=1e-12, abs=1e-14)
    assert np.all(got[0] == 1.0)


def test_autocorrelation_of_white_noise_and_of_an_ar1_process():
    rng = np.random.default_rng(1)
    m = 40_000
    noise = rng.normal(size=m)
    acf = autocorrelation(5.0 + noise, 10)  # constant plus noise: the constant drops out
    assert np.all(np.abs(acf[1:]) < 4 / math.sqrt(m))
    rho, ar = 0.8, np.empty(m)
    ar[0] = noise[0]
    for t in range(1, m):
        ar[t] = rho * ar[t - 1] + noise[t]
    np.testing.assert_allclose(autocorrelation(ar, 6), rho ** np.arange(7), atol=0.03)


def test_autocorrelation_edge_cases_and_errors():
    assert np.all(np.isnan(autocorrelation(np.full(10, 2.0), 3)))
    # a constant whose rounded mean is not itself (0.1 * 10 / 10 != 0.1 in some summation
    # orders): still constant, still NaN
    value = next(v for v in np.linspace(0.1, 0.9, 997) if np.full(255, v).mean() != v)
    assert np.all(np.isnan(autocorrelation(np.full(255, value), 3)))
    got = autocorrelation(np.stack([np.ones(10), np.arange(10.0)], axis=1), 2)
    assert np.all(np.isnan(got[:, 0])) and got[0, 1] == 1.0
    with pytest.raises(ValueError, match=r"max_lag=10 is out of range.*length 10; valid: 0 to 9"):
        autocorrelation(np.arange(10.0), 10)
    with pytest.raises(ValueError, match="max_lag=-1"):
        autocorrelation(np.arange(10.0), -1)
    with pytest.raises(TypeError, match="max_lag must be an int"):
        autocorrelation(np.arange(10.0), 2.0)
    with pytest.raises(ValueError, match="at least 2 points"):
        autocorrelation(np.array([1.0]), 0)
    with pytest.raises(TypeError, match="series must be an array"):
        autocorrelation("abc", 1)


# -- gradient_correlation -----------------------------------------------------------------------


def test_gradient_correlation_is_the_correlation_across_networks(backend):
    g = np.random.default_rng(2).normal(size=(12, 9)).cumsum(axis=1)
    r = gradient_correlation(backend.asarray(g, "float64"))
    np.testing.assert_allclose(r, np.corrcoef(g.T), rtol=1e-12, atol=1e-14)
    by_lag = gradient_correlation(g, max_lag=4)
    np.testing.assert_allclose(by_lag, [np.mean(np.diagonal(r, k)) for k in range(5)],
                               rtol=1e-12)
    assert by_lag[0] == pytest.approx(1.0, abs=1e-14)


def test_gradient_correlation_of_two_networks_is_plus_or_minus_one():
    g = np.random.default_rng(3).normal(size=(2, 6))
    d = g[0] - g[1]  # two samples: each point's centred values are ±d/2
    np.testing.assert_allclose(gradient_correlation(g), np.sign(np.outer(d, d)), atol=1e-14)


def test_gradient_correlation_recovers_a_known_correlation():
    rho, m, nets = 0.7, 8, 20_000
    lag = np.abs(np.subtract.outer(np.arange(m), np.arange(m)))
    chol = np.linalg.cholesky(rho ** lag)
    g = np.random.default_rng(4).normal(size=(nets, m)) @ chol.T * 3.0 + 1.0
    np.testing.assert_allclose(gradient_correlation(g), rho ** lag, atol=0.03)
    np.testing.assert_allclose(gradient_correlation(g, max_lag=5), rho ** np.arange(6), atol=0.03)


def test_gradient_correlation_constant_points_and_errors():
    g = np.random.default_rng(5).normal(size=(5, 4))
    g[:, 1] = 2.0  # the same on every network: no correlation there
    r = gradient_correlation(g)
    assert np.all(np.isnan(r[1])) and np.all(np.isnan(r[:, 1]))
    lags = gradient_correlation(g, max_lag=3)
    assert lags[3] == pytest.approx(r[0, 3]) and np.isfinite(lags).all()
    with pytest.raises(ValueError, match=r"shape \(nets, M\) with at least 2 networks"):
        gradient_correlation(np.ones((1, 5)))
    with pytest.raises(ValueError, match=r"shape \(nets, M\)"):
        gradient_correlation(np.ones(5))
    with pytest.raises(ValueError, match="max_lag=4 is out of range"):
        gradient_correlation(g, max_lag=4)


# -- gradient_snr -------------------------------------------------------------------------------


def snr(gs):
    g = np.stack([v.reshape(-1) for v in gs])
    mean = g.mean(0)
    return mean @ mean / np.mean(np.sum((g - mean) ** 2, axis=1))


@pytest.mark.parametrize("train", [True, False])
def test_gradient_snr_equals_its_definition_on_eager_gradients(backend, train):
    model = with_grads(nn.mlp(2, 4, in_features=2, out_features=3, residual=True, seed=5),
                       backend)
    twin = nn.mlp(2, 4, in_features=2, out_features=3, residual=True, seed=5)
    if not train:
        model.eval()
        twin.eval()
    batches = [(data(backend, (5, 2), seed=s), labels(backend, np.arange(5) % 3))
               for s in range(3)]
    before = snapshot(model)
    got = gradient_snr(model, iter(batches))
    assert_same(before, snapshot(model))
    eager = []  # each batch's gradients by the eager tape, on an identical model
    for x, y in batches:
        twin.zero_grad()
        with nn.frozen_stats(twin):
            F.cross_entropy(twin(x), y).backward()
        eager.append({n: host(p.grad) for n, p in twin.named_parameters()})
    names = list(eager[0])
    assert list(got.parameters) == names and got.batches == 3
    for n in names:
        assert got.parameters[n] == pytest.approx(snr([e[n] for e in eager]), rel=1e-10)

    def group(prefix):
        return snr([np.concatenate([e[n].reshape(-1) for n in names if n.startswith(prefix)])
                    for e in eager])

    assert got.total == pytest.approx(group(""), rel=1e-10)
    assert got.stem == pytest.approx(group("stem."), rel=1e-10)
    assert got.head == pytest.approx(group("head."), rel=1e-10)
    np.testing.assert_allclose(got.blocks, [group("blocks.0."), group("blocks.1.")], rtol=1e-10)


def test_gradient_snr_of_the_output_bias_by_hand(backend):
    """The output bias's gradient is mean_n(softmax(out_n) − onehot(y_n)): no autodiff needed."""
    model = nn.mlp(1, 3, in_features=2, out_features=3, norm=False, seed=6)
    batches = [(data(backend, (4, 2), seed=s), labels(backend, [0, 1, 2, s % 3]))
               for s in range(2)]
    grads = []
    for x, y in batches:
        out = host(model(x))
        p = np.exp(out - out.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grads.append((p - np.eye(3)[host(y)]).mean(0))
    g1, g2 = grads  # two batches: ‖(g1+g2)/2‖² / ‖(g1−g2)/2‖²
    expected = np.sum((g1 + g2) ** 2) / np.sum((g1 - g2) ** 2)
    got = gradient_snr(model, batches)
    assert got.parameters["head.2.bias"] == pytest.approx(expected, rel=1e-10)


def test_gradient_snr_of_identical_batches_is_infinite(backend):
    # skipinit α = 0: the branch weights' gradients are exactly 0 on every batch
    model = nn.mlp(1, 3, in_features=2, out_features=2, residual=True, skipinit=0.0, seed=7)
    batch = (data(backend, (4, 2)), labels(backend, [0, 1, 1, 0]))
    got = gradient_snr(model, [batch, batch])  # (g + g) / 2 == g: no noise at all
    assert got.total == math.inf and got.head == math.inf and got.blocks[0] == math.inf
    assert math.isnan(got.parameters["blocks.0.layers.0.weight"])


def test_gradient_snr_errors(backend):
    model = nn.mlp(1, 3, in_features=2, out_features=2)
    batch = (data(backend, (4, 2)), labels(backend, [0, 1, 1, 0]))
    with pytest.raises(ValueError, match="at least 2 minibatches.*got 1"):
        gradient_snr(model, [batch])
    with pytest.raises(TypeError, match=r"\(x, y\) pairs; item 0 is a"):
        gradient_snr(model, [batch[0], batch[0]])
    with pytest.raises(TypeError, match="must be a Network"):
        gradient_snr(nn.Linear(2, 2), [batch, batch])
