"""inspect.curvature: Lanczos top eigenpairs, Hutchinson / Hutch++ traces, stochastic Lanczos
quadrature and the Gauss–Newton matrix, each against the exact Hessian (inspect.hessian) or
the exact Gauss–Newton matrix (from mr.jacobian) of tiny networks."""

import numpy as np
import pytest
from model_state import assert_same, snapshot, with_grads

import miniresnet as mr
from miniresnet import nn
from miniresnet.inspect import hessian
from miniresnet.inspect.curvature import (
    Eigenpairs,
    Lanczos,
    _rademacher,
    ggn_top,
    ggn_vector_product,
    hessian_density,
    hessian_top,
    hessian_trace,
    hessian_vector_product,
    lanczos,
)
from miniresnet.nn.module import substituted
from miniresnet.tracing import as_tensor

host = mr.to_numpy


def tiny_mlp(backend, depth=1, width=4, classes=3, n=6, seed=0, **kw):
    """A trained-looking tiny MLP with batch norm (running statistics moved off 0/1), its
    inputs and labels."""
    model = nn.mlp(depth, width, in_features=3, out_features=classes, seed=seed + 1, **kw)
    rng = np.random.default_rng(seed)
    x = backend.asarray(rng.normal(size=(n, 3)), "float64")
    y = backend.asarray(rng.integers(0, classes, n), "int64")
    model(x)  # running statistics that are neither 0/1 nor this batch's
    model(backend.asarray(rng.normal(1.0, 2.0, size=(n, 3)), "float64"))
    return model, x, y


def batch_statistics(model, x):
    """Each batch norm's mean and biased variance on ``x`` in training mode, named as its
    running-statistics buffers (computed here on the host, independently of the library)."""
    seen = {}
    norms = {m: name for name, m in model.named_modules()
             if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)}

    def observe(module, inputs, _out):
        t = as_tensor(inputs[0])
        h = host(t.raw)
        axes = (0,) if h.ndim == 2 else (0, 2, 3)
        seen[norms[module]] = tuple(t.backend.asarray(s, t.backend.dtype_name(t.dtype))
                                    for s in (h.mean(axis=axes), h.var(axis=axes)))

    handles = [m.register_forward_hook(observe) for m in norms]
    model.train()
    with nn.frozen_stats(model), mr.no_grad():
        model(x)
    for h in handles:
        h.remove()
    out = {}
    for name, (mean, var) in seen.items():
        out[f"{name}.running_mean"], out[f"{name}.running_var"] = mean, var
    return out


def exact_hessian(model, x, y, bn):
    """The dense Hessian under each batch-norm mode, from inspect.hessian."""
    training = [m.training for m in model.modules()]
    try:
        if bn == "batch":
            return hessian(model.train(), x, y).matrix
        if bn == "eval":
            return hessian(model.eval(), x, y).matrix
        stats = batch_statistics(model, x)
        with substituted(model, stats):
            return hessian(model.eval(), x, y).matrix
    finally:
        for m, t in zip(model.modules(), training):
            object.__setattr__(m, "training", t)


def dense_ggn(model, x, y):
    """``Jᵀ H_out J`` from the dense Jacobian of the logits (model in its current mode)."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.raw for p in model.parameters()]

    def logits(*arrays):
        return nn.functional_call(model, dict(zip(names, arrays)), x)

    with nn.frozen_stats(model):
        z = host(logits(*params))
        jac = mr.jacobian(logits, argnums=tuple(range(len(params))))(*params)
    n, c = z.shape
    j = np.concatenate([host(b).reshape(n * c, -1) for b in jac], axis=1)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    h_out = np.zeros((n * c, n * c))
    for i in range(n):
        h_out[i * c:(i + 1) * c, i * c:(i + 1) * c] = (np.diag(p[i]) - np.outer(p[i], p[i])) / n
    return j.T @ h_out @ j


# -- on every backend: the instruments against the exact answer, model untouched ----------------


@pytest.mark.parametrize("bn", ["batch", "frozen"])
def test_instruments_equal_the_exact_answers_and_leave_the_model_alone(backend, bn):
    model, x, y = tiny_mlp(backend)
    with_grads(model, backend)
    model.train()
    h = exact_hessian(model, x, y, bn)
    dim = h.shape[0]
    before = snapshot(model)
    exact = np.linalg.eigh(h)
    top = hessian_top(model, x, y, k=2, steps=dim, bn=bn)
    # Hutchinson on 5 probes equals zᵀHz averaged over those probes, exactly
    trace = hessian_trace(model, x, y, 5, seed=3, bn=bn, chunk=2)
    z = _rademacher(3, dim, 0, 5)
    slq = hessian_density(model, x, y, steps=8, runs=5, seed=3, bn=bn)
    v = np.random.default_rng(1).normal(size=(3, dim))
    hv = hessian_vector_product(model, x, y, v, bn=bn)
    gv = ggn_vector_product(model, x, y, v[0], bn=bn)
    assert_same(before, snapshot(model))
    np.testing.assert_allclose(top.values, exact.eigenvalues[::-1][:2], rtol=1e-8)
    np.testing.assert_allclose(np.abs(top.vectors @ exact.eigenvectors[:, ::-1][:, :2]),
                               np.eye(2), atol=1e-7)
    np.testing.assert_allclose(trace.value, np.mean(np.einsum("ij,ik,kj->j", z, h, z)),
                               rtol=1e-10)
    np.testing.assert_allclose(slq.trace().value, trace.value, rtol=1e-10)
    np.testing.assert_allclose(hv, v @ h, rtol=1e-10, atol=1e-12)
    with nn.frozen_stats(model):
        if bn == "frozen":
            with substituted(model, batch_statistics(model, x)):
                g = dense_ggn(model.eval(), x, y)
        else:
            g = dense_ggn(model.train(), x, y)
    model.train()
    np.testing.assert_allclose(gv, g @ v[0], rtol=1e-10, atol=1e-12)


# -- Lanczos on a known matrix ------------------------------------------------------------------


def known_operator(dim=60, seed=0):
    """A symmetric matrix with two outliers over a bulk in [-1, 1], and its eigenvalues."""
    rng = np.random.default_rng(seed)
    ev = np.concatenate([[50.0, 20.0], np.linspace(-1, 1, dim - 2)])
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q @ np.diag(ev) @ q.T, np.sort(ev)[::-1], q


@pytest.mark.backends("numpy")
def test_lanczos_on_a_known_spectrum_and_its_ghosts_without_reorthogonalisation():
    a, ev, q = known_operator()
    run = lanczos(lambda v: a @ v, 60, 60, seed=4)
    assert isinstance(run, Lanczos) and run.runs == 1
    top = run.top(3)
    np.testing.assert_allclose(top.values, ev[:3], rtol=1e-12)
    np.testing.assert_allclose(np.abs(top.vectors @ q[:, :2]).max(axis=0), [1, 1], atol=1e-10)
    # all steps: the nodes are the eigenvalues, the weights the start vector's squared
    # components in the eigenbasis (Gauss quadrature is exact)
    np.testing.assert_allclose(np.sort(run.nodes[0]), np.sort(ev), atol=1e-12)
    start = _rademacher(4, 60, 0, 1)[:, 0] / np.sqrt(60)
    order = np.argsort(np.diag(q.T @ a @ q))
    np.testing.assert_allclose(run.weights[0], ((q.T @ start) ** 2)[order], atol=1e-12)
    t = run.tridiagonal()
    np.testing.assert_allclose(t, t.T)
    # the basis stays orthonormal; without reorthogonalisation it does not, and the outlier
    # comes back as spurious copies (ghosts)
    basis = run.basis[0]
    np.testing.assert_allclose(basis @ basis.T, np.eye(60), atol=1e-12)
    plain = lanczos(lambda v: a @ v, 60, 60, seed=4, reorthogonalize=False)
    assert np.sum(np.abs(run.nodes[0] - 50) < 1e-6) == 1
    assert np.sum(np.abs(plain.nodes[0] - 50) < 1e-6) >= 2
    # a run stops when the Krylov space is exhausted: 3 distinct eigenvalues, 3 steps
    three = np.diag([3.0, 3.0, 1.0, 1.0, -2.0])
    short = lanczos(lambda v: three @ v, 5, 5)
    assert len(short.alphas[0]) == 3
    np.testing.assert_allclose(short.nodes[0], [-2, 1, 3], atol=1e-14)
    with pytest.raises(ValueError, match=r"Lanczos.top: k=4 is out of range; valid: 1 to 3 "
                                         r"\(run 0 has 3 steps"):
        short.top(4)


@pytest.mark.backends("numpy")
def test_density_integrates_to_one_and_runs_in_lockstep_equal_separate_runs():
    a, ev, _ = known_operator()
    runs = lanczos(lambda v: a @ v, 60, 12, seed=2, runs=3)
    one = lanczos(lambda v: a @ v, 60, 12, start=_rademacher(2, 60, 1, 1))
    np.testing.assert_allclose(runs.alphas[1], one.alphas[0], rtol=1e-12)
    grid, rho = runs.density()
    assert np.trapezoid(rho, grid) == pytest.approx(1.0, abs=1e-6)
    sharp = runs.density(np.linspace(49, 51, 2001), sigma=0.01)[1]
    # the outlier at 50, resolved by every run, carries its weight mean_r w_r(50) there
    weight = np.mean([w[np.argmax(t)] for t, w in zip(runs.nodes, runs.weights)])
    assert np.trapezoid(sharp, np.linspace(49, 51, 2001)) == pytest.approx(weight, rel=1e-6)
    est = runs.trace()
    assert est.samples == 3 and np.isfinite(est.stderr)
    with pytest.raises(ValueError, match="sigma must be a positive number"):
        runs.density(sigma=0)


# -- against inspect.hessian on tiny networks ---------------------------------------------------


@pytest.mark.backends("numpy")
@pytest.mark.parametrize("bn", ["frozen", "eval", "batch"])
def test_each_batch_norm_mode_is_the_hessian_it_names(bn):
    model, x, y = tiny_mlp(mr.current_backend(), depth=2, width=5)
    model.train()
    dim = model.num_parameters()
    full = hessian_vector_product(model, x, y, np.eye(dim), bn=bn)
    np.testing.assert_allclose(full, exact_hessian(model, x, y, bn), rtol=1e-10, atol=1e-12)
    others = [exact_hessian(model, x, y, m) for m in ("frozen", "eval", "batch") if m != bn]
    assert all(np.abs(full - o).max() > 1e-3 for o in others)  # the three modes differ here


@pytest.mark.backends("numpy")
def test_hessian_top_of_a_tiny_resnet_and_of_a_block():
    rng = np.random.default_rng(0)
    model = nn.resnet_cifar(1, width=0.125, in_channels=1, num_classes=3)
    x, y = rng.normal(size=(6, 1, 8, 8)), rng.integers(0, 3, 6)
    h = exact_hessian(model, x, y, "frozen")
    ev, vecs = np.linalg.eigh(h)
    top = hessian_top(model, x, y, k=4, steps=60)
    assert isinstance(top, Eigenpairs)
    np.testing.assert_allclose(top.values, ev[::-1][:4], rtol=1e-8)
    assert np.all(top.residuals < 1e-8 * top.values[0])
    for lam, v in zip(top.values, top.vectors):  # true eigenvectors: small residual
        assert np.linalg.norm(h @ v - lam * v) < 1e-7 * top.values[0]
    head = top.parameter("head.1.weight")
    assert head.shape == (4, 3, 8)
    np.testing.assert_array_equal(head[2].ravel(), top.vectors[2, top.slices()["head.1.weight"]])
    # block 2's parameters only: the top of the exact Hessian's sub-matrix
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.size for p in model.parameters()]
    ends = np.cumsum(sizes)
    keep = np.concatenate([np.arange(e - s, e) for n, s, e in zip(names, sizes, ends)
                           if n.startswith("blocks.1.")])
    sub = np.linalg.eigvalsh(h[np.ix_(keep, keep)])[::-1]
    block = hessian_top(model, x, y, k=2, steps=len(keep), params=2)
    np.testing.assert_allclose(block.values, sub[:2], rtol=1e-8)
    assert block.names == [n for n in names if n.startswith("blocks.1.")]
    chosen = hessian_top(model, x, y, k=2, steps=len(keep), params=block.names[::-1])
    np.testing.assert_allclose(chosen.values, block.values, rtol=1e-12)
    # the run serves the trace (Hutchinson on its start vector) and the density
    np.testing.assert_allclose(top.lanczos.trace().value,
                               hessian_trace(model, x, y, 1).value, rtol=1e-10)


@pytest.mark.backends("numpy")
def test_slq_nodes_reproduce_the_extreme_eigenvalues_once_each():
    model, x, y = tiny_mlp(mr.current_backend(), depth=2, width=8, classes=4, n=10)
    h = exact_hessian(model, x, y, "frozen")
    dim = h.shape[0]
    ev = np.linalg.eigvalsh(h)
    slq = hessian_density(model, x, y, steps=dim, runs=2, seed=5)
    assert slq.runs == 2 and slq.basis is None
    start = _rademacher(5, dim, 0, 2) / np.sqrt(dim)
    for r, (nodes, weights) in enumerate(zip(slq.nodes, slq.weights)):
        assert nodes.max() == pytest.approx(ev[-1], rel=1e-10)
        assert nodes.min() == pytest.approx(ev[0], rel=1e-10)
        tol = 1e-6 * ev[-1]
        assert np.sum(np.abs(nodes - ev[-1]) < tol) == 1  # no spurious copies
        assert np.sum(np.abs(nodes - ev[0]) < tol) == 1
        # the Krylov space is exhausted: the quadrature is exact for qᵀ H² q too
        q = start[:, r]
        assert weights.sum() == pytest.approx(1.0, rel=1e-12)
        assert weights @ nodes ** 2 == pytest.approx(q @ h @ h @ q, rel=1e-9)
    # the same Hessian without reorthogonalisation finds the top eigenvalue again and again
    plain = lanczos(lambda v: h @ v, dim, dim, seed=5, reorthogonalize=False)
    assert np.sum(np.abs(plain.nodes[0] - ev[-1]) < 1e-6 * ev[-1]) >= 2


@pytest.mark.backends("numpy")
@pytest.mark.parametrize("method, samples", [("hutchinson", 10), ("hutch++", 30)])
def test_trace_estimates_are_unbiased(method, samples):
    model, x, y = tiny_mlp(mr.current_backend(), depth=2, width=5)
    exact = np.trace(exact_hessian(model, x, y, "frozen"))
    values = [hessian_trace(model, x, y, samples, seed=s, method=method, chunk=samples).value
              for s in range(40)]
    stderr = np.std(values, ddof=1) / np.sqrt(len(values))
    assert abs(np.mean(values) - exact) < 3 * stderr
    assert stderr > 0
    # one estimate's own standard error is of the size of the spread over seeds
    one = hessian_trace(model, x, y, samples, seed=0, method=method)
    assert 0.3 < one.stderr / np.std(values, ddof=1) < 3
    assert one.samples == samples and one.method == method


@pytest.mark.backends("numpy")
def test_hutchplusplus_is_exact_once_the_sketch_spans_everything():
    model, x, y = tiny_mlp(mr.current_backend())
    h = exact_hessian(model, x, y, "frozen")
    dim = h.shape[0]
    est = hessian_trace(model, x, y, 3 * dim + 1, method="hutch++", chunk=64)
    assert est.value == pytest.approx(np.trace(h), rel=1e-10)


@pytest.mark.backends("numpy")
def test_gauss_newton_matrix():
    model, x, y = tiny_mlp(mr.current_backend(), depth=2, width=5, n=8)
    model.eval()
    g = dense_ggn(model, x, y)
    dim = g.shape[0]
    ev = np.linalg.eigvalsh(g)
    assert ev[0] > -1e-12 * ev[-1]  # positive semi-definite
    full = ggn_vector_product(model, x, y, np.eye(dim), bn="eval")
    np.testing.assert_allclose(full, g, rtol=1e-10, atol=1e-13)
    top = ggn_top(model, x, y, k=3, steps=dim, bn="eval")
    np.testing.assert_allclose(top.values, ev[::-1][:3], rtol=1e-8)
    h = exact_hessian(model, x, y, "eval")
    assert np.abs(g - h).max() > 1e-3  # the network is not linear in all its parameters
    # the logits are affine in the classifier's parameters: there G is the Hessian exactly
    head = ["head.2.weight", "head.2.bias"]
    sel = np.arange(dim - 18, dim)
    gh = ggn_vector_product(model, x, y, np.eye(18), bn="eval", params=head)
    hh = hessian_vector_product(model, x, y, np.eye(18), bn="eval", params=head)
    np.testing.assert_allclose(gh, hh, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(hh, h[np.ix_(sel, sel)], rtol=1e-10, atol=1e-13)


@pytest.mark.backends("numpy")
def test_float32_models_are_accepted():
    model = nn.mlp(1, 4, in_features=3, out_features=3, dtype="float32")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)).astype(np.float32), rng.integers(0, 3, 6)
    exact = np.linalg.eigvalsh(exact_hessian(model, x, y, "frozen"))[::-1]
    top = hessian_top(model, x, y, k=2, steps=20)
    assert top.values.dtype == np.float64
    np.testing.assert_allclose(top.values, exact[:2], rtol=1e-4)


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.backends("numpy")
def test_bad_arguments_are_refused_before_any_work():
    model, x, y = tiny_mlp(mr.current_backend())
    dim = model.num_parameters()
    cases = [
        (lambda: hessian_top(model, x, y, k=0), ValueError,
         rf"hessian_top: k=0 is out of range; valid: 1 to {dim} \(the number"),
        (lambda: hessian_top(model, x, y, k=dim + 1), ValueError, f"k={dim + 1} is out of"),
        (lambda: hessian_top(model, x, y, k=5, steps=3), ValueError,
         rf"steps=3 is out of range; valid: 5 to {dim} \(at least k"),
        (lambda: hessian_top(model, x, y, k=1.0), TypeError, "k must be an int, got 1.0"),
        (lambda: ggn_top(model, x, y, bn="train"), ValueError,
         "ggn_top: unknown bn 'train'; valid: 'frozen', 'eval', 'batch'"),
        (lambda: hessian_top(model, x, y, params=3), IndexError,
         "block params=3 is out of range; this network has 1 blocks"),
        (lambda: hessian_top(model, x, y, params=["stem.weight", "nope"]), ValueError,
         r"params has unknown names \['nope'\]; valid names: stem.weight"),
        (lambda: hessian_top(model, x, y, params=[]), ValueError, "params has an empty list"),
        (lambda: hessian_top(model, x, y, params="stem.weight"), TypeError,
         "params must be None .* or a list of parameter names"),
        (lambda: hessian_top(model, x, y[:4]), ValueError,
         r"y must hold one integer label per sample, shape \(6,\) for x of shape \(6, 3\); "
         r"got shape \(4,\)"),
        (lambda: hessian_top(model, x, np.zeros(6)), TypeError, "y must be integer class"),
        (lambda: hessian_top(None, x, y), TypeError, "hessian_top: model must be a miniresnet"),
        (lambda: hessian_trace(model, x, y, 0), ValueError,
         "hessian_trace: samples=0 is out of range; valid: at least 1"),
        (lambda: hessian_trace(model, x, y, 2, method="hutch++"), ValueError,
         r"samples=2 is out of range; valid: at least 3 for Hutch\+\+"),
        (lambda: hessian_trace(model, x, y, 4, method="exact"), ValueError,
         "unknown method 'exact'; valid: 'hutchinson', 'hutch\\+\\+'"),
        (lambda: hessian_trace(model, x, y, 4, chunk=0), ValueError, "chunk=0 is out of range"),
        (lambda: hessian_density(model, x, y, runs=0), ValueError, "runs=0 is out of range"),
        (lambda: hessian_density(model, x, y, steps=0), ValueError, "steps=0 is out of range"),
        (lambda: hessian_vector_product(model, x, y, np.ones(dim + 1)), ValueError,
         rf"v must be finite, of shape \({dim},\) or \(k, {dim}\)"),
        (lambda: lanczos(lambda v: v, 4, 5), ValueError, "lanczos: steps=5 is out of range"),
        (lambda: lanczos(lambda v: v[:2], 4, 2), ValueError, "matvec returned shape"),
        (lambda: lanczos(lambda v: v, 4, 2, start=np.zeros(4)), ValueError,
         "start must be 1 finite nonzero"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
