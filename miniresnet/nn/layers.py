"""Layers: Conv2d, BatchNorm1d/2d, Linear, activations, pooling, Flatten, Identity."""

from __future__ import annotations

from miniresnet import functional as F
from miniresnet import ops
from miniresnet.backend_choice import current_backend
from miniresnet.backends import Rng, int_pair
from miniresnet.nn.init import as_rng, initializer
from miniresnet.nn.module import Module, parameter
from miniresnet.tracing import as_tensor


def _zeros(rng: Rng, n: int, dtype: str):
    return rng.backend.xp.zeros(n, dtype=rng.backend.dtype(dtype), device=rng.backend.device)


class Linear(Module):
    """``y = x Wᵀ + b`` with ``W`` of shape (out, in), initialised by ``init``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init: str = "he", dtype: str = "float64", rng: Rng | int | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        r = as_rng(rng)
        self.weight = parameter(initializer(init)(r, (out_features, in_features), dtype))
        self.bias = parameter(_zeros(r, out_features, dtype)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Conv2d(Module):
    """2-D convolution with weight (out, in, kh, kw), initialised by ``init`` (He by default);
    ``kernel_size``, ``stride`` and ``padding`` are ints or pairs, as in
    :func:`~miniresnet.functional.conv2d` (checked here, before anything is allocated)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int = 0, bias: bool = True, init: str = "he",
                 dtype: str = "float64", rng: Rng | int | None = None):
        super().__init__()
        kh, kw = int_pair("Conv2d", kernel_size, "kernel_size")
        int_pair("Conv2d", stride, "stride")
        int_pair("Conv2d", padding, "padding")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        r = as_rng(rng)
        shape = (out_channels, in_channels, kh, kw)
        self.weight = parameter(initializer(init)(r, shape, dtype))
        self.bias = parameter(_zeros(r, out_channels, dtype)) if bias else None

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")


class _BatchNorm(Module):
    _ndim: int

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, dtype: str = "float64"):
        super().__init__()
        self.num_features, self.eps, self.momentum, self.affine = (num_features, eps, momentum,
                                                                   affine)
        be = current_backend()
        where = dict(dtype=be.dtype(dtype), device=be.device)
        if affine:  # the learnable per-channel scale and shift (Caffe's separate "Scale" layer)
            self.weight = parameter(be.xp.ones(num_features, **where))
            self.bias = parameter(be.xp.zeros(num_features, **where))
        else:
            self.weight = self.bias = None
        self.register_buffer("running_mean", be.xp.zeros(num_features, **where))
        self.register_buffer("running_var", be.xp.ones(num_features, **where))
        # False under nn.frozen_stats: training mode then updates no running statistics
        object.__setattr__(self, "track_running_stats", True)

    def forward(self, x):
        x = as_tensor(x)
        if x.ndim != self._ndim:
            raise ValueError(
                f"{type(self).__name__}: expected a {self._ndim}-d input, got shape {x.shape}"
            )
        if self.training and not self.track_running_stats:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, eps=self.eps)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}")


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) input."""

    _ndim = 2


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) input, per channel."""

    _ndim = 4


class Activation(Module):
    """Base class of the elementwise activations made by :func:`activation` (so a caller can
    find every activation of a network with ``isinstance``)."""


class ReLU(Activation):
    """``max(x, 0)`` (derivative 0 at 0)."""

    def forward(self, x):
        return ops.relu(x)


class LeakyReLU(Activation):
    """``x`` for ``x > 0``, ``slope·x`` otherwise, composed as ``relu(x) − slope·relu(−x)``
    (derivative 0 exactly at 0, as ReLU's)."""

    def __init__(self, slope: float = 0.01):
        super().__init__()
        self.slope = slope

    def forward(self, x):
        return ops.relu(x) - self.slope * ops.relu(ops.neg(x))

    def extra_repr(self) -> str:
        return f"slope={self.slope}"


class CReLU(Activation):
    """Concatenated ReLU (Shang et al. 2016): ``concat([relu(x), relu(−x)], axis=1)``.

    It doubles the feature / channel axis (axis 1), so the layer it feeds takes twice the
    width; ``W·relu(x) − W·relu(−x) = W·x`` is what ``init="looks_linear"`` builds on.
    """

    def forward(self, x):
        return ops.concat([ops.relu(x), ops.relu(ops.neg(x))], axis=1)


class Tanh(Activation):
    def forward(self, x):
        return ops.tanh(x)


class Sigmoid(Activation):
    def forward(self, x):
        return ops.sigmoid(x)


class IdentityActivation(Activation):
    """The activation ``"identity"``: ``x`` unchanged (a linear network)."""

    def forward(self, x):
        return x


class Identity(Module):
    def forward(self, x):
        return x


class GlobalAvgPool2d(Module):
    """(N, C, H, W) -> (N, C): the mean over each feature map."""

    def forward(self, x):
        return ops.mean(x, axis=(2, 3))


class Flatten(Module):
    """(N, ...) -> (N, prod(...))."""

    def forward(self, x):
        return ops.reshape(x, (x.shape[0], -1))


ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid, "identity": IdentityActivation,
               "leaky_relu": LeakyReLU, "crelu": CReLU}
#: the activations whose output is wider than their input, by this factor (on axis 1)
WIDENING = {"crelu": 2}


def activation(name: str) -> Module:
    """A new activation module (an :class:`Activation`).

    ``name`` is one of "relu", "tanh", "sigmoid", "identity" (no activation: a linear
    network), "leaky_relu" (slope 0.01 below 0) or "crelu" (concatenated ReLU,
    ``concat([relu(x), relu(−x)], axis=1)``, which doubles axis 1: see :data:`WIDENING`).
    """
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}") from None
