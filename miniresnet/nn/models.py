"""Networks: the CIFAR ResNet family of He et al. 2015 (and its plain twin), and MLPs.

Every model keeps the keyword arguments it was built with in ``model.config`` (so a checkpoint
can rebuild it with :func:`build_model`), and exposes ``stem``, ``blocks`` and ``head`` so that
a caller can run and differentiate it block by block::

    h = model.stem(x)
    for block in model.blocks:
        h = block(h)
    logits = model.head(h)
"""

from __future__ import annotations

from miniresnet.nn.blocks import BasicBlock, DenseBlock, HighwayBlock, ResidualBlock
from miniresnet.nn.init import as_rng
from miniresnet.nn.layers import (
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    GlobalAvgPool2d,
    Identity,
    Linear,
)
from miniresnet.nn.layers import activation as make_activation
from miniresnet.nn.module import Module, Sequential

_PREACT = ("relu_preact", "full_preact")


class Network(Module):
    """``head(blocks(stem(x)))``; ``blocks`` is a :class:`Sequential` of the blocks in order."""

    def __init__(self, stem: Module, blocks: Sequential, head: Module, config: dict):
        super().__init__()
        self.stem, self.blocks, self.head = stem, blocks, head
        self.config = config

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def block_outputs(self, x) -> list:
        """``[stem(x), after block 1, ..., after block L]`` (the residual stream)."""
        outs = [self.stem(x)]
        for block in self.blocks:
            outs.append(block(outs[-1]))
        return outs


def _apply_init(blocks: list[Module], classifier: Linear, init: str, zero_init_residual: bool):
    """Fixup and zero-init-last-BN, applied after the blocks were built with ``init``."""
    if init == "fixup":
        residual = [b for b in blocks if isinstance(b, ResidualBlock)]
        depth = len(residual)
        for b in residual:
            layers = b.branch_layers()
            m = len(layers)
            scale = depth ** (-1.0 / (2 * m - 2)) if m > 1 else 0.0
            for layer in layers[:-1]:
                layer.weight.data = layer.weight.raw * scale
            layers[-1].weight.data = layers[-1].weight.raw * 0.0
        classifier.weight.data = classifier.weight.raw * 0.0
    if zero_init_residual:
        for b in blocks:
            norm = b.last_norm() if isinstance(b, ResidualBlock) else None
            if norm is None or norm.weight is None:
                raise ValueError(
                    f"zero_init_residual needs each residual branch to end with an affine "
                    f"batch norm; order {getattr(b, 'order', type(b).__name__)!r} does not"
                )
            norm.weight.data = norm.weight.raw * 0.0


def _layer_init(init: str) -> str:
    return "he" if init == "fixup" else init


def resnet_cifar(n: int, *, width: float = 1, in_channels: int = 3, num_classes: int = 10,
                 residual: bool = True, block: str = "basic", order: str = "post",
                 norm: bool = True, activation: str = "relu", shortcut: str = "projection",
                 beta: float = 1.0, lam: float = 1.0, skipinit: float | None = None,
                 init: str = "he", zero_init_residual: bool = False, gate_bias: float = -2.0,
                 dtype: str = "float64", seed: int | None = 0) -> Network:
    """The 6n+2-layer CIFAR network of He et al. 2015 (n=3: ResNet-20, n=18: ResNet-110).

    A 3×3 stem convolution, three stages of ``n`` blocks at 16, 32 and 64 channels (times
    ``width``; the first block of stages 2 and 3 halves the resolution), global average pooling
    and a linear classifier. ``residual=False`` gives the plain counterpart with identical
    layers. Pre-activation orderings move the stem's BN and activation to the head, as in He
    et al. 2016. ``block="highway"`` swaps in highway blocks. ``init`` is "he", "xavier",
    "orthogonal" or "fixup" (zero last branch layer and classifier, L^(-1/(2m-2)) scaling; use it
    with ``norm=False``); ``skipinit`` adds a learnable branch scalar α with that initial value.
    """
    config = {"model": "resnet_cifar", **{k: v for k, v in locals().items() if k != "config"}}
    if n < 1:
        raise ValueError(f"resnet_cifar: n must be >= 1, got {n}")
    r = as_rng(seed)
    widths = [max(1, round(c * width)) for c in (16, 32, 64)]
    pre = order in _PREACT
    stem_conv = Conv2d(in_channels, widths[0], 3, 1, 1, bias=not norm, init=_layer_init(init),
                       dtype=dtype, rng=r)
    stem = stem_conv if pre else Sequential(
        stem_conv, BatchNorm2d(widths[0], dtype=dtype) if norm else Identity(),
        make_activation(activation))
    blocks, c_in = [], widths[0]
    for stage, c_out in enumerate(widths):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            if block == "highway":
                b = HighwayBlock(c_in, c_out, stride, gate_bias=gate_bias, norm=norm,
                                 activation=activation, shortcut=shortcut,
                                 init=_layer_init(init), dtype=dtype, rng=r)
            elif block == "basic":
                b = BasicBlock(c_in, c_out, stride, residual=residual, order=order, norm=norm,
                               activation=activation, shortcut=shortcut, beta=beta, lam=lam,
                               skipinit=skipinit, init=_layer_init(init), dtype=dtype, rng=r)
            else:
                raise ValueError(f"unknown block {block!r}; valid: 'basic', 'highway'")
            blocks.append(b)
            c_in = c_out
    classifier = Linear(c_in, num_classes, init=_layer_init(init), dtype=dtype, rng=r)
    head_parts = ([BatchNorm2d(c_in, dtype=dtype) if norm else Identity(),
                   make_activation(activation)] if pre else [])
    head = Sequential(*head_parts, GlobalAvgPool2d(), classifier)
    _apply_init(blocks, classifier, init, zero_init_residual)
    return Network(stem, Sequential(*blocks), head, config)


def mlp(depth: int, width: int, *, in_features: int = 1, out_features: int = 1,
        residual: bool = False, norm: bool = True, beta: float = 1.0, lam: float = 1.0,
        activation: str = "relu", order: str = "full_preact", layers: int = 1,
        skipinit: float | None = None, init: str = "he", zero_init_residual: bool = False,
        dtype: str = "float64", seed: int | None = 0) -> Network:
    """A fully connected network: ``Linear(in, width)``, ``depth`` dense blocks, then
    ``Linear(width, out)``.

    Each block has ``layers`` linear maps (default 1) arranged by ``order``; with the default
    full pre-activation and one layer, a residual block is ``x + β W act(BN(x))`` (Balduzzi et
    al. 2017) and the plain block ``W act(BN(x))``.
    """
    config = {"model": "mlp", **{k: v for k, v in locals().items() if k != "config"}}
    if depth < 0:
        raise ValueError(f"mlp: depth must be >= 0, got {depth}")
    r = as_rng(seed)
    stem = Linear(in_features, width, init=_layer_init(init), dtype=dtype, rng=r)
    blocks = [DenseBlock(width, width, residual=residual, order=order, norm=norm,
                         activation=activation, beta=beta, lam=lam, skipinit=skipinit,
                         layers=layers, init=_layer_init(init), dtype=dtype, rng=r)
              for _ in range(depth)]
    classifier = Linear(width, out_features, init=_layer_init(init), dtype=dtype, rng=r)
    head_parts = ([BatchNorm1d(width, dtype=dtype) if norm else Identity(),
                   make_activation(activation)] if order in _PREACT else [])
    head = Sequential(*head_parts, classifier)
    _apply_init(blocks, classifier, init, zero_init_residual)
    return Network(stem, Sequential(*blocks), head, config)


MODELS = {"resnet_cifar": resnet_cifar, "mlp": mlp}


def build_model(config: dict) -> Network:
    """Rebuild a model from its ``config`` (as stored in checkpoints)."""
    config = dict(config)
    name = config.pop("model", None)
    if name not in MODELS:
        raise ValueError(f"build_model: unknown model {name!r}; valid: {', '.join(MODELS)}")
    if name == "resnet_cifar":
        return resnet_cifar(config.pop("n"), **config)
    return mlp(config.pop("depth"), config.pop("width"), **config)

