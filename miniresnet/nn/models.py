"""Networks: the CIFAR ResNet family of He et al. 2015 (and its plain twin), and MLPs.

Every model keeps the keyword arguments it was built with in ``model.config`` (so a checkpoint
can rebuild it with :func:`build_model`), and exposes ``stem``, ``blocks`` and ``head`` so that
a caller can run and differentiate it block by block::

    h = model.stem(x)
    for block in model.blocks:
        h = block(h)
    logits = model.head(h)

A config is checked in one place, :func:`validate_config`, which the constructors call and
which :func:`~miniresnet.checkpoint.load_checkpoint` calls before it builds anything;
:func:`state_count` and :func:`state_shapes` give the state dict a config implies in closed
form, without building the model (so a file's arrays can be checked against its config first).
"""

from __future__ import annotations

import inspect
import math
import reprlib
from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

from miniresnet.nn.blocks import (
    _UNMIRRORED,
    ORDERS,
    SHORTCUTS,
    BasicBlock,
    DenseBlock,
    HighwayBlock,
    ResidualBlock,
)
from miniresnet.nn.init import INITIALIZERS, as_rng
from miniresnet.nn.layers import (
    ACTIVATIONS,
    WIDENING,
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
_ENDS_IN_NORM = ("post", "relu_before_add", "relu_preact")  # orders whose branch ends in a norm
_MAX_WIDTH = 1e6  # resnet_cifar's width multiplier: up to 64 million channels


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxlong, _repr.maxother = 3, 80, 40, 80
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8


def short_repr(value: Any) -> str:
    """A ``repr`` of at most a few hundred characters, however large ``value`` is (configs may
    come from untrusted files)."""
    try:
        return _repr.repr(value)[:300]
    except ValueError:  # an int with more digits than Python will print
        return f"<{type(value).__name__} too large to print>"


# -- validation ---------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


# argument -> (what is valid: a description, or the tuple of choices; type test; value test)
def _int(low: int):
    return f"an int >= {low}", _is_int, lambda v: v >= low


def _choice(options):
    return tuple(options), lambda v: isinstance(v, str), lambda v: v in options


_BOOL = "True or False", lambda v: isinstance(v, bool), lambda v: True
_REAL = "a finite number", _is_real, _finite
_OPTIONAL_REAL = ("None or a finite number", lambda v: v is None or _is_real(v),
                  lambda v: v is None or _finite(v))
_SEED = "None or an int >= 0", lambda v: v is None or _is_int(v), lambda v: v is None or v >= 0
_STD = "a finite number >= 0", _is_real, lambda v: _finite(v) and v >= 0
_COMMON = {
    "residual": _BOOL, "norm": _BOOL, "activation": _choice(ACTIVATIONS), "order": _choice(ORDERS),
    "beta": _REAL, "lam": _REAL, "skipinit": _OPTIONAL_REAL,
    "init": _choice((*INITIALIZERS, "fixup")), "bias_init": _STD, "zero_init_residual": _BOOL,
    "dtype": _choice(("float32", "float64")), "seed": _SEED,
}
_RULES = {
    "resnet_cifar": {
        "n": _int(1), "in_channels": _int(1), "num_classes": _int(1),
        "width": (f"a number > 0 and <= {_MAX_WIDTH:g}", _is_real, lambda v: 0 < v <= _MAX_WIDTH),
        "block": _choice(("basic", "highway")), "shortcut": _choice(SHORTCUTS),
        "gate_bias": _REAL, **_COMMON,
    },
    "mlp": {"depth": _int(0), "width": _int(1), "in_features": _int(1), "out_features": _int(1),
            "layers": _int(1), **_COMMON},
}


def _check(model: str, key: str, value: Any, rule) -> None:
    valid, type_ok, value_ok = rule
    if isinstance(valid, tuple):
        if not type_ok(value):
            raise TypeError(f"{model}: {key} must be one of {', '.join(map(repr, valid))}, got "
                            f"{short_repr(value)} ({type(value).__name__})")
        if not value_ok(value):
            raise ValueError(f"{model}: unknown {key} {short_repr(value)}; valid: "
                             f"{', '.join(valid)}")
    elif not type_ok(value):
        raise TypeError(f"{model}: {key} must be {valid}, got {short_repr(value)} "
                        f"({type(value).__name__})")
    elif not value_ok(value):
        raise ValueError(f"{model}: {key} must be {valid}, got {short_repr(value)}")


def validate_config(config: Mapping) -> dict:
    """The complete config of a model (defaults filled in), after checking every entry.

    ``config`` is a ``model.config``: ``{"model": "resnet_cifar" or "mlp", argument: value,
    ...}``; a missing argument takes the constructor's default. Nothing is allocated, so this is
    cheap whatever the config asks for.

    Raises
    ------
    TypeError, ValueError
        For an unknown model or argument, a missing required argument, a value of the wrong type
        or out of range, or arguments that cannot go together; the message names the model, the
        argument, the value (cut short) and what is valid.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"a model config must be a dict, got {type(config).__name__}")
    name = config.get("model")
    if not isinstance(name, str) or name not in _RULES:
        raise ValueError(f"unknown model {short_repr(name)}; valid: {', '.join(_RULES)}")
    rules = _RULES[name]
    unknown = [key for key in config if key != "model" and key not in rules]
    if unknown:
        raise TypeError(f"{name}: unknown argument(s) {short_repr(unknown)}; valid: "
                        f"{', '.join(rules)}")
    full = {"model": name}
    for key, param in inspect.signature(MODELS[name]).parameters.items():
        if key not in config and param.default is inspect.Parameter.empty:
            raise TypeError(f"{name}: missing required argument {key!r}")
        full[key] = config.get(key, param.default)
        _check(name, key, full[key], rules[key])
    block = full.get("block", "basic")
    if name == "resnet_cifar" and full["shortcut"] == "identity" and (
            full["residual"] or block == "highway"):
        raise ValueError("resnet_cifar: identity shortcut impossible: the first blocks of stages "
                         "2 and 3 change the shape; use shortcut='projection' or 'zero_pad'")
    if full["zero_init_residual"] and full.get("depth", 1) > 0 and (
            block != "basic" or not full["norm"] or full["order"] not in _ENDS_IN_NORM):
        raise ValueError(f"{name}: zero_init_residual needs each residual branch to end with an "
                         f"affine batch norm (block='basic', norm=True and order one of "
                         f"{', '.join(_ENDS_IN_NORM)}); got block={block!r}, "
                         f"norm={full['norm']!r}, order={full['order']!r}")
    _check_widening(name, full, block)
    return full


def _check_widening(name: str, full: dict, block: str) -> None:
    """A widening activation (CReLU) only where no activation feeds the residual stream, and
    looks-linear weights only with CReLU."""
    act, order = full["activation"], full["order"]
    if full["init"] == "looks_linear" and act != "crelu":
        raise ValueError(f"{name}: init 'looks_linear' mirrors the weights fed by a CReLU: it "
                         f"needs activation='crelu', got activation={act!r}")
    grow = WIDENING.get(act, 1)
    if grow == 1:
        return
    if block == "highway":
        raise ValueError(f"{name}: activation {act!r} changes the width, which a highway block's "
                         f"gated carry cannot follow; use block='basic'")
    if order not in _PREACT:
        raise ValueError(f"{name}: activation {act!r} changes the width, so it needs an order in "
                         f"which every activation feeds a layer ({', '.join(_PREACT)}); in order "
                         f"{order!r} an activation ends the block and would widen the stream")
    if order == "full_preact" and full.get("shortcut") == "zero_pad" and full["residual"]:
        if full["init"] == "looks_linear":
            raise ValueError(_UNMIRRORED.format(name=name + ": "))
        for c_in, c_out, stride, _ in _runs(full):
            if (stride != 1 or c_in != c_out) and grow * c_in > c_out:
                raise ValueError(
                    f"{name}: a full_preact zero_pad shortcut sees act(N₁(x)), which activation "
                    f"{act!r} makes {grow * c_in} wide, more than the block's {c_out} outputs; "
                    f"use shortcut='projection'")


# -- the closed-form plan: what the constructors build, and the state it implies -----------------


def _stage_widths(width: float) -> list[int]:
    return [max(1, round(c * width)) for c in (16, 32, 64)]


def _runs(config: dict) -> list[tuple[int, int, int, int]]:
    """The blocks of a validated config, as runs ``(in, out, stride, count)`` of equal blocks."""
    if config["model"] == "mlp":
        runs = [(config["width"], config["width"], 1, config["depth"])]
    else:
        n, (a, b, c) = config["n"], _stage_widths(config["width"])
        runs = [(a, a, 1, n), (a, b, 2, 1), (b, b, 1, n - 1), (b, c, 2, 1), (c, c, 1, n - 1)]
    return [run for run in runs if run[3] > 0]


# a state entry: (name, shape, is a buffer)
def _weights(name: str, n_in: int, n_out: int, bias: bool, kernel: int | None) -> list:
    """A Linear's (``kernel`` None) or a Conv2d's entries."""
    shape = (n_out, n_in) if kernel is None else (n_out, n_in, kernel, kernel)
    return [(name + "weight", shape, False)] + ([(name + "bias", (n_out,), False)] if bias else [])


def _batchnorm(name: str, width: int) -> list:
    return [(name + key, (width,), key.startswith("running"))
            for key in ("weight", "bias", "running_mean", "running_var")]


def _inner(config: dict) -> dict:
    """A highway block's branch: a two-layer post-order residual block."""
    return {**config, "block": "basic", "order": "post", "residual": True, "skipinit": None,
            "layers": 2}


def _projects(config: dict, c_in: int, c_out: int, stride: int) -> bool:
    return (config["residual"] and (stride != 1 or c_in != c_out)
            and config.get("shortcut", "projection") == "projection")


def _block_count(config: dict, c_in: int, c_out: int, stride: int) -> int:
    if config.get("block") == "highway":
        return _block_count(_inner(config), c_in, c_out, stride) + 2
    # each layer, and a projection shortcut, is a weight and a batch norm (4), or a weight and bias
    per_layer = 5 if config["norm"] else 2
    layers = config.get("layers", 2) + _projects(config, c_in, c_out, stride)
    return (config["skipinit"] is not None) + per_layer * layers


def _block_entries(config: dict, c_in: int, c_out: int, stride: int) -> list:
    kernel = None if config["model"] == "mlp" else 3
    if config.get("block") == "highway":
        return ([("h." + name, *rest) for name, *rest in
                 _block_entries(_inner(config), c_in, c_out, stride)]
                + _weights("gate.", c_in, c_out, True, kernel))
    norm, grow = config["norm"], WIDENING.get(config["activation"], 1)
    entries = [] if config["skipinit"] is None else [("alpha", (), False)]
    widths = [c_in] + [c_out] * config.get("layers", 2)
    for i in range(len(widths) - 1):  # (a widening activation feeds every layer: see blocks)
        entries += _weights(f"layers.{i}.", grow * widths[i], widths[i + 1], not norm, kernel)
    if norm:
        norm_widths = widths[:-1] if config["order"] == "full_preact" else widths[1:]
        for i, width in enumerate(norm_widths):
            entries += _batchnorm(f"norms.{i}.", width)
    if _projects(config, c_in, c_out, stride):
        k = None if kernel is None else 1
        seen = (grow if config["order"] == "full_preact" else 1) * c_in  # act(N₁(x)) there
        entries += (_weights("shortcut.0.", seen, c_out, False, k)
                    + _batchnorm("shortcut.1.", c_out) if norm
                    else _weights("shortcut.", seen, c_out, True, k))
    return entries


def _stem_and_head(config: dict) -> tuple[list, list]:
    pre, norm = config["order"] in _PREACT, config["norm"]
    if config["model"] == "mlp":
        stem = _weights("stem.", config["in_features"], config["width"], True, None)
        c, classes, classifier = config["width"], config["out_features"], 2 if pre else 0
    else:
        first, *_, c = _stage_widths(config["width"])
        stem = _weights("stem." if pre else "stem.0.", config["in_channels"], first, not norm, 3)
        stem += _batchnorm("stem.1.", first) if norm and not pre else []
        classes, classifier = config["num_classes"], 3 if pre else 1
    head = _batchnorm("head.0.", c) if pre and norm else []
    grow = WIDENING.get(config["activation"], 1)  # (only in pre-activation orders)
    return stem, head + _weights(f"head.{classifier}.", grow * c, classes, True, None)


def state_count(config: Mapping) -> int:
    """How many entries (parameters and buffers) the state dict of ``build_model(config)`` has,
    in closed form: the cost does not grow with the depth."""
    config = validate_config(config)
    stem, head = _stem_and_head(config)
    return len(stem) + len(head) + sum(count * _block_count(config, c_in, c_out, stride)
                                       for c_in, c_out, stride, count in _runs(config))


def state_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of ``build_model(config).state_dict()``, in its order (parameters, then
    buffers), without building anything; every entry has dtype ``config["dtype"]``.

    The cost is proportional to the number of entries: compare :func:`state_count` with what
    you hold first.
    """
    config = validate_config(config)
    stem, head = _stem_and_head(config)
    entries, first = list(stem), 0
    for c_in, c_out, stride, count in _runs(config):
        block = _block_entries(config, c_in, c_out, stride)
        entries += [(f"blocks.{first + j}.{name}", shape, buffer)
                    for j in range(count) for name, shape, buffer in block]
        first += count
    entries += head
    return ({name: shape for name, shape, buffer in entries if not buffer}
            | {name: shape for name, shape, buffer in entries if buffer})


# -- models -------------------------------------------------------------------------------------


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


def _layer_init(init: str, fed: bool = True) -> str:
    """The initialiser of a layer: He for Fixup (then rescaled); orthogonal instead of
    looks-linear for a layer not fed by an activation (the stem)."""
    if init == "fixup":
        return "he"
    return "orthogonal" if init == "looks_linear" and not fed else init


def _draw_biases(network: Network, std: float, rng, dtype: str) -> None:
    """``bias_init``: every bias of a linear or convolution layer (not a highway gate's, which
    ``gate_bias`` sets) from N(0, std²), in module order, from a generator spawned from the
    weights' (so the weights are the same as with zero biases). std = 0 draws nothing."""
    if std == 0:
        return
    gates = {id(b.gate) for b in network.blocks if isinstance(b, HighwayBlock)}
    draw = rng.spawn(1)[0]
    for m in network.modules():
        if isinstance(m, (Linear, Conv2d)) and m.bias is not None and id(m) not in gates:
            m.bias.data = draw.normal(tuple(m.bias.shape), dtype, std=std)


def resnet_cifar(n: int, *, width: float = 1, in_channels: int = 3, num_classes: int = 10,
                 residual: bool = True, block: str = "basic", order: str = "post",
                 norm: bool = True, activation: str = "relu", shortcut: str = "projection",
                 beta: float = 1.0, lam: float = 1.0, skipinit: float | None = None,
                 init: str = "he", bias_init: float = 0.0, zero_init_residual: bool = False,
                 gate_bias: float = -2.0, dtype: str = "float64",
                 seed: int | None = 0) -> Network:
    """The 6n+2-layer CIFAR network of He et al. 2015 (n=3: ResNet-20, n=18: ResNet-110).

    A 3×3 stem convolution, three stages of ``n`` blocks at 16, 32 and 64 channels (times
    ``width``; the first block of stages 2 and 3 halves the resolution), global average pooling
    and a linear classifier. ``residual=False`` gives the plain counterpart with identical
    layers. Pre-activation orderings move the stem's BN and activation to the head, as in He
    et al. 2016. ``block="highway"`` swaps in highway blocks. ``init`` is "he", "xavier",
    "orthogonal", "fixup" (zero last branch layer and classifier, L^(-1/(2m-2)) scaling; use it
    with ``norm=False``) or "looks_linear" (with ``activation="crelu"``: mirrored orthogonal
    weights ``[W, −W]`` in every layer fed by a CReLU, orthogonal ones elsewhere; the network
    is then linear at initialisation, Balduzzi et al. 2017); ``skipinit`` adds a learnable
    branch scalar α with that initial value. ``activation`` is one of
    :data:`~miniresnet.nn.layers.ACTIVATIONS`; "crelu" doubles the width it outputs, so it
    needs a pre-activation ``order`` (every layer it feeds, and the classifier, takes twice
    the width) and basic blocks. ``bias_init`` = σ > 0 draws every bias (of the layers that
    have one: all with ``norm=False``, and the classifier) from N(0, σ²), from a generator
    spawned from ``seed`` after the weights, which stay those of σ = 0 (zero biases, the
    default). Every argument is checked first (:func:`validate_config`).
    """
    config = validate_config({"model": "resnet_cifar", **locals()})
    r = as_rng(seed)
    first, *_, last = _stage_widths(width)
    pre = order in _PREACT
    stem_conv = Conv2d(in_channels, first, 3, 1, 1, bias=not norm,
                       init=_layer_init(init, fed=False), dtype=dtype, rng=r)
    stem = stem_conv if pre else Sequential(
        stem_conv, BatchNorm2d(first, dtype=dtype) if norm else Identity(),
        make_activation(activation))
    blocks = []
    for c_in, c_out, stride, count in _runs(config):
        for _ in range(count):
            if block == "highway":
                b = HighwayBlock(c_in, c_out, stride, gate_bias=gate_bias, norm=norm,
                                 activation=activation, shortcut=shortcut,
                                 init=_layer_init(init), dtype=dtype, rng=r)
            else:
                b = BasicBlock(c_in, c_out, stride, residual=residual, order=order, norm=norm,
                               activation=activation, shortcut=shortcut, beta=beta, lam=lam,
                               skipinit=skipinit, init=_layer_init(init), dtype=dtype, rng=r)
            blocks.append(b)
    grow = WIDENING.get(activation, 1)  # a CReLU (pre-activation orders only) feeds it
    classifier = Linear(grow * last, num_classes, init=_layer_init(init), dtype=dtype, rng=r)
    head_parts = ([BatchNorm2d(last, dtype=dtype) if norm else Identity(),
                   make_activation(activation)] if pre else [])
    head = Sequential(*head_parts, GlobalAvgPool2d(), classifier)
    _apply_init(blocks, classifier, init, zero_init_residual)
    network = Network(stem, Sequential(*blocks), head, config)
    _draw_biases(network, bias_init, r, dtype)
    return network


def mlp(depth: int, width: int, *, in_features: int = 1, out_features: int = 1,
        residual: bool = False, norm: bool = True, beta: float = 1.0, lam: float = 1.0,
        activation: str = "relu", order: str = "full_preact", layers: int = 1,
        skipinit: float | None = None, init: str = "he", bias_init: float = 0.0,
        zero_init_residual: bool = False, dtype: str = "float64",
        seed: int | None = 0) -> Network:
    """A fully connected network: ``Linear(in, width)``, ``depth`` dense blocks, then
    ``Linear(width, out)``.

    Each block has ``layers`` linear maps (default 1) arranged by ``order``; with the default
    full pre-activation and one layer, a residual block is ``x + β W act(BN(x))`` (Balduzzi et
    al. 2017) and the plain block ``W act(BN(x))``. ``activation``, ``init`` ("he",
    "xavier", "orthogonal", "fixup", "looks_linear") and ``bias_init`` are as in
    :func:`resnet_cifar` ("crelu" needs a pre-activation order; with "looks_linear" the stem is
    orthogonal and every other layer mirrored); the stem and the classifier always have biases,
    the blocks' layers with ``norm=False``. Every argument is checked first
    (:func:`validate_config`).
    """
    config = validate_config({"model": "mlp", **locals()})
    r = as_rng(seed)
    stem = Linear(in_features, width, init=_layer_init(init, fed=False), dtype=dtype, rng=r)
    blocks = [DenseBlock(c_in, c_out, residual=residual, order=order, norm=norm,
                         activation=activation, beta=beta, lam=lam, skipinit=skipinit,
                         layers=layers, init=_layer_init(init), dtype=dtype, rng=r)
              for c_in, c_out, _, count in _runs(config) for _ in range(count)]
    grow = WIDENING.get(activation, 1)  # a CReLU (pre-activation orders only) feeds it
    classifier = Linear(grow * width, out_features, init=_layer_init(init), dtype=dtype, rng=r)
    head_parts = ([BatchNorm1d(width, dtype=dtype) if norm else Identity(),
                   make_activation(activation)] if order in _PREACT else [])
    head = Sequential(*head_parts, classifier)
    _apply_init(blocks, classifier, init, zero_init_residual)
    network = Network(stem, Sequential(*blocks), head, config)
    _draw_biases(network, bias_init, r, dtype)
    return network


MODELS = {"resnet_cifar": resnet_cifar, "mlp": mlp}


def build_model(config: Mapping) -> Network:
    """Rebuild a model from its ``config`` (as stored in checkpoints), checked first by
    :func:`validate_config`."""
    config = validate_config(config)
    return MODELS[config.pop("model")](**config)
