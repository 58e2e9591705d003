"""inspect.per_sample_gradients: against a loop of single-sample gradients, its statistics
against NumPy, its SNR against gradient_snr with one-sample minibatches; refusals; the model
left as it was."""

import math

import numpy as np
import pytest
from model_state import assert_same, snapshot, with_grads

import miniresnet as mr
import miniresnet.functional as F
from miniresnet import nn
from miniresnet.inspect.gradients import gradient_snr
from miniresnet.inspect.per_sample import PerSampleGradients, per_sample_gradients
from miniresnet.nn.module import functional_call

host = mr.to_numpy


def with_running_stats(model, backend, seed=5):
    """Random running statistics, so that evaluation-mode batch norm is not the identity."""
    rng = np.random.default_rng(seed)
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.data = backend.asarray(rng.normal(size=b.shape), "float64")
        elif name.endswith("running_var"):
            b.data = backend.asarray(rng.uniform(0.5, 2.0, size=b.shape), "float64")
    return model


def small_mlp(backend):
    return with_running_stats(nn.mlp(2, 5, in_features=3, out_features=4, residual=True,
                                     seed=1), backend).eval()


def small_resnet(backend):
    return with_running_stats(nn.resnet_cifar(1, in_channels=1, width=0.25, num_classes=3,
                                              seed=2), backend).eval()


def batch(backend, shape, classes, n, seed=0):
    rng = np.random.default_rng(seed)
    return (backend.asarray(rng.normal(size=(n, *shape)), "float64"),
            backend.asarray(rng.integers(0, classes, n), "int64"))


def looped(model, x, y):
    """{name: (N, *shape)} from one mr.grad call per sample."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.raw for p in model.parameters()]
    rows = []
    for i in range(x.shape[0]):
        xi, yi = x[i:i + 1, ...], y[i:i + 1]

        def loss(*arrays, xi=xi, yi=yi):
            return F.cross_entropy(functional_call(model, dict(zip(names, arrays)), xi), yi)

        rows.append([host(g) for g in mr.grad(loss, argnums=tuple(range(len(names))))(*params)])
    return {n: np.stack([r[k] for r in rows]) for k, n in enumerate(names)}


def assert_matches_loop(result, expected):
    assert list(result.gradients) == list(expected)
    for name, g in expected.items():
        assert result.gradients[name].shape == g.shape
        scale = max(1.0, float(np.abs(g).max()))
        np.testing.assert_allclose(result.gradients[name], g, rtol=0, atol=1e-12 * scale,
                                   err_msg=name)


def test_equals_a_loop_of_single_sample_gradients(backend):
    """The light test, on every backend: an mlp with evaluation-mode batch norm."""
    model = small_mlp(backend)
    x, y = batch(backend, (3,), 4, 5)
    result = per_sample_gradients(model, x, y)
    assert result.samples == 5
    assert_matches_loop(result, looped(model, x, y))
    per_loss = host(F.cross_entropy(model(x), y, reduction="none"))
    np.testing.assert_allclose(result.losses, per_loss, rtol=1e-13)


@pytest.mark.backends("numpy")
@pytest.mark.parametrize("chunk", [None, 3])
def test_equals_the_loop_on_a_resnet(backend, chunk):
    model = small_resnet(backend)
    x, y = batch(backend, (1, 8, 8), 3, 7, seed=1)
    result = per_sample_gradients(model, x, y, chunk=chunk)
    assert_matches_loop(result, looped(model, x, y))
    assert [len(b) for b in result.blocks] == [len(list(b.parameters())) for b in model.blocks]


@pytest.mark.backends("numpy")
def test_the_statistics_equal_numpy_on_those_gradients(backend):
    model = small_resnet(backend)
    x, y = batch(backend, (1, 8, 8), 3, 6, seed=2)
    r = per_sample_gradients(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    # the mean is the gradient of the batch's mean loss
    params = [p.raw for p in model.parameters()]
    full = mr.grad(lambda *a: F.cross_entropy(functional_call(model, dict(zip(names, a)), x), y),
                   argnums=tuple(range(len(names))))(*params)
    for name, g in zip(names, full):
        np.testing.assert_allclose(r.mean(name), host(g), rtol=0, atol=1e-13, err_msg=name)
    groups = {"total": names, "stem": [n for n in names if n.startswith("stem.")],
              "head": [n for n in names if n.startswith("head.")],
              2: [n for n in names if n.startswith("blocks.1.")], names[3]: [names[3]]}
    for group, members in groups.items():
        assert members and r.names(group) == members
        g = np.concatenate([r.gradients[n].reshape(6, -1) for n in members], axis=1)
        mean = g.mean(0)
        shape = r.gradients[names[3]].shape[1:] if group == names[3] else mean.shape
        np.testing.assert_allclose(r.mean(group), mean.reshape(shape), atol=1e-15)
        np.testing.assert_allclose(r.variance(group), g.var(0).reshape(shape), atol=1e-14)
        np.testing.assert_allclose(r.second_moment(group), (g ** 2).mean(0).reshape(shape),
                                   atol=1e-14)
        np.testing.assert_allclose(r.norms(group), np.sqrt((g ** 2).sum(1)), rtol=1e-14)
        snr = (mean @ mean) / np.mean(np.sum((g - mean) ** 2, axis=1))
        assert r.snr(group) == pytest.approx(snr, rel=1e-12)
    s = r.summary()
    assert list(s) == ["stem", "block 1", "block 2", "block 3", "head", "total"]
    total = np.concatenate([r.gradients[n].reshape(6, -1) for n in names], axis=1)
    assert s["total"]["variance"] == pytest.approx(total.var(0).sum(), rel=1e-12)
    assert s["total"]["second_moment"] == pytest.approx((total ** 2).mean(0).sum(), rel=1e-12)
    assert s["total"]["mean_norm"] == pytest.approx(np.linalg.norm(total.mean(0)), rel=1e-12)
    assert s["block 2"]["snr"] == pytest.approx(r.snr(2), rel=1e-15)


@pytest.mark.backends("numpy")
def test_snr_equals_gradient_snr_with_one_sample_minibatches(backend):
    model = small_resnet(backend)
    x, y = batch(backend, (1, 8, 8), 3, 5, seed=3)
    ours = per_sample_gradients(model, x, y).snr_summary()
    theirs = gradient_snr(model, [(x[i:i + 1, ...], y[i:i + 1]) for i in range(5)])
    assert ours.batches == theirs.batches == 5
    assert ours.parameters.keys() == theirs.parameters.keys()
    for name, v in theirs.parameters.items():
        assert ours.parameters[name] == pytest.approx(v, rel=1e-10), name
    np.testing.assert_allclose(ours.blocks, theirs.blocks, rtol=1e-10)
    for group in ("stem", "head", "total"):
        assert getattr(ours, group) == pytest.approx(getattr(theirs, group), rel=1e-10)


def test_training_mode_batch_norm_is_refused_and_the_model_untouched(backend):
    model = small_mlp(backend).train()
    x, y = batch(backend, (3,), 4, 4)
    with_grads(model, backend)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"per_sample_gradients: batch norm 'blocks\.0\..*"
                                         r"training mode.*coupled.*model\.eval\(\)"):
        per_sample_gradients(model, x, y)
    assert_same(before, snapshot(model))
    model.eval()
    before = snapshot(model)
    per_sample_gradients(model, x, y)
    assert_same(before, snapshot(model))


@pytest.mark.backends("numpy")
def test_training_mode_without_batch_norm_is_fine(backend):
    model = nn.mlp(2, 4, in_features=3, out_features=3, norm=False, seed=3)  # training mode
    x, y = batch(backend, (3,), 3, 4, seed=4)
    assert_matches_loop(per_sample_gradients(model, x, y, chunk=1), looped(model, x, y))


@pytest.mark.backends("numpy")
def test_bad_arguments_are_refused(backend):
    model = small_mlp(backend)
    x, y = batch(backend, (3,), 4, 4)
    with pytest.raises(TypeError, match="per_sample_gradients: model must be a Network"):
        per_sample_gradients(nn.Linear(3, 4), x, y)
    for chunk in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"chunk must be a positive int.*{chunk!r}"):
            per_sample_gradients(model, x, y, chunk=chunk)
    with pytest.raises(ValueError, match=r"x of shape \(4, 3\) and y of shape \(3,\)"):
        per_sample_gradients(model, x, y[:3])
    r = per_sample_gradients(model, x, y)
    with pytest.raises(KeyError, match="unknown group 'nope'"):
        r.snr("nope")
    with pytest.raises(IndexError, match="block 3 is out of range"):
        r.norms(3)
    assert isinstance(r, PerSampleGradients) and math.isfinite(r.snr("total"))


@pytest.mark.backends("numpy")
def test_identical_samples_have_no_noise(backend):
    model = small_mlp(backend)
    x, y = batch(backend, (3,), 4, 1)
    xs, ys = backend.asarray(np.repeat(host(x), 3, axis=0)), backend.asarray(np.repeat(
        host(y), 3))
    r = per_sample_gradients(model, xs, ys)
    np.testing.assert_allclose(r.variance("total"), 0.0, atol=1e-30)
    assert r.snr("total") > 1e25  # only rounding in the mean is left as noise
