"""inspect.split_block, path_gradients, path_gradients_sampled, path_summary: the gradient at
the stem taken apart by path length, checked against the block VJP, a 2^L oracle and closed
forms."""

import itertools
import math

import numpy as np
import pytest
from model_state import unchanged

import miniresnet as mr
from miniresnet import nn
from miniresnet.inspect.paths import (
    _masked_path_gradients,
    path_gradients,
    path_gradients_sampled,
    path_summary,
    shortest_range,
    split_block,
)

SHORTCUTS = ("projection", "zero_pad")


def _data(backend, shape, seed=0):
    return backend.asarray(np.random.default_rng(seed).normal(size=shape), "float64")


def _resnet(order="post", shortcut="projection", n=1, **kw):
    return nn.resnet_cifar(n, in_channels=1, width=0.25, order=order, shortcut=shortcut, **kw)


def _cotangent(model, x, seed=1):
    with nn.frozen_stats(model):
        shape = model(x).shape
    return np.random.default_rng(seed).normal(size=shape)


def _stream(model, x):
    with nn.frozen_stats(model):
        return model.block_outputs(x)


def _exact_h0_gradient(model, x, c):
    """∂s/∂h_0 of s = Σ out·c, by one VJP through blocks and head (test-local)."""
    h0 = _stream(model, x)[0]
    with nn.frozen_stats(model):
        _, vjp_fn = mr.vjp(lambda h: model.head(model.blocks(h)), h0)
        return mr.to_numpy(vjp_fn(mr.to_backend(c, h0.backend.name))[0])


def _top_gradient(model, x, c):
    h_last = _stream(model, x)[-1]
    with nn.frozen_stats(model):
        _, vjp_fn = mr.vjp(model.head, h_last)
        return mr.to_numpy(vjp_fn(mr.to_backend(c, h_last.backend.name))[0])


def _rel_err(a, b, scale):
    return np.linalg.norm(a - b) / scale


# -- split_block ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shortcut", SHORTCUTS)
@pytest.mark.parametrize("order", nn.ORDERS)
def test_skip_and_branch_vjps_sum_to_the_block_vjp(backend, order, shortcut, mode):
    conv = _resnet(order, shortcut, lam=0.7, beta=0.5, skipinit=0.8)
    dense = nn.mlp(2, 3, in_features=2, residual=True, order=order, layers=2, lam=1.3,
                   beta=0.6, norm=order != "relu_preact")
    for model, x in ((conv, _data(backend, (3, 1, 4, 4))), (dense, _data(backend, (4, 2)))):
        for i in range(1, len(model.blocks) + 1):
            with unchanged(model, x, mode):
                skip_vjp, branch_vjp = split_block(model, x, i)
                h = _stream(model, x)[i - 1]
                with nn.frozen_stats(model):
                    out, block_vjp = mr.vjp(model.blocks[i - 1], h)
                cts = np.random.default_rng(i).normal(size=(2,) + out.shape)
                skip, branch = skip_vjp(cts), branch_vjp(mr.to_backend(cts, backend.name))
                whole = mr.to_numpy(block_vjp(mr.to_backend(cts, backend.name))[0])
            assert isinstance(skip, np.ndarray) and skip.shape == (2,) + h.shape
            assert np.linalg.norm(skip) > 0 and np.linalg.norm(branch) > 0
            assert _rel_err(skip + branch, whole, np.linalg.norm(whole)) <= 1e-12


def test_split_block_refuses_what_has_no_split(backend):
    x = _data(backend, (3, 1, 4, 4))
    with pytest.raises(ValueError, match="block 2 is plain"):
        split_block(_resnet(residual=False), x, 2)
    with pytest.raises(TypeError, match="block 1 is a HighwayBlock"):
        split_block(_resnet(block="highway"), x, 1)
    with pytest.raises(IndexError, match="numbered 1 to 3"):
        split_block(_resnet(), x, 0)
    with pytest.raises(TypeError, match="must be a Network"):
        split_block(nn.Linear(2, 2), x, 1)
    skip_vjp, _ = split_block(_resnet(), x, 1)
    with pytest.raises(TypeError, match="dtype"):
        skip_vjp(np.zeros((2, 4, 4, 4), dtype=np.float32))


# -- path_gradients ------------------------------------------------------------------------------


def _oracle(model, x, c):
    """All 2^L paths one by one: for each subset of blocks, chain the branch VJPs of its
    blocks and the skip VJPs of the others; sum by the subset's size."""
    n = len(model.blocks)
    splits = [split_block(model, x, i) for i in range(1, n + 1)]
    top = _top_gradient(model, x, c)
    entries = [0.0] * (n + 1)
    for through in itertools.product((False, True), repeat=n):
        ct = top[None]
        for i in range(n, 0, -1):
            ct = splits[i - 1][through[i - 1]](ct)
        entries[sum(through)] = entries[sum(through)] + ct[0]
    return np.stack(entries)


def _check_sum(model, x, g, c):
    exact = _exact_h0_gradient(model, x, c)
    scale = sum(np.linalg.norm(gk) for gk in g)
    assert scale > 0 and _rel_err(g.sum(axis=0), exact, scale) <= 1e-12


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shortcut", SHORTCUTS)
@pytest.mark.parametrize("order", nn.ORDERS)
def test_path_gradients_agree_with_all_paths_enumerated(backend, order, shortcut, mode):
    model = _resnet(order, shortcut, lam=0.8, beta=0.7)
    x = _data(backend, (3, 1, 4, 4))
    c = _cotangent(model, x)
    with unchanged(model, x, mode):
        g = path_gradients(model, x, cotangent=c)
        oracle = _oracle(model, x, c)
    assert isinstance(g, np.ndarray) and g.shape == (4,) + _stream(model, x)[0].shape
    _check_sum(model, x, g, c)
    scale = sum(np.linalg.norm(gk) for gk in g)
    assert all(np.linalg.norm(gk) > 0 for gk in g)
    assert _rel_err(g, oracle, scale) <= 1e-12


@pytest.mark.backends("numpy")
def test_path_gradients_agree_with_the_oracle_at_six_blocks(backend):
    model = _resnet("full_preact", "zero_pad", n=2, skipinit=0.6)
    x = _data(backend, (3, 1, 4, 4))
    c = _cotangent(model, x)
    g = path_gradients(model, x, cotangent=c)
    assert g.shape[0] == 7
    assert _rel_err(g, _oracle(model, x, c), sum(map(np.linalg.norm, g))) <= 1e-12


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("variant", [
    dict(), dict(order="bn_after_add", lam=0.5), dict(order="relu_preact", beta=0.3),
    dict(order="full_preact", shortcut="zero_pad"), dict(order="relu_before_add", skipinit=0.2),
    dict(norm=False, lam=0.5), dict(residual=False),
    dict(residual=False, order="full_preact")])
def test_path_gradients_sum_to_the_gradient_at_h0(backend, variant, mode):
    model = _resnet(n=2, **variant)
    x = _data(backend, (3, 1, 4, 4))
    y = backend.asarray(np.array([0, 3, 7]), "int64")
    with unchanged(model, x, mode):
        g = path_gradients(model, x, y)
    with nn.frozen_stats(model):  # s = mean cross-entropy: ds/dlogits = (softmax - onehot) / 3
        logits = mr.to_numpy(model(x))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    ce = (p / p.sum(axis=1, keepdims=True) - np.eye(10)[[0, 3, 7]]) / 3
    _check_sum(model, x, g, ce)


def test_dense_path_gradients_sum_and_plain_net_has_only_the_longest_path(backend):
    x = _data(backend, (5, 2))
    for residual in (True, False):
        model = nn.mlp(4, 3, in_features=2, out_features=2, residual=residual)
        c = _cotangent(model, x)
        g = path_gradients(model, x, cotangent=c)
        _check_sum(model, x, g, c)
        if not residual:
            assert np.all(g[:-1] == 0) and np.linalg.norm(g[-1]) > 0
    plain = _resnet(residual=False)
    g = path_gradients(plain, _data(backend, (3, 1, 4, 4)))
    assert np.all(g[:-1] == 0) and np.linalg.norm(g[-1]) > 0


@pytest.mark.parametrize("zeroed", [dict(skipinit=0.0), dict(zero_init_residual=True)])
def test_zeroed_branches_leave_only_the_skip_path(backend, zeroed):
    model = _resnet(n=2, **zeroed)
    x = _data(backend, (3, 1, 4, 4))
    c = _cotangent(model, x)
    g = path_gradients(model, x, cotangent=c)
    assert np.all(g[1:] == 0)
    exact = _exact_h0_gradient(model, x, c)
    assert np.linalg.norm(exact) > 0 and _rel_err(g[0], exact, np.linalg.norm(exact)) <= 1e-12


def _linear_net(depth, width, c, lam):
    """stem, ``depth`` blocks h ↦ λh + c·h (a linear branch: one identity-activated layer
    with weight c·I), head: every path of k branches contributes C(L,k)·c^k·λ^(L-k)."""
    blocks = []
    for seed in range(depth):
        block = nn.DenseBlock(width, width, order="full_preact", norm=False, layers=1, lam=lam,
                              rng=seed)
        block.acts[0] = nn.Identity()
        layer = block.layers[0]
        layer.weight.data = mr.to_backend(c * np.eye(width), layer.weight.backend.name)
        blocks.append(block)
    return nn.Network(nn.Linear(2, width, rng=7), nn.Sequential(*blocks),
                      nn.Linear(width, 3, rng=8), config={})


def test_a_linear_residual_net_gives_the_binomial_expansion(backend):
    depth, c, lam = 5, 0.3, 0.7
    model = _linear_net(depth, 4, c, lam)
    x = _data(backend, (3, 2))
    cot = _cotangent(model, x)
    g = path_gradients(model, x, cotangent=cot)
    top = _top_gradient(model, x, cot)
    for k in range(depth + 1):
        expected = math.comb(depth, k) * c ** k * lam ** (depth - k) * top
        assert _rel_err(g[k], expected, np.linalg.norm(expected)) <= 1e-13


def test_path_gradients_refuse_highway_blocks(backend):
    with pytest.raises(TypeError, match="block 1 is a HighwayBlock"):
        path_gradients(_resnet(block="highway"), _data(backend, (3, 1, 4, 4)))


# -- path_gradients_sampled ----------------------------------------------------------------------


def test_sampled_paths_summed_over_every_subset_give_the_exact_entries(backend):
    for model, x in ((_resnet(order="bn_after_add", shortcut="zero_pad", lam=0.9),
                      _data(backend, (3, 1, 4, 4))),
                     (nn.mlp(3, 3, in_features=2, residual=False), _data(backend, (4, 2)))):
        c = _cotangent(model, x)
        g = path_gradients(model, x, cotangent=c)
        n = len(model.blocks)
        for k in range(n + 1):
            subsets = np.array([[i in s for i in range(n)]
                                for s in itertools.combinations(range(n), k)])
            per_path = _masked_path_gradients(model, x, subsets, cotangent=c, chunk=2)
            scale = sum(map(np.linalg.norm, g))
            assert _rel_err(per_path.sum(axis=0), g[k], scale) <= 1e-12


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_each_sample_is_the_gradient_of_one_random_path(backend, mode):
    model = _resnet(lam=0.8)
    x = _data(backend, (3, 1, 4, 4))
    c = _cotangent(model, x)
    subsets = np.array([[i == j for i in range(3)] for j in range(3)])  # k = 1: three paths
    with unchanged(model, x, mode):
        sampled = path_gradients_sampled(model, x, 1, 12, seed=3, cotangent=c)
    paths = _masked_path_gradients(model, x, subsets, cotangent=c)  # in this mode
    assert sampled.shape == (12,) + paths.shape[1:]
    hits = [np.argmin([np.linalg.norm(s - p) for p in paths]) for s in sampled]
    for s, j in zip(sampled, hits):
        assert np.linalg.norm(s - paths[j]) <= 1e-12 * np.linalg.norm(paths[j])
    assert len(set(hits)) > 1  # 12 draws of 3 equally likely paths
    again = path_gradients_sampled(model, x, 1, 12, seed=3, cotangent=c)
    np.testing.assert_array_equal(sampled, again)


def test_sampled_arguments_are_checked(backend):
    model, x = _resnet(), _data(backend, (3, 1, 4, 4))
    with pytest.raises(ValueError, match=r"k=4 is out of range; valid: 0\.\.3"):
        path_gradients_sampled(model, x, 4, 10)
    with pytest.raises(ValueError, match="samples=0"):
        path_gradients_sampled(model, x, 1, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        path_gradients_sampled(model, x, 1.0, 10)


# -- path_summary and the 90 % ranges --------------------------------------------------------------


def test_binomial_path_counts_of_a_54_block_resnet():
    """Veit et al.: 54 blocks, paths between 5 and 17 blocks long are 0.45 % of all paths
    (exactly 0.4537 %), and lengths 19 to 35 hold 98.0 % (papers.md, section 2)."""
    n = 54
    counts = np.array([math.comb(n, k) for k in range(n + 1)], dtype=np.float64)
    frac = counts / 2.0 ** n
    assert round(100 * frac[5:18].sum(), 4) == 0.4537
    assert round(100 * frac[19:36].sum(), 1) == 98.0
    lo, hi = shortest_range(counts, 0.9)
    assert frac[lo:hi + 1].sum() >= 0.9 and lo + hi == n  # symmetric about n/2
    shorter = [frac[a:a + hi - lo].sum() for a in range(n + 2 - (hi - lo))]
    assert max(shorter) < 0.9  # no range one shorter holds 90 %


@pytest.mark.parametrize("seed", range(5))
def test_shortest_range_is_shortest(seed):
    w = np.random.default_rng(seed).exponential(size=12) ** 3
    lo, hi = shortest_range(w, 0.9)
    assert w[lo:hi + 1].sum() >= 0.9 * w.sum()
    for a, b in itertools.combinations_with_replacement(range(12), 2):
        if w[a:b + 1].sum() >= 0.9 * w.sum():
            assert b - a >= hi - lo
    assert shortest_range([0, 0, 5, 0], 0.9) == (2, 2)
    with pytest.raises(ValueError, match="non-negative"):
        shortest_range([1.0, -1.0])


def test_path_summary(backend):
    model = _resnet(n=2, lam=0.9)
    x = _data(backend, (3, 1, 4, 4))
    g = path_gradients(model, x)
    summary = path_summary(g)
    n = len(model.blocks)
    flat = g.reshape(n + 1, -1)
    assert abs(summary["share"].sum() - 1) <= 1e-12
    np.testing.assert_allclose(summary["norm"], np.linalg.norm(flat, axis=1), rtol=1e-14)
    np.testing.assert_array_equal(summary["count"], [math.comb(n, k) for k in range(n + 1)])
    np.testing.assert_array_equal(summary["length"], np.arange(n + 1))
    lo, hi = summary["share_range"]
    share = np.abs(summary["share"])
    assert share[lo:hi + 1].sum() >= 0.9 * share.sum()
    sampled = {k: path_gradients_sampled(model, x, k, 4, seed=k) for k in (1, 2, 3)}
    summary = path_summary(g, sampled)
    for k in (1, 2, 3):
        norms = np.linalg.norm(sampled[k].reshape(4, -1), axis=1)
        assert summary["veit"][k] == pytest.approx(math.comb(n, k) * norms.mean(), rel=1e-14)
        assert summary["samples"][k] == 4
    assert np.isnan(summary["veit"][0]) and summary["samples"][0] == 0
    lo, hi = summary["veit_range"]
    assert 1 <= lo <= hi <= 3
    norms_only = path_summary(g, {k: np.linalg.norm(v.reshape(4, -1), axis=1)
                                  for k, v in sampled.items()})
    np.testing.assert_array_equal(norms_only["veit"], summary["veit"])
    with pytest.raises(ValueError, match="path lengths 0..6"):
        path_summary(g, {7: sampled[1]})
