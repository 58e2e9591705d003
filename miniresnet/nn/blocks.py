"""Residual, plain and highway blocks: every variant one constructor argument from the others.

A block computes ``out = λ·S(x) + α·β·F(x)`` (``S`` the shortcut, ``F`` the branch) with the
normalisation and activation placed as in one of He et al. 2016's five orderings:

=================== ========================================== ============================
``order``           branch ``F`` (two layers)                  output
=================== ========================================== ============================
``post``            ``N₂ L₂ act N₁ L₁``                        ``act(λS + βF)`` (original)
``bn_after_add``    ``L₂ act N₁ L₁``                           ``act(N₂(λS + βF))``
``relu_before_add`` ``act N₂ L₂ act N₁ L₁``                    ``λS + βF``
``relu_preact``     ``N₂ L₂ act N₁ L₁ act``                    ``λS + βF``
``full_preact``     ``L₂ act N₂ L₁ act N₁``                    ``λS + βF``
=================== ========================================== ============================

(read right to left). ``residual=False`` removes ``λS`` and nothing else: the plain
counterpart. ``norm=False`` makes every ``N`` the identity (the layers then get biases).
``L`` is a 3×3 convolution (:class:`BasicBlock`) or a linear map (:class:`DenseBlock`).

``activation="crelu"`` doubles the width it outputs, so it is allowed only in the orders where
every ``act`` feeds a layer (``relu_preact``, ``full_preact``): those layers, and a
``full_preact`` projection or zero-pad shortcut (which sees ``act(N₁(x))``), take twice the
input width. ``init="looks_linear"`` (CReLU only) gives every layer fed by the CReLU mirrored
weights ``[W, −W]`` (the block is then linear at initialisation) and a shortcut fed by ``x``
orthogonal weights; a ``full_preact`` zero-pad shortcut would pass the CReLU's output on
unweighted, so that combination is refused.
"""

from __future__ import annotations

from miniresnet import ops
from miniresnet.backends import Rng
from miniresnet.nn.init import as_rng
from miniresnet.nn.layers import (
    WIDENING,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Identity,
    Linear,
)
from miniresnet.nn.layers import activation as make_activation
from miniresnet.nn.module import Module, Sequential, parameter
from miniresnet.tracing import as_tensor

ORDERS = ("post", "bn_after_add", "relu_before_add", "relu_preact", "full_preact")
SHORTCUTS = ("identity", "projection", "zero_pad")
# the orders in which every activation feeds a layer (none ends the block): the only ones where
# a widening activation (CReLU) leaves the residual stream's width alone
_EVERY_ACT_FEEDS_A_LAYER = ("relu_preact", "full_preact")
_UNMIRRORED = ("{name}init 'looks_linear' with order 'full_preact' and shortcut 'zero_pad': "
               "that shortcut passes act(N₁(x)), the CReLU's output, on with no weights to "
               "mirror, so the network would not be linear at initialisation; use "
               "shortcut='projection' or order='relu_preact'")


def _unfed(init: str) -> str:
    """The initialiser of a layer not fed by an activation: looks-linear mirrors CReLU halves,
    so such a layer takes plain orthogonal weights (Balduzzi et al. 2017)."""
    return "orthogonal" if init == "looks_linear" else init


class ZeroPadShortcut(Module):
    """Option A of He et al. 2015: subsample by ``stride`` and zero-pad the new channels (or
    features), with no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"zero_pad shortcut: cannot shrink {in_channels} channels to {out_channels}"
            )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x):
        x = as_tensor(x)
        if x.ndim == 4 and self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if extra:
            widths = [(0, 0)] * x.ndim
            widths[1] = (extra // 2, extra - extra // 2)
            x = ops.pad(x, widths)
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, stride={self.stride}"


class ResidualBlock(Module):
    """The shared block: see the module docstring for the orderings and switches.

    Use :class:`BasicBlock` (convolutions) or :class:`DenseBlock` (linear layers).
    """

    _conv: bool

    def __init__(self, in_features: int, out_features: int, stride: int = 1, *,
                 residual: bool = True, order: str = "post", norm: bool = True,
                 activation: str = "relu", shortcut: str = "projection", beta: float = 1.0,
                 lam: float = 1.0, skipinit: float | None = None, layers: int = 2,
                 init: str = "he", dtype: str = "float64", rng: Rng | int | None = None):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; valid: {', '.join(ORDERS)}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {shortcut!r}; valid: {', '.join(SHORTCUTS)}")
        if layers < 1:
            raise ValueError(f"a block needs at least one layer, got layers={layers}")
        if stride != 1 and not self._conv:
            raise ValueError("dense blocks have no stride")
        grow = WIDENING.get(activation, 1)
        if grow != 1 and order not in _EVERY_ACT_FEEDS_A_LAYER:
            raise ValueError(
                f"activation {activation!r} changes the width, so it needs an order in which "
                f"every activation feeds a layer ({', '.join(_EVERY_ACT_FEEDS_A_LAYER)}); in "
                f"order {order!r} an activation ends the block and would widen the stream")
        if init == "looks_linear" and activation != "crelu":
            raise ValueError(f"init 'looks_linear' mirrors the weights fed by a CReLU: it needs "
                             f"activation='crelu', got {activation!r}")
        r = as_rng(rng)
        self.residual, self.order, self.beta, self.lam = residual, order, beta, lam
        self.in_features, self.out_features, self.stride = in_features, out_features, stride
        self.act = activation
        widths = [in_features] + [out_features] * layers
        # in the orders allowed above every layer is fed by an activation: its input is `grow`x
        self.layers = Sequential(*(
            self._layer(grow * widths[i], widths[i + 1], stride if i == 0 else 1, not norm,
                        init, dtype, r) for i in range(layers)))
        norm_widths = ([in_features] + [out_features] * (layers - 1) if order == "full_preact"
                       else [out_features] * layers)
        self.norms = Sequential(*(self._norm(w, dtype) if norm else Identity()
                                  for w in norm_widths))
        self.acts = Sequential(*(make_activation(activation) for _ in range(layers + 1)))
        changes_shape = stride != 1 or in_features != out_features
        if not residual:
            self.shortcut = None
        elif not changes_shape:
            self.shortcut = Identity()
        elif shortcut == "projection":
            # full pre-activation: the shortcut sees act(N₁(x)), of width grow·in (see terms)
            sees_act = order == "full_preact"
            proj = self._layer((grow if sees_act else 1) * in_features, out_features, stride,
                               not norm, init if sees_act else _unfed(init), dtype, r, 1)
            self.shortcut = Sequential(proj, self._norm(out_features, dtype)) if norm else proj
        elif shortcut == "zero_pad":
            if init == "looks_linear" and order == "full_preact":
                raise ValueError(_UNMIRRORED.format(name=""))
            seen = (grow if order == "full_preact" else 1) * in_features
            if grow != 1 and seen > out_features:
                raise ValueError(
                    f"zero_pad shortcut: in order 'full_preact' it sees act(N₁(x)), and "
                    f"activation {activation!r} makes that {seen} wide, more than the block's "
                    f"{out_features} outputs; use shortcut='projection'")
            self.shortcut = ZeroPadShortcut(seen, out_features, stride)
        else:
            raise ValueError(
                f"identity shortcut impossible: the block maps {in_features} to {out_features} "
                f"with stride {stride}; use shortcut='projection' or 'zero_pad'"
            )
        self.alpha = None if skipinit is None else parameter(
            r.backend.xp.full((), skipinit, dtype=r.backend.dtype(dtype), device=r.backend.device))

    # -- pieces -----------------------------------------------------------------------------
    def _layer(self, n_in, n_out, stride, bias, init, dtype, rng, kernel=3):
        if self._conv:
            return Conv2d(n_in, n_out, kernel, stride, kernel // 2, bias=bias, init=init,
                          dtype=dtype, rng=rng)
        return Linear(n_in, n_out, bias=bias, init=init, dtype=dtype, rng=rng)

    def _norm(self, width, dtype):
        return (BatchNorm2d if self._conv else BatchNorm1d)(width, dtype=dtype)

    def branch_layers(self) -> list[Module]:
        """The branch's convolutions / linear maps, in order (for Fixup-style initialisation)."""
        return list(self.layers)

    def last_norm(self) -> Module | None:
        """The normalisation that ends the branch, if the ordering has one there (its scale is
        what 'zero-init the last BN' sets to zero)."""
        if self.order in ("post", "relu_before_add", "relu_preact"):
            last = self.norms[len(self.norms) - 1]
            return None if isinstance(last, Identity) else last
        return None

    # -- computation --------------------------------------------------------------------------
    def branch(self, x):
        """``F(x)``, the residual branch alone (without the scalings β and α)."""
        return self._branch(x)[0]

    def _branch(self, x):
        """``(F(x), pre)`` with ``pre`` the pre-activated input of a full pre-activation block
        (what its projection shortcut sees), else ``x``."""
        layers, norms, acts = list(self.layers), list(self.norms), list(self.acts)
        k, order = len(layers), self.order
        if order == "full_preact":
            pre = acts[0](norms[0](x))
            h = layers[0](pre)
            for i in range(1, k):
                h = layers[i](acts[i](norms[i](h)))
            return h, pre
        h = acts[k](x) if order == "relu_preact" else x
        for i in range(k):
            h = layers[i](h)
            if order == "bn_after_add" and i == k - 1:
                break
            h = norms[i](h)
            if i < k - 1 or order == "relu_before_add":
                h = acts[i](h)
        return h, x

    def terms(self, x) -> tuple:
        """``(skip, branch)``: the two summands ``λ·S(u)`` (``None`` for a plain block) and
        ``α·β·F(x)`` whose sum :meth:`post` turns into the block's output."""
        f, pre = self._branch(x)
        if self.beta != 1.0:
            f = f * self.beta
        if self.alpha is not None:
            f = f * self.alpha
        if self.shortcut is None:
            return None, f
        # full pre-activation: a projection shortcut sees the pre-activated input (He 2016)
        s = as_tensor(self.shortcut(x if isinstance(self.shortcut, Identity) else pre))
        return (s if self.lam == 1.0 else s * self.lam), f

    def post(self, z):
        """``P``: what follows the addition (``act`` for ``post``, ``act(N₂(·))`` for
        ``bn_after_add``, the identity for the other orders)."""
        if self.order == "post":
            return self.acts[-2](z)
        if self.order == "bn_after_add":
            return self.acts[-2](self.norms[-1](z))
        return z

    def forward(self, x):
        skip, branch = self.terms(x)
        return self.post(branch if skip is None else branch + skip)

    def extra_repr(self) -> str:
        kind = "residual" if self.residual else "plain"
        extras = [f"{self.in_features} -> {self.out_features}", kind, f"order={self.order}",
                  f"activation={self.act}"]
        if self.stride != 1:
            extras.append(f"stride={self.stride}")
        if self.beta != 1.0:
            extras.append(f"beta={self.beta}")
        if self.lam != 1.0:
            extras.append(f"lam={self.lam}")
        return ", ".join(extras)


class BasicBlock(ResidualBlock):
    """The CIFAR ResNet block: two 3×3 convolutions (see :class:`ResidualBlock`)."""

    _conv = True


class DenseBlock(ResidualBlock):
    """The fully connected block: linear layers and BatchNorm1d (see :class:`ResidualBlock`)."""

    _conv = False


class HighwayBlock(Module):
    """Srivastava et al. 2015: ``y = T(x)·H(x) + (1 − T(x))·C(x)``, ``T = sigmoid(conv(x) + b_T)``.

    ``H`` is a two-layer post-order branch, ``C`` the carry path (identity, or a projection when
    the shape changes) and ``b_T = gate_bias`` (negative: the block starts close to carrying).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *,
                 gate_bias: float = -2.0, norm: bool = True, activation: str = "relu",
                 shortcut: str = "projection", init: str = "he", dtype: str = "float64",
                 rng: Rng | int | None = None):
        super().__init__()
        if WIDENING.get(activation, 1) != 1:
            raise ValueError(f"highway blocks gate a carry of the branch's width: activation "
                             f"{activation!r} changes the width; use another activation")
        r = as_rng(rng)
        inner = BasicBlock(in_channels, out_channels, stride, residual=True, norm=norm,
                           activation=activation, shortcut=shortcut, init=init, dtype=dtype,
                           rng=r)
        self.h = inner
        self.gate = Conv2d(in_channels, out_channels, 3, stride, 1, bias=True, init=init,
                           dtype=dtype, rng=r)
        self.gate.bias.data = r.backend.xp.full(out_channels, gate_bias,
                                                dtype=r.backend.dtype(dtype),
                                                device=r.backend.device)
        self.gate_bias = gate_bias

    def forward(self, x):
        t = ops.sigmoid(self.gate(x))
        h = self.h.branch(x)
        carry = self.h.shortcut(x)
        return t * h + (1.0 - t) * carry

    def extra_repr(self) -> str:
        return f"gate_bias={self.gate_bias}"
