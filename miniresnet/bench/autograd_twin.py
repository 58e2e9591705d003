"""The HIPS autograd twin: the post-order CIFAR ResNet and its cases in ``autograd.numpy``.

autograd has no layers, so the network is written out as functions of a parameter dict with
our parameter names. The ``autograd`` module is passed in (imported by
:func:`~miniresnet.bench.runner.import_libs`), so this module imports without it installed.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from miniresnet import nn
from miniresnet.bench.measure import Fn


def conv2d(anp: Any, x: Any, w: Any, stride: int, padding: int) -> Any:
    """Convolution as im2col by strided slices and one matmul (what autograd differentiates)."""
    n, c, h, wd = x.shape
    f, _, k, _ = w.shape
    oh, ow = (h + 2 * padding - k) // stride + 1, (wd + 2 * padding - k) // stride + 1
    if padding:
        x = anp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), "constant")
    eh, ew = stride * (oh - 1) + 1, stride * (ow - 1) + 1
    cols = anp.stack([x[:, :, i:i + eh:stride, j:j + ew:stride]
                      for i in range(k) for j in range(k)], axis=2)  # (N, C, k*k, oh, ow)
    cols = anp.reshape(cols, (n, c * k * k, oh * ow))
    out = anp.matmul(anp.reshape(w, (f, c * k * k)), cols)  # (N, F, oh*ow)
    return anp.reshape(out, (n, f, oh, ow))


def batch_norm(anp: Any, x: Any, w: Any, b: Any, eps: float, stats: tuple | None = None) -> Any:
    """Batch norm over (N, H, W): batch statistics, or eval mode given ``stats = (mean, var)``."""
    if stats is None:
        mean = anp.mean(x, axis=(0, 2, 3), keepdims=True)
        centred = x - mean
        var = anp.mean(centred * centred, axis=(0, 2, 3), keepdims=True)
    else:
        centred = x - anp.reshape(stats[0], (1, -1, 1, 1))
        var = anp.reshape(stats[1], (1, -1, 1, 1))
    out = centred / anp.sqrt(var + eps)
    return out * anp.reshape(w, (1, -1, 1, 1)) + anp.reshape(b, (1, -1, 1, 1))


def residual_block(anp: Any, b: Any, p: dict, q: str, h: Any, bufs: dict | None = None) -> Any:
    """One post-order block ``b`` (parameters ``p``, names prefixed ``q``) applied to ``h``;
    ``bufs`` given: eval-mode batch norm with those running statistics."""
    def norm(x: Any, name: str, m: Any) -> Any:
        stats = None if bufs is None else (bufs[name + "running_mean"],
                                           bufs[name + "running_var"])
        return batch_norm(anp, x, p[name + "weight"], p[name + "bias"], m.eps, stats)

    l1, l2 = b.layers
    f = conv2d(anp, h, p[q + "layers.0.weight"], l1.stride, l1.padding)
    f = anp.maximum(norm(f, q + "norms.0.", b.norms[0]), 0.0)
    f = norm(conv2d(anp, f, p[q + "layers.1.weight"], l2.stride, l2.padding), q + "norms.1.",
             b.norms[1])
    if isinstance(b.shortcut, nn.Sequential):
        sc = b.shortcut[0]
        s = norm(conv2d(anp, h, p[q + "shortcut.0.weight"], sc.stride, sc.padding),
                 q + "shortcut.1.", b.shortcut[1])
    else:
        s = h
    return anp.maximum(f + s, 0.0)


def network_loss(anp: Any, model: Any, p: dict, x: np.ndarray, onehot: np.ndarray) -> Any:
    """Mean softmax cross-entropy of the post-order ``model`` (BN in training mode)."""
    stem = model.stem
    h = conv2d(anp, x, p["stem.0.weight"], stem[0].stride, stem[0].padding)
    h = anp.maximum(batch_norm(anp, h, p["stem.1.weight"], p["stem.1.bias"], stem[1].eps), 0.0)
    for i, b in enumerate(model.blocks):
        h = residual_block(anp, b, p, f"blocks.{i}.", h)
    logits = anp.dot(anp.mean(h, axis=(2, 3)), anp.transpose(p["head.1.weight"]))
    logits = logits + p["head.1.bias"]
    z = logits - anp.max(logits, axis=1, keepdims=True)
    logp = z - anp.log(anp.sum(anp.exp(z), axis=1, keepdims=True))
    return -anp.mean(anp.sum(onehot * logp, axis=1))


# -- the cases (see miniresnet.bench.ours) --------------------------------------------------------
def train_step(autograd: Any, model: Any, weights: dict[str, np.ndarray], x: np.ndarray,
               y: np.ndarray) -> Fn:
    """Loss and gradients of :func:`network_loss` at ``weights`` by ``value_and_grad``; the
    call returns the loss and the gradients in ``model.named_parameters()`` order."""
    anp = importlib.import_module("autograd.numpy")
    names = [k for k, _ in model.named_parameters()]
    plist = [weights[k] for k in names]
    onehot = np.eye(10, dtype=x.dtype)[y]

    def loss_fn(ps: list) -> Any:
        return network_loss(anp, model, dict(zip(names, ps)), x, onehot)

    value_and_grad = autograd.value_and_grad(loss_fn)

    def step() -> list:
        loss, grads = value_and_grad(plist)
        return [loss] + list(grads)

    return step


def block_jacobian(autograd: Any, block: Any, weights: dict[str, np.ndarray],
                   buffers: dict[str, np.ndarray], x: np.ndarray) -> Fn:
    """The Jacobian of the eval-mode ``block`` (``weights``, running statistics ``buffers``)
    with respect to its input, at ``x``, by ``autograd.jacobian``."""
    anp = importlib.import_module("autograd.numpy")
    jac = autograd.jacobian(lambda v: residual_block(anp, block, weights, "", v, buffers))
    return lambda: [jac(x)]


def to_host(result: list) -> list[np.ndarray]:
    """The NumPy arrays of one call's result."""
    return [np.asarray(r) for r in result]
