"""Whole networks: a full ResNet against HIPS autograd, and a 1,000-layer residual net."""

import sys
import tracemalloc

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad as ag_grad
from oracle import conv2d_oracle

import miniresnet as mr
import miniresnet.functional as F
from miniresnet import nn


def _bn(x, w, b, eps=1e-5):
    axes = (0, 2, 3) if x.ndim == 4 else (0,)
    shape = (1, -1, 1, 1) if x.ndim == 4 else (1, -1)
    mean = anp.mean(x, axis=axes, keepdims=True)
    var = anp.mean((x - mean) ** 2, axis=axes, keepdims=True)
    return (x - mean) / anp.sqrt(var + eps) * anp.reshape(w, shape) + anp.reshape(b, shape)


def _conv(p, prefix, module, x):
    return conv2d_oracle(x, p[prefix + "weight"], None, module.stride, module.padding)


def autograd_resnet(model, p, x, y):
    """The post-activation resnet_cifar written independently with autograd.numpy (BN in
    training mode with batch statistics, projection shortcuts)."""
    relu = lambda v: anp.maximum(v, 0.0)  # noqa: E731
    h = relu(_bn(_conv(p, "stem.0.", model.stem[0], x), p["stem.1.weight"], p["stem.1.bias"]))
    for i, block in enumerate(model.blocks):
        q = f"blocks.{i}."
        l1, l2 = block.layers
        f = relu(_bn(_conv(p, q + "layers.0.", l1, h), p[q + "norms.0.weight"],
                     p[q + "norms.0.bias"]))
        f = _bn(_conv(p, q + "layers.1.", l2, f), p[q + "norms.1.weight"], p[q + "norms.1.bias"])
        if isinstance(block.shortcut, nn.Identity):
            s = h
        else:
            s = _bn(_conv(p, q + "shortcut.0.", block.shortcut[0], h),
                    p[q + "shortcut.1.weight"], p[q + "shortcut.1.bias"])
        h = relu(f + s)
    pooled = anp.mean(h, axis=(2, 3))
    logits = anp.dot(pooled, p["head.1.weight"].T) + p["head.1.bias"]
    logz = logits - anp.max(logits, axis=1, keepdims=True)
    logp = logz - anp.log(anp.sum(anp.exp(logz), axis=1, keepdims=True))
    return -anp.mean(logp[np.arange(len(y)), y])


def test_full_resnet_gradients_match_autograd(backend):
    model = nn.resnet_cifar(1, width=0.25, in_channels=2, num_classes=5, seed=4)
    assert any(not isinstance(b.shortcut, nn.Identity) for b in model.blocks)
    names = [n for n, _ in model.named_parameters()]
    rng = np.random.default_rng(0)
    x_host, y_host = rng.normal(size=(4, 2, 8, 8)), np.array([0, 3, 1, 4])
    x, y = backend.asarray(x_host, "float64"), backend.asarray(y_host, "int64")

    def ours(x, *params):
        return F.cross_entropy(nn.functional_call(model, dict(zip(names, params)), x), y)

    params = [p.raw for p in model.parameters()]
    loss, grads = mr.value_and_grad(ours, argnums=tuple(range(len(params) + 1)))(x, *params)
    host_params = {n: mr.to_numpy(p) for n, p in zip(names, params)}

    def oracle(x, *ps):
        return autograd_resnet(model, dict(zip(names, ps)), x, y_host)

    ref_loss = oracle(x_host, *host_params.values())
    ref = ag_grad(oracle, argnum=list(range(len(params) + 1)))(x_host, *host_params.values())
    assert abs(float(mr.to_numpy(loss)) - ref_loss) <= 1e-12 * abs(ref_loss)
    worst = 0.0
    for ours_g, ref_g in zip(grads, ref):
        ours_g = mr.to_numpy(ours_g)
        scale = np.abs(ref_g).max()
        if scale > 0:
            worst = max(worst, np.abs(ours_g - ref_g).max() / scale)
        else:
            assert not ours_g.any()
    assert worst <= 1e-10, worst


def test_thousand_layer_residual_net(backend):
    """n=166: 6n+2 = 998 weighted layers, forward and backward with the default recursion
    limit; the graph is freed after backward (peak memory reported on failure)."""
    assert sys.getrecursionlimit() <= 1000
    model = nn.resnet_cifar(166, width=0.25, in_channels=1, seed=0)
    weighted = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for _, m in model.named_modules())
    assert weighted >= 1000  # 998 plus the two projection shortcuts
    x = backend.asarray(np.random.default_rng(0).normal(size=(2, 1, 8, 8)), "float64")
    y = backend.asarray(np.array([1, 7]), "int64")
    measure = backend.name == "numpy"  # tracemalloc slows array_api_strict's many small objects
    if measure:
        tracemalloc.start()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    peak = tracemalloc.get_traced_memory()[1] if measure else 0
    tracemalloc.stop()
    assert np.isfinite(float(loss))
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    first = mr.to_numpy(model.stem[0].weight.grad)
    assert np.isfinite(first).all() and np.abs(first).max() > 0
    assert peak < 2e9, f"peak traced memory {peak / 1e6:.0f} MB"
    if measure:
        print(f"\n1,000-layer net (n=166, width 4-16): peak traced memory {peak / 1e6:.1f} MB")


@pytest.mark.parametrize("n", [1, 3])
def test_resnet_block_jacobian_is_identity_plus_branch(backend, n):
    model = nn.resnet_cifar(n, width=0.25, in_channels=1, seed=1, order="full_preact").eval()
    block = model.blocks[0]
    x = backend.asarray(np.random.default_rng(1).normal(size=(1, 4, 4, 4)), "float64")
    j_block = mr.to_numpy(mr.jacobian(block)(x)).reshape(64, 64)
    j_branch = mr.to_numpy(mr.jacobian(block.branch)(x)).reshape(64, 64)
    np.testing.assert_allclose(j_block, np.eye(64) + j_branch, rtol=0, atol=1e-14)
