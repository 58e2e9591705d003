"""Neural-network functions with the signatures of ``torch.nn.functional``.

All are compositions of primitives, so every derivative of every order is exact.
"""

from __future__ import annotations

from miniresnet import normalization, ops
from miniresnet.backends import int_pair
from miniresnet.ops import relu, sigmoid, tanh
from miniresnet.tracing import Tensor, as_tensor, dtype_name

__all__ = [
    "conv2d", "batch_norm", "linear", "relu", "tanh", "sigmoid", "avg_pool2d",
    "adaptive_avg_pool2d", "cross_entropy", "mse_loss",
]


def _require_float(name: str, **tensors: Tensor) -> None:
    for what, t in tensors.items():
        if t is not None and not t.backend.xp.isdtype(t.dtype, "real floating"):
            raise TypeError(
                f"{name}: {what} must be floating point (float32 or float64), got "
                f"{dtype_name(t.dtype)} with shape {t.shape}; convert with .astype('float64')"
            )


def conv2d(x, weight, bias=None, stride=1, padding=0) -> Tensor:
    """2-D cross-correlation, as ``torch.nn.functional.conv2d`` (no dilation or groups).

    Parameters
    ----------
    x : (N, C, H, W) tensor
    weight : (F, C, kh, kw) tensor
    bias : (F,) tensor, optional
    stride : int or pair of ints, each >= 1
    padding : int or pair of ints, each >= 0

    Raises
    ------
    TypeError, ValueError
        Naming the argument and its value, before any work, for a stride or padding that is
        not such an int or pair (``0``, ``-1``, ``1.5``, ``"2"``, ``True``), and for inputs of
        the wrong dtype or shape.
    """
    stride, padding = int_pair("conv2d", stride, "stride"), int_pair("conv2d", padding, "padding")
    x, weight = as_tensor(x), as_tensor(weight)
    bias = None if bias is None else as_tensor(bias)
    _require_float("conv2d", input=x, weight=weight, bias=bias)
    if x.ndim != 4 or weight.ndim != 4:
        raise ValueError(
            f"conv2d: expected input (N, C, H, W) and weight (F, C, kh, kw), got shapes "
            f"{x.shape} and {weight.shape}"
        )
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"conv2d: input has {x.shape[1]} channels (shape {x.shape}) but weight of shape "
            f"{weight.shape} expects {weight.shape[1]}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"conv2d: bias shape {bias.shape} != ({weight.shape[0]},)")
    out = ops.conv(x, weight, stride, padding)
    if bias is not None:
        out = out + ops.reshape(bias, (1, -1, 1, 1))
    return out


def _update_running(stat, batch, momentum: float) -> None:
    """``stat = (1 - momentum) stat + momentum batch`` in place, on raw arrays (no tracing);
    ``stat`` is a Tensor or a backend array."""
    old = stat.raw if isinstance(stat, Tensor) else stat
    new = old * (1 - momentum) + batch * momentum
    if isinstance(stat, Tensor):
        if stat.requires_grad:
            raise ValueError("batch_norm: running statistics must not require grad")
        stat.data = new
    else:
        stat[...] = new


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Batch normalisation over (N, C) or (N, C, H, W) input, as in PyTorch.

    In training mode the batch statistics are used (biased variance) and the running
    statistics, if given, are updated in place with ``momentum`` (the running variance with the
    unbiased estimate). In evaluation mode the running statistics are used.
    """
    x = as_tensor(x)
    _require_float("batch_norm", input=x)
    if x.ndim not in (2, 4):
        raise ValueError(f"batch_norm: expected (N, C) or (N, C, H, W) input, got shape {x.shape}")
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    params = {"weight": weight, "bias": bias, "running_mean": running_mean,
              "running_var": running_var}
    for name, p in params.items():
        if p is not None and tuple(p.shape) != (x.shape[1],):
            raise ValueError(
                f"batch_norm: {name} has shape {tuple(p.shape)}, expected ({x.shape[1]},) for "
                f"input of shape {x.shape}"
            )
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm: evaluation mode needs running_mean and running_var")
        scale = 1.0 / ops.sqrt(as_tensor(running_var) + eps)
        if weight is not None:
            scale = scale * weight
        # centred first, whether or not a derivative is taken (so f(x) rounds the same under
        # grad): the derivatives in the statistics and the weight sum g * (x - mean), which a
        # folded x * scale + shift would get as sum(g x) - mean sum(g), cancelling near the mean
        out = (x - ops.reshape(running_mean, shape)) * ops.reshape(scale, shape)
        return out + ops.reshape(bias, shape) if bias is not None else out
    count = x.size // x.shape[1]
    if count <= 1:
        raise ValueError(
            f"batch_norm: expected more than 1 value per channel when training, got input "
            f"of shape {x.shape}"
        )
    if weight is not None and bias is not None:  # one primitive, closed-form rules
        out, mean, var = normalization.standardize_affine_with_stats(x, weight, bias, axes, eps)
    else:
        out, mean, var = normalization.standardize_with_stats(x, axes, eps)
        if weight is not None:
            out = out * ops.reshape(weight, shape)
        if bias is not None:
            out = out + ops.reshape(bias, shape)
    if running_mean is not None and running_var is not None:
        xp = x.backend.xp
        _update_running(running_mean, xp.reshape(mean, (-1,)), momentum)
        _update_running(running_var, xp.reshape(var, (-1,)) * (count / (count - 1)), momentum)
    return out


def linear(x, weight, bias=None) -> Tensor:
    """``x @ weight.T + bias`` for ``x`` of shape (..., in) and ``weight`` (out, in)."""
    x, weight = as_tensor(x), as_tensor(weight)
    _require_float("linear", input=x, weight=weight)
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: input of shape {x.shape} does not match weight of shape {weight.shape} "
            "(expected input (..., in) and weight (out, in))"
        )
    out = ops.tensordot(x, weight, axes=((x.ndim - 1,), (1,)))
    return out if bias is None else out + bias


def avg_pool2d(x, kernel_size, stride=None, padding=0) -> Tensor:
    """Average pooling over (N, C, H, W); zero padding is counted in the average."""
    x = as_tensor(x)
    _require_float("avg_pool2d", input=x)
    kh, kw = int_pair("avg_pool2d", kernel_size, "kernel_size")
    stride = (kh, kw) if stride is None else stride
    return ops.mean(ops.im2col(x, kh, kw, stride, padding), axis=(-4, -3))


def adaptive_avg_pool2d(x, output_size) -> Tensor:
    """Average pooling to ``output_size`` (H and W must be divisible by it)."""
    x = as_tensor(x)
    oh, ow = int_pair("adaptive_avg_pool2d", output_size, "output_size")
    n, c, h, w = x.shape
    if h % oh or w % ow:
        raise ValueError(
            f"adaptive_avg_pool2d: input size {(h, w)} is not divisible by output size {(oh, ow)}"
        )
    return ops.mean(ops.reshape(x, (n, c, oh, h // oh, ow, w // ow)), axis=(3, 5))


def cross_entropy(logits, target, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy of ``logits`` (N, C) against integer class ``target`` (N,).

    ``reduction`` is ``"mean"`` (default), ``"sum"`` or ``"none"``.
    """
    logits, target = as_tensor(logits), as_tensor(target).detach()
    _require_float("cross_entropy", logits=logits)
    xp = target.backend.xp
    if logits.ndim != 2 or target.shape != (logits.shape[0],):
        raise ValueError(
            f"cross_entropy: expected logits (N, C) and target (N,), got {logits.shape} and "
            f"{target.shape}"
        )
    if not xp.isdtype(target.dtype, "integral"):
        raise TypeError(f"cross_entropy: target must be integer class indices, not {target.dtype}")
    classes = logits.shape[1]
    t = target.raw
    if target.size:  # a host value is needed here: both bounds in one transfer
        low, high = target.backend.to_numpy(xp.stack((xp.min(t), xp.max(t)))).tolist()
        if low < 0 or high >= classes:
            raise ValueError(
                f"cross_entropy: target values must lie in [0, {classes - 1}] for {classes} "
                f"classes; got values from {low} to {high}"
            )
    labels = xp.reshape(xp.arange(classes, dtype=t.dtype, device=t.device), (1, -1))
    one_hot = ops.astype(ops.equal(ops.reshape(target, (-1, 1)), labels), logits.dtype)
    losses = -ops.sum(one_hot * ops.log_softmax(logits, axis=1), axis=1)
    return _reduce("cross_entropy", losses, reduction)


def mse_loss(x, target, reduction: str = "mean") -> Tensor:
    """Mean squared error."""
    diff = as_tensor(x) - target
    return _reduce("mse_loss", diff * diff, reduction)


def _reduce(name: str, losses: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return ops.mean(losses)
    if reduction == "sum":
        return ops.sum(losses)
    if reduction == "none":
        return losses
    raise ValueError(f"{name}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
