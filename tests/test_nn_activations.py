"""Activations ("identity", "leaky_relu", "crelu"), looks-linear initialisation, bias init."""

import numpy as np
import pytest

import miniresnet as mr
from miniresnet import nn
from miniresnet.nn.init import INITIALIZERS, looks_linear
from miniresnet.nn.layers import ACTIVATIONS, Activation, activation

GRID = np.linspace(-2.0, 2.0, 256)[:, None]  # Balduzzi's 1-D inputs (0 is not on it)


def _np(x):
    return mr.to_numpy(x)


def _input_gradient(model, x):
    """d out / d x per sample (no batch coupling here: no BN, or BN in eval mode)."""
    return _np(mr.grad(lambda v: mr.sum(model(v)))(x))


# -- the activations ------------------------------------------------------------------------------


def test_activation_values_and_derivatives(backend):
    host = np.array([[-2.0, -0.5, 0.0, 0.25, 3.0], [1.0, -1.0, 2.0, -3.0, 0.5]])
    x = backend.asarray(host, "float64")
    relu = np.maximum(host, 0)
    expected = {"relu": relu, "tanh": np.tanh(host), "sigmoid": 1 / (1 + np.exp(-host)),
                "identity": host, "leaky_relu": np.where(host > 0, host, 0.01 * host),
                "crelu": np.concatenate([relu, np.maximum(-host, 0)], axis=1)}
    assert set(expected) == set(ACTIVATIONS)
    for name, want in expected.items():
        act = activation(name)
        assert isinstance(act, Activation)
        np.testing.assert_allclose(_np(act(x)), want, rtol=1e-15, atol=0)
    # derivatives: leaky 1 above 0 and the slope below; identity 1; crelu's halves
    slope = _np(mr.grad(lambda v: mr.sum(activation("leaky_relu")(v)))(x))
    np.testing.assert_array_equal(slope, np.where(host > 0, 1.0, np.where(host < 0, 0.01, 0.0)))
    np.testing.assert_array_equal(_np(mr.grad(lambda v: mr.sum(activation("identity")(v)))(x)),
                                  np.ones_like(host))
    # sum(relu(x)) - sum(relu(-x)) = sum(x): gradient 1 wherever x != 0
    diff = _np(mr.grad(lambda v: mr.sum(activation("crelu")(v)[:, :5])
                       - mr.sum(activation("crelu")(v)[:, 5:]))(x))
    np.testing.assert_array_equal(diff, np.where(host != 0, 1.0, 0.0))


def test_crelu_doubles_the_channel_axis(backend):
    x = backend.asarray(np.random.default_rng(0).normal(size=(2, 3, 4, 5)), "float64")
    y = _np(activation("crelu")(x))
    assert y.shape == (2, 6, 4, 5)
    np.testing.assert_array_equal(y[:, :3] - y[:, 3:], _np(x))


def test_unknown_activation_names_every_valid_one(backend):
    with pytest.raises(ValueError, match="unknown activation 'gelu'; valid: relu, tanh, sigmoid, "
                                         "identity, leaky_relu, crelu"):
        activation("gelu")


# -- looks-linear weights -------------------------------------------------------------------------


def test_looks_linear_weights_are_mirrored_orthogonal(backend):
    assert "looks_linear" in INITIALIZERS
    for shape in [(3, 8), (6, 4), (5, 4, 3, 3)]:
        w = _np(looks_linear(backend.rng(1), shape))
        assert w.shape == shape
        half = shape[1] // 2
        np.testing.assert_array_equal(w[:, half:], -w[:, :half])
        m = w[:, :half].reshape(shape[0], -1)
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m  # the shorter side orthonormal
        np.testing.assert_allclose(gram, np.eye(len(gram)), atol=1e-13)
    with pytest.raises(ValueError, match=r"looks_linear: .* even number of inputs .*\(3, 5\)"):
        looks_linear(backend.rng(0), (3, 5))
    layer = nn.Linear(4, 3, init="looks_linear", rng=0)
    x = backend.asarray(np.random.default_rng(2).normal(size=(7, 2)), "float64")
    # W relu(x) - W relu(-x) = W x
    np.testing.assert_allclose(_np(layer(activation("crelu")(x))),
                               _np(x) @ _np(layer.weight)[:, :2].T, rtol=1e-13, atol=1e-15)


def _linearity_error(model, x1, x2, a=0.7, b=-1.3):
    """max |f(a x1 + b x2) - a f(x1) - b f(x2)| relative to the outputs' size."""
    mix = a * _np(model(x1)) + b * _np(model(x2))
    combined = model(x1 * a + x2 * b)
    return np.max(np.abs(_np(combined) - mix)) / np.max(np.abs(mix))


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("order", ["full_preact", "relu_preact"])
def test_looks_linear_crelu_mlp_is_linear_at_init(backend, order, residual):
    x = backend.asarray(GRID, "float64")
    shifted = backend.asarray(np.cos(3 * GRID), "float64")
    for norm in (False, True):
        model = nn.mlp(6, 8, activation="crelu", init="looks_linear", norm=norm, order=order,
                       residual=residual, layers=2)
        if norm:
            model.eval()  # batch norm with its (initial) running statistics: an affine map
        g = _input_gradient(model, x)
        # papers.md check 3: a constant gradient over the grid (spread < 1e-10 of its mean)
        assert np.ptp(g) < 1e-10 * abs(g.mean()) and abs(g.mean()) > 1e-3
        assert _linearity_error(model, x, shifted) < 1e-12
        np.testing.assert_allclose(_np(model(x)), GRID * g.mean(), rtol=1e-12, atol=1e-14)
    # the same CReLU net with He weights is not linear: the check above can fail
    plain = nn.mlp(6, 8, activation="crelu", norm=False, order=order, residual=residual,
                   layers=2)
    g = _input_gradient(plain, x)
    assert np.ptp(g) > 1e-3 * np.abs(g).mean()
    assert _linearity_error(plain, x, shifted) > 1e-3


def test_looks_linear_crelu_resnet_is_linear_at_init(backend):
    rng = np.random.default_rng(3)
    x1, x2 = (backend.asarray(rng.normal(size=(3, 2, 8, 8)), "float64") for _ in range(2))
    for order, shortcut in [("full_preact", "projection"), ("relu_preact", "projection"),
                            ("relu_preact", "zero_pad")]:
        model = nn.resnet_cifar(2, width=0.25, in_channels=2, num_classes=3, norm=False,
                                activation="crelu", init="looks_linear", order=order,
                                shortcut=shortcut)
        assert _linearity_error(model, x1, x2) < 1e-12, (order, shortcut)
        # the stem is fed by the input, not a CReLU: orthogonal, not mirrored
        w = _np(model.stem.weight)
        assert not np.allclose(w[:, 1], -w[:, 0])
    he = nn.resnet_cifar(1, width=0.25, in_channels=2, num_classes=3, norm=False,
                         activation="crelu", order="full_preact")
    assert _linearity_error(he, x1, x2) > 1e-3


def test_crelu_widths_follow(backend):
    for order in ("full_preact", "relu_preact"):
        block = nn.BasicBlock(4, 8, 2, order=order, activation="crelu", rng=0)
        assert [tuple(layer.weight.shape) for layer in block.layers] == [(8, 8, 3, 3),
                                                                         (8, 16, 3, 3)]
        seen = 8 if order == "full_preact" else 4  # full_preact's shortcut sees act(N₁(x))
        assert tuple(block.shortcut[0].weight.shape) == (8, seen, 1, 1)
        x = backend.asarray(np.random.default_rng(0).normal(size=(2, 4, 6, 6)), "float64")
        assert tuple(block(x).shape) == (2, 8, 3, 3)
        dense = nn.DenseBlock(3, 3, order=order, activation="crelu", layers=2, rng=0)
        assert [tuple(layer.weight.shape) for layer in dense.layers] == [(3, 6), (3, 6)]
    model = nn.resnet_cifar(1, width=0.25, num_classes=3, activation="crelu",
                            order="full_preact")
    assert tuple(model.head[-1].weight.shape) == (3, 32)  # BN, CReLU(16 -> 32), pool, Linear


@pytest.mark.parametrize("make, match", [
    (lambda: nn.mlp(2, 4, activation="crelu", order="post"),
     "mlp: activation 'crelu' changes the width, so it needs an order in which every activation "
     "feeds a layer \\(relu_preact, full_preact\\); in order 'post'"),
    (lambda: nn.resnet_cifar(1, activation="crelu"), "resnet_cifar: activation 'crelu' .* 'post'"),
    (lambda: nn.resnet_cifar(1, activation="crelu", order="bn_after_add"), "'bn_after_add'"),
    (lambda: nn.mlp(2, 4, activation="crelu", order="relu_before_add"), "'relu_before_add'"),
    (lambda: nn.resnet_cifar(1, activation="crelu", order="full_preact", block="highway"),
     "resnet_cifar: activation 'crelu' changes the width, which a highway block"),
    (lambda: nn.resnet_cifar(1, width=0.03, activation="crelu", order="full_preact",
                             shortcut="zero_pad"),
     "resnet_cifar: a full_preact zero_pad shortcut sees .* 2 wide, more than the block's 1"),
    (lambda: nn.resnet_cifar(1, activation="crelu", order="full_preact", shortcut="zero_pad",
                             init="looks_linear"),
     "resnet_cifar: init 'looks_linear' with order 'full_preact' and shortcut 'zero_pad': .* "
     "not be linear at initialisation; use shortcut='projection' or order='relu_preact'"),
    (lambda: nn.BasicBlock(4, 8, 2, order="full_preact", activation="crelu",
                           shortcut="zero_pad", init="looks_linear"),
     "^init 'looks_linear' with order 'full_preact' and shortcut 'zero_pad'"),
    (lambda: nn.mlp(2, 4, init="looks_linear"),
     "mlp: init 'looks_linear' mirrors the weights fed by a CReLU: it needs activation='crelu', "
     "got activation='relu'"),
    (lambda: nn.resnet_cifar(1, init="looks_linear", activation="leaky_relu"), "'leaky_relu'"),
    (lambda: nn.DenseBlock(3, 3, order="post", activation="crelu"),
     "activation 'crelu' changes the width, .* in order 'post'"),
    (lambda: nn.DenseBlock(3, 3, order="full_preact", init="looks_linear"),
     "init 'looks_linear' .* needs activation='crelu'"),
    (lambda: nn.HighwayBlock(3, 3, activation="crelu"), "highway blocks .* 'crelu'"),
    (lambda: nn.BasicBlock(4, 6, order="full_preact", activation="crelu", shortcut="zero_pad"),
     "zero_pad shortcut: .* makes that 8 wide, more than the block's 6 outputs"),
    (lambda: nn.mlp(2, 4, bias_init=-0.1), "mlp: bias_init must be a finite number >= 0, got -0.1"),
    (lambda: nn.resnet_cifar(1, bias_init=float("nan")), "bias_init must be a finite number >= 0"),
])
def test_invalid_combinations_are_clear_errors(backend, make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bias_init_type_is_checked(backend):
    with pytest.raises(TypeError, match="mlp: bias_init must be a finite number >= 0, got 'zeros'"):
        nn.mlp(2, 4, bias_init="zeros")


# -- bias initialisation --------------------------------------------------------------------------


def _state(model):
    return {k: _np(v) for k, v in model.state_dict().items()}


def test_default_draws_are_the_documented_sequence(backend):
    """The default (zero biases) draws the weights from the seed in construction order and
    nothing else; bias_init > 0 draws the biases from a spawned generator, in module order,
    leaving the weights as they were."""
    model = nn.mlp(2, 5, norm=False, residual=True, seed=4)
    rng = backend.rng(4)
    he = INITIALIZERS["he"]
    weights = {name: _np(he(rng, shape)) for name, shape in [
        ("stem.weight", (5, 1)), ("blocks.0.layers.0.weight", (5, 5)),
        ("blocks.1.layers.0.weight", (5, 5)), ("head.2.weight", (1, 5))]}
    state = _state(model)
    assert state.keys() == weights.keys() | {k.replace("weight", "bias") for k in weights}
    for name, w in weights.items():
        np.testing.assert_array_equal(state[name], w)
        assert not state[name.replace("weight", "bias")].any()
    np.testing.assert_array_equal(_state(nn.mlp(2, 5, norm=False, residual=True, seed=4,
                                                 bias_init=0.0))["head.2.bias"], 0.0)
    biased = _state(nn.mlp(2, 5, norm=False, residual=True, seed=4, bias_init=0.3))
    draw = backend.rng(4).spawn(1)[0]
    for name in weights:
        np.testing.assert_array_equal(biased[name], state[name])
        bias = name.replace("weight", "bias")
        np.testing.assert_array_equal(biased[bias], _np(draw.normal(state[bias].shape, std=0.3)))


def test_bias_init_spread(backend):
    model = nn.mlp(5, 200, norm=False, bias_init=0.1, seed=1)
    biases = np.concatenate([_np(p).ravel() for name, p in model.state_dict().items()
                             if name.endswith("bias")])
    assert biases.size == 200 * 6 + 1
    assert abs(biases.std() / 0.1 - 1) < 0.1  # 5 standard errors (about 2 % each)
    assert abs(biases.mean()) < 5 * 0.1 / np.sqrt(biases.size)
    # with batch norm only the stem and the classifier have biases; a highway gate keeps its own
    bn = _state(nn.mlp(2, 4, bias_init=0.1))
    assert all(bn[k].any() for k in ("stem.bias", "head.2.bias"))
    assert not any(bn[k].any() for k in bn if k.startswith("blocks") and k.endswith(".bias"))
    highway = _state(nn.resnet_cifar(1, width=0.25, block="highway", norm=False, bias_init=0.1,
                                     gate_bias=-2.0))
    gates = [k for k in highway if k.endswith("gate.bias")]
    assert gates and all(np.all(highway[k] == -2.0) for k in gates)
    assert all(highway[k].all() for k in highway if k.endswith("bias") and k not in gates)


def test_random_biases_move_the_kinks_away_from_zero(backend):
    """Without BN and with zero biases a 1-D-input ReLU net is positively homogeneous: its
    gradient takes one value for x < 0 and one for x > 0. Random biases put kinks elsewhere."""
    x = backend.asarray(GRID, "float64")
    flat = _input_gradient(nn.mlp(3, 16, norm=False, seed=2), x)[:, 0]
    for side in (flat[GRID[:, 0] < 0], flat[GRID[:, 0] > 0]):
        assert np.ptp(side) <= 1e-12 * np.abs(side).max()
    g = _input_gradient(nn.mlp(3, 16, norm=False, seed=2, bias_init=0.5), x)[:, 0]
    changes = GRID[1:, 0][np.abs(np.diff(g)) > 1e-9 * np.abs(g).max()]
    assert np.sum(np.abs(changes) > 0.1) >= 2  # at least two kinks away from 0
