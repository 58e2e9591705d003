"""Training instruments: each built-in against an independent computation for one step, fit
with instruments bit-identical to fit without, counts that match ``every``, bad instruments
refused before training, α on exact quadratics and the cockpit figure."""

import copy
import math

import numpy as np
import pytest

import miniresnet as mr
import miniresnet.functional as F
from miniresnet import nn
from miniresnet.data import Dataset
from miniresnet.instruments import (
    DistanceFromInit,
    GradientNorm,
    GradientSNR,
    Instrument,
    Probe,
    StepAlpha,
    UpdateRatio,
    cockpit,
    plot_cockpit,
    step_alpha,
)
from miniresnet.nn.layers import BatchNorm1d
from miniresnet.nn.module import functional_call
from miniresnet.train import fit

host = mr.to_numpy


def blobs(backend, n=12, features=3, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features))
    y = rng.integers(0, classes, n)
    return Dataset(backend.asarray(x, "float64"), backend.asarray(y, "int64"),
                   backend.asarray(x[:4], "float64"), backend.asarray(y[:4], "int64"),
                   classes, "blobs", 0.0, 1.0)


def net(norm=True, seed=1):
    return nn.mlp(2, 4, in_features=3, out_features=3, residual=True, norm=norm, seed=seed)


def one_step(model, ds, instruments):
    """One full-batch step of ``fit`` with ``instruments`` and a probe keeping the minibatch;
    returns the record of each instrument, the model before and the minibatch."""
    before = copy.deepcopy(model)
    seen = []
    probe = Probe("batch", lambda s: seen.append((s.x, s.y)))
    history = fit(model, ds, epochs=1, batch_size=ds.n_train, lr=0.3, weight_decay=0.01,
                  seed=0, progress=False, instruments=[*instruments, probe])
    records = {k: v for k, v in history.instruments.items() if k != "batch"}
    assert all(len(v) == 1 and v[0][0] == 0 for v in records.values())
    return {k: v[0][1] for k, v in records.items()}, before, seen[0]


def params_of(model):
    return {n: host(p) for n, p in model.named_parameters()}


def grouped(model, values):
    """Per-group L2 norms (numpy) of ``values`` (name -> array)."""
    def norm(module):
        names = [n for n, p in model.named_parameters()
                 if any(p is q for q in module.parameters())]
        return math.sqrt(sum(float(np.sum(values[n] ** 2)) for n in names))

    return {"stem": norm(model.stem), "blocks": [norm(b) for b in model.blocks],
            "head": norm(model.head), "total": norm(model)}


def assert_grouped(got, expected, rel=1e-12):
    assert set(got) >= {"stem", "blocks", "head", "total"}
    for key in ("stem", "head", "total"):
        assert got[key] == pytest.approx(expected[key], rel=rel), key
    np.testing.assert_allclose(got["blocks"], expected["blocks"], rtol=rel)


def loss_and_grad(model, x, y, params):
    names = list(params)

    def loss(*arrays):
        return F.cross_entropy(functional_call(model, dict(zip(names, arrays)), x), y)

    value, gs = mr.value_and_grad(loss, argnums=tuple(range(len(names))))(
        *(np.asarray(params[n]) for n in names))
    return float(host(value)), {n: host(g) for n, g in zip(names, gs)}


@pytest.mark.backends("numpy")
def test_norm_ratio_distance_and_alpha_equal_independent_computations(backend):
    model, ds = net(), blobs(backend)
    got, before, (x, y) = one_step(
        model, ds, [GradientNorm(), UpdateRatio(), DistanceFromInit(), StepAlpha()])
    theta0, theta1 = params_of(before), params_of(model)
    reference = copy.deepcopy(before)  # training mode: batch norm with the batch's statistics
    f0, g0 = loss_and_grad(reference, x, y, theta0)
    f1, g1 = loss_and_grad(reference, x, y, theta1)
    assert_grouped(got["grad_norm"], grouped(before, g0))
    delta = {n: theta1[n] - theta0[n] for n in theta0}
    norms_delta, norms_theta = grouped(before, delta), grouped(before, theta0)
    assert_grouped(got["update_ratio"], {
        "stem": norms_delta["stem"] / norms_theta["stem"],
        "head": norms_delta["head"] / norms_theta["head"],
        "total": norms_delta["total"] / norms_theta["total"],
        "blocks": np.array(norms_delta["blocks"]) / np.array(norms_theta["blocks"])})
    assert_grouped(got["distance"], norms_delta)
    assert got["distance"]["relative"] == pytest.approx(
        norms_delta["total"] / norms_theta["total"], rel=1e-12)
    d0 = sum(float(np.sum(g0[n] * delta[n])) for n in delta)
    d1 = sum(float(np.sum(g1[n] * delta[n])) for n in delta)
    alpha = got["alpha"]
    assert alpha["loss_before"] == pytest.approx(f0, rel=1e-13)
    assert alpha["loss_after"] == pytest.approx(f1, rel=1e-13)
    assert alpha["slope_before"] == pytest.approx(d0, rel=1e-10)
    assert alpha["slope_after"] == pytest.approx(d1, rel=1e-10)
    assert d0 < 0 and f1 < f0  # a real descent step, so α is informative
    assert alpha["alpha"] == pytest.approx(step_alpha(f0, f1, d0, d1), rel=1e-9)


def per_sample_loop(model, x, y, params, buffers=None):
    """(N, P) per-sample gradients from one mr.grad call per sample, in evaluation mode with
    ``buffers`` (name -> array) standing in for the running statistics."""
    names = list(params)
    rows = []
    model = copy.deepcopy(model).eval()
    for i in range(x.shape[0]):
        def loss(*arrays, i=i):
            values = {**dict(zip(names, arrays)), **(buffers or {})}
            return F.cross_entropy(functional_call(model, values, x[i:i + 1]), y[i:i + 1])

        gs = mr.grad(loss, argnums=tuple(range(len(names))))(*(params[n] for n in names))
        rows.append({n: host(g) for n, g in zip(names, gs)})
    return rows


def snr_of(model, rows):
    def snr(module):
        names = [n for n, p in model.named_parameters()
                 if any(p is q for q in module.parameters())]
        g = np.stack([np.concatenate([r[n].ravel() for n in names]) for r in rows])
        mean = g.mean(0)
        return float(mean @ mean / np.mean(np.sum((g - mean) ** 2, axis=1)))

    return {"stem": snr(model.stem), "blocks": [snr(b) for b in model.blocks],
            "head": snr(model.head), "total": snr(model)}


def batch_stats_by_hand(model, x, params):
    """The mean and biased variance at each batch norm's input, from NumPy on the recorded
    inputs (the model's own forward in training mode, statistics left alone)."""
    model = copy.deepcopy(model)
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, BatchNorm1d):
            m.register_forward_hook(lambda mod, inputs, out, name=name: seen.__setitem__(
                name, host(inputs[0])))
    with mr.no_grad():
        functional_call(model, params, x)
    out = {}
    for name, h in seen.items():
        out[f"{name}.running_mean"], out[f"{name}.running_var"] = h.mean(0), h.var(0)
    return out


@pytest.mark.backends("numpy")
@pytest.mark.parametrize("norm,batch_stats", [(False, "frozen"), (True, "running"),
                                              (True, "frozen")])
def test_snr_equals_single_sample_gradients(backend, norm, batch_stats):
    model, ds = net(norm=norm), blobs(backend)
    if norm:  # non-trivial running statistics, so "running" and "frozen" differ
        for name, b in model.named_buffers():
            b.data = np.full(b.shape, 0.3 if name.endswith("mean") else 1.7)
    got, before, (x, y) = one_step(model, ds, [GradientSNR(batch_stats=batch_stats)])
    theta0 = params_of(before)
    buffers = batch_stats_by_hand(before, x, theta0) if batch_stats == "frozen" else None
    assert (buffers is not None and len(buffers) == 6) == (norm and batch_stats == "frozen")
    rows = per_sample_loop(before, x, y, theta0, buffers)
    assert_grouped(got["grad_snr"], snr_of(before, rows), rel=1e-9)


def test_with_instruments_training_is_bit_identical(backend):
    """On every backend: weights, buffers, optimiser state and history do not depend on the
    instruments, nor on an instrument that tampers with the model."""

    def tamper(step):
        for p in step.model.parameters():
            p.data = p.raw * 0.0
        ops_loss = F.cross_entropy(step.model(step.x), step.y)  # training mode: new statistics
        ops_loss.backward()
        step.model.eval()
        step.optimizer.lr = 123.0
        return 1.0

    runs = []
    for instruments in (None, [*cockpit(every=1), Probe("tamper", tamper, every=2)]):
        model, ds = net(), blobs(backend, n=10)
        opt = mr.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
        h = fit(model, ds, epochs=3, batch_size=4, lr=0.2, seed=3, optimizer=opt,
                clip_norm=0.5, progress=False, instruments=instruments)
        runs.append((model, opt, h))
    (m0, o0, h0), (m1, o1, h1) = runs
    for (k, a), b in zip(m0.state_dict().items(), m1.state_dict().values()):
        np.testing.assert_array_equal(host(a), host(b), err_msg=k)
    for a, b in zip(o0.velocity, o1.velocity):
        np.testing.assert_array_equal(host(a), host(b))
    assert o0.steps == o1.steps and o0.lr == o1.lr
    assert h0.step_loss == h1.step_loss and h0.step_grad_norm == h1.step_grad_norm
    assert h0.records == h1.records and h0.instruments == {}
    assert m1.training and all(p.grad is None for p in m1.parameters())
    assert sorted(h1.instruments) == ["alpha", "distance", "grad_norm", "grad_snr", "tamper",
                                      "update_ratio"]
    assert all(len(v) == 9 for k, v in h1.instruments.items() if k != "tamper")


@pytest.mark.backends("numpy")
def test_recorded_counts_match_every(backend):
    ds = blobs(backend, n=10)  # 3 steps per epoch at batch size 4

    def steps_of(every, start_epoch=0, epochs=3):
        counter = Probe("count", lambda s: s.step, every=every)
        h = fit(net(), ds, epochs=epochs, batch_size=4, progress=False, seed=1,
                instruments=[counter], start_epoch=start_epoch)
        assert all(step == value for step, value in h.instruments["count"])
        return [step for step, _ in h.instruments["count"]]

    assert steps_of(1) == list(range(9))
    assert steps_of(2) == [0, 2, 4, 6, 8]
    assert steps_of(4) == [0, 4, 8]
    assert steps_of(20) == [0]
    assert steps_of(2, start_epoch=1) == [4, 6, 8]  # counted over the whole run


@pytest.mark.backends("numpy")
def test_bad_instruments_are_refused_before_training(backend):
    ds = blobs(backend)

    class NoCall:
        name, every = "nocall", 1

    class Bare:
        def __call__(self, step):
            return 0.0

    def every(value):
        p = Probe("p", lambda s: 0.0)
        p.every = value
        return p

    cases = [
        (Probe("p", lambda s: 0.0), TypeError, "instruments must be a list"),
        ([NoCall()], TypeError, r"instruments\[0\] \(NoCall\) 'nocall' is not callable"),
        ([Bare()], TypeError, r"instruments\[0\] \(Bare\) has no name"),
        ([every(0)], ValueError, r"'p': every must be a positive int.*got 0"),
        ([every(2.0)], ValueError, "every must be a positive int"),
        ([every(True)], ValueError, "every must be a positive int"),
        ([every(None)], ValueError, "every must be a positive int"),
        ([GradientNorm(), GradientNorm()], ValueError, "two instruments are named 'grad_norm'"),
    ]
    for instruments, error, message in cases:
        model = net()
        before = params_of(model)
        with pytest.raises(error, match=message):
            fit(model, ds, epochs=1, batch_size=4, progress=False, instruments=instruments)
        after = params_of(model)
        assert all(np.array_equal(before[k], after[k]) for k in before)  # no step was taken
    with pytest.raises(ValueError, match="GradientNorm: every must be a positive int"):
        GradientNorm(every=0)
    with pytest.raises(TypeError, match="UpdateRatio: name must be a non-empty str"):
        UpdateRatio(name="")
    with pytest.raises(ValueError, match="unknown batch_stats 'batch'"):
        GradientSNR(batch_stats="batch")
    with pytest.raises(TypeError, match="Probe: fn must be callable"):
        Probe("x", 3)
    with pytest.raises(NotImplementedError):
        Instrument()(None)


def test_step_alpha_on_exact_quadratics(backend):
    """f(τ) = (τ − τ*)²: the fit is exact, so α = (1 − τ*) / |τ*|."""
    for t_star, alpha in ((1.0, 0.0), (0.5, 1.0), (2.0, -0.5), (0.25, 3.0), (-1.0, 2.0),
                          (1e6, -1.0 + 1e-6)):
        f = lambda t, s=t_star: 3.0 * (t - s) ** 2 + 7.0  # noqa: E731
        df = lambda t, s=t_star: 6.0 * (t - s)  # noqa: E731
        assert step_alpha(f(0), f(1), df(0), df(1)) == pytest.approx(alpha, rel=1e-9, abs=1e-12)
    assert math.isnan(step_alpha(0.0, -1.0, -0.5, -1.5))  # concave: no minimum
    assert math.isnan(step_alpha(0.0, math.nan, -0.5, -1.5))
    # inconsistent values: the least-squares quadratic, here by hand from the normal equations
    a = np.array([[1, 0, 0], [1, 1, 1], [0, 1, 0], [0, 1, 2]], float)
    b = np.array([2.0, 1.5, -1.0, 0.3])
    c = np.linalg.solve(a.T @ a, a.T @ b)
    t = -c[1] / (2 * c[2])
    assert step_alpha(*b) == pytest.approx((1 - t) / abs(t), rel=1e-10)


@pytest.mark.backends("numpy")
def test_the_cockpit_figure_is_written(backend, tmp_path):
    model, ds = nn.resnet_cifar(1, in_channels=1, width=0.25, num_classes=3, seed=0), None
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 1, 8, 8))
    y = rng.integers(0, 3, 24)
    ds = Dataset(x, y, x[:4], y[:4], 3, "noise", 0.0, 1.0)
    h = fit(model, ds, epochs=2, batch_size=8, lr=0.1, progress=False,
            instruments=cockpit(every=1, snr_every=2, hessian_every=3))
    assert len(h.instruments["grad_snr"]) == 3 and len(h.instruments["alpha"]) == 6
    assert [s for s, _ in h.instruments["hessian_top"]] == [0, 3]
    path = plot_cockpit(h, tmp_path / "sub" / "cockpit.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    h.instruments.clear()  # nothing recorded: every panel says so, the figure still draws
    assert plot_cockpit(h, tmp_path / "empty.png").stat().st_size > 10_000


def test_hessian_top_is_the_top_eigenvalue_after_the_step(backend):
    """One full-batch step of a tiny net without batch norm: the instrument's value equals the
    largest eigenvalue of the exact Hessian at the weights after the step."""
    from miniresnet import inspect
    from miniresnet.instruments import HessianTop

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 3)), rng.integers(0, 2, 12)
    ds = Dataset(backend.asarray(x, "float64"), backend.asarray(y), backend.asarray(x[:2],
                 "float64"), backend.asarray(y[:2]), 2, "noise", 0.0, 1.0)
    model = nn.mlp(1, 4, in_features=3, out_features=2, norm=False, seed=0)
    p = sum(int(np.prod(q.shape)) for q in model.parameters())
    h = fit(model, ds, epochs=1, batch_size=12, lr=0.3, progress=False,
            instruments=[HessianTop(every=1, k=2, steps=p)])
    [(step, value)] = h.instruments["hessian_top"]
    exact = np.linalg.eigvalsh(inspect.hessian(model, ds.x_train, ds.y_train).matrix)[::-1]
    assert step == 0 and value["lr"] == 0.3
    np.testing.assert_allclose(value["values"], exact[:2], rtol=1e-8)
    with pytest.raises(ValueError, match="steps must be an int >= k=3"):
        HessianTop(k=3, steps=2)
