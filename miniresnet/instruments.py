"""Training instruments: measurements taken during ``fit(..., instruments=[...])``, in the
spirit of Cockpit's page of gauges, and :func:`plot_cockpit` to draw a run's page.

An instrument is any object with a ``name`` (str), ``every`` (run every that many steps) and a
call ``instrument(step) -> value`` receiving a :class:`~miniresnet.train.TrainingStep` (the
model, optimiser, minibatch, loss, gradients and the parameters before and after the step);
``fit`` appends ``(step, value)`` to ``history.instruments[name]``. Values here are JSON-ready
(floats, lists and dicts of floats). Per-group values are dicts ``{"stem": s, "blocks": [b_1,
.., b_L], "head": h, "total": t}`` over the network's parameter groups, as in
:func:`~miniresnet.inspect.gradient_snr`.

Built-ins (default names in brackets): :class:`GradientNorm` ("grad_norm"),
:class:`GradientSNR` ("grad_snr"), :class:`UpdateRatio` ("update_ratio"),
:class:`DistanceFromInit` ("distance"), :class:`StepAlpha` ("alpha"); :class:`Probe` wraps
any function of the step. Instruments that need extra passes evaluate on the model without
changing it (batch-norm running statistics frozen); ``fit`` also puts the training state back
after them, so a run's weights are bit-identical with and without instruments.

Adding an instrument, e.g. the Hessian's top eigenvalue every 50 steps: subclass
:class:`Instrument` and implement ``measure(step)`` (or wrap a function in :class:`Probe`),
evaluating at ``step.params_after`` (what ``step.model`` holds) or at ``step.params_before``
(with :func:`at_parameters`) on ``step.x, step.y``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from miniresnet import functional as F
from miniresnet.inspect._common import batch_statistics, untouched
from miniresnet.inspect.per_sample import per_sample_gradients
from miniresnet.nn.layers import BatchNorm1d, BatchNorm2d
from miniresnet.nn.models import Network
from miniresnet.nn.module import functional_call, substituted
from miniresnet.tracing import as_tensor
from miniresnet.transforms import value_and_grad

BATCH_STATS = ("frozen", "running")


class Instrument:
    """Base of the built-in instruments: a ``name``, ``every`` and ``measure(step)``."""

    default_name = "instrument"

    def __init__(self, every: int = 1, name: str | None = None):
        where = type(self).__name__
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"{where}: every must be a positive int (steps between "
                             f"measurements), got {every!r}")
        name = self.default_name if name is None else name
        if not isinstance(name, str) or not name:
            raise TypeError(f"{where}: name must be a non-empty str, got {name!r}")
        self.every, self.name = every, name

    def __call__(self, step):
        return self.measure(step)

    def measure(self, step):
        raise NotImplementedError(f"{type(self).__name__} must implement measure(step)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(every={self.every}, name={self.name!r})"


class Probe(Instrument):
    """Any function ``fn(step) -> value`` as an instrument named ``name``."""

    def __init__(self, name: str, fn, every: int = 1):
        if not callable(fn):
            raise TypeError(f"Probe: fn must be callable as fn(step), got {type(fn).__name__}")
        super().__init__(every, name)
        self.fn = fn

    def measure(self, step):
        return self.fn(step)


# -- shared pieces ------------------------------------------------------------------------------


def _groups(model) -> dict:
    """Parameter names per group: ``stem``, ``blocks`` (a list), ``head``, ``total``."""
    if not isinstance(model, Network):
        raise TypeError(f"instruments: the model must be a Network (nn.resnet_cifar, nn.mlp) "
                        f"to group its parameters by block, got {type(model).__name__}")
    name_of = {id(p): n for n, p in model.named_parameters()}

    def of(module):
        return [name_of[id(p)] for p in module.parameters()]

    return {"stem": of(model.stem), "blocks": [of(b) for b in model.blocks],
            "head": of(model.head), "total": list(name_of.values())}


def _squares(model, arrays) -> dict:
    """Per-group sums of squares of ``arrays`` (name -> backend array), computed on the
    device and brought to the host in one transfer."""
    groups = _groups(model)
    names = groups["total"]
    first = as_tensor(arrays[names[0]])
    xp = first.backend.xp
    wide = xp.float64
    per = xp.stack([xp.sum(xp.astype(arrays[n], wide) ** 2) for n in names])
    values = dict(zip(names, first.backend.to_numpy(per).tolist()))

    def total(members):
        return float(sum(values[n] for n in members))

    return {"stem": total(groups["stem"]), "blocks": [total(b) for b in groups["blocks"]],
            "head": total(groups["head"]), "total": total(groups["total"])}


def _apply(fn, *grouped) -> dict:
    """``fn`` applied entry by entry to per-group dicts of the same layout."""
    return {"stem": fn(*(g["stem"] for g in grouped)),
            "blocks": [fn(*v) for v in zip(*(g["blocks"] for g in grouped))],
            "head": fn(*(g["head"] for g in grouped)),
            "total": fn(*(g["total"] for g in grouped))}


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return math.nan if a == 0 else math.inf
    return a / b


def _differences(a, b) -> dict:
    return {n: as_tensor(a[n]).raw - as_tensor(b[n]).raw for n in a}


@contextmanager
def at_parameters(model, params):
    """``model`` with ``params`` (name -> array, e.g. ``step.params_before``; buffers too) as
    its parameters, batch-norm running statistics frozen and modes put back on exit."""
    with untouched(model), substituted(model, dict(params)):
        yield model


# -- the built-ins ------------------------------------------------------------------------------


class GradientNorm(Instrument):
    """The L2 norm of the step's minibatch gradient (before clipping) per group.

    Cost: none beyond a sum of squares per parameter (the gradient is the step's own)."""

    default_name = "grad_norm"

    def measure(self, step) -> dict:
        return _apply(math.sqrt, _squares(step.model, step.gradients))


class UpdateRatio(Instrument):
    """``‖θ_after − θ_before‖ / ‖θ_before‖`` per group: the step's relative size (momentum,
    weight decay and clipping included). ``inf`` for a group of zero weights that moved,
    ``nan`` for one that did not.

    Cost: two sums of squares per parameter."""

    default_name = "update_ratio"

    def measure(self, step) -> dict:
        delta = _squares(step.model, _differences(step.params_after, step.params_before))
        weights = _squares(step.model, step.params_before)
        return _apply(lambda d, w: _ratio(math.sqrt(d), math.sqrt(w)), delta, weights)


class DistanceFromInit(Instrument):
    """``‖θ_after − θ_0‖`` per group, and ``"relative"``: the total over ``‖θ_0‖``.

    ``θ_0`` is ``initial`` (name -> array) if given, else the parameters before the first step
    this instrument sees (the initialisation when training starts there): use one instance
    per run.

    Cost: two sums of squares per parameter."""

    default_name = "distance"

    def __init__(self, every: int = 1, name: str | None = None, initial=None):
        super().__init__(every, name)
        self.initial = None if initial is None else dict(initial)

    def measure(self, step) -> dict:
        if self.initial is None:
            self.initial = dict(step.params_before)
        dist = _squares(step.model, _differences(step.params_after, self.initial))
        out = _apply(math.sqrt, dist)
        out["relative"] = _ratio(out["total"],
                                 math.sqrt(_squares(step.model, self.initial)["total"]))
        return out


class GradientSNR(Instrument):
    """The gradient signal-to-noise ratio over the samples of the step's minibatch, per group:
    ``‖ḡ‖² / mean_n ‖g_n − ḡ‖²`` with ``g_n`` sample n's gradient at ``θ_before``
    (:func:`~miniresnet.inspect.per_sample.per_sample_gradients`; the definition of
    :func:`~miniresnet.inspect.gradient_snr` with one-sample minibatches).

    Per-sample gradients need independent samples, so batch norm is in evaluation mode with,
    by ``batch_stats``, ``"frozen"`` (default): the minibatch's own mean and variance held
    constant (the function training normalises with, less its derivative through the
    statistics), or ``"running"``: the running statistics before the step (what evaluation
    would have used at ``θ_before``; at initialisation they are 0 and 1).

    Cost: a forward pass (``"frozen"``), then :func:`~miniresnet.inspect.per_sample.
    per_sample_gradients` on the B samples, ``chunk`` (default 16) at a time: ⌈B/chunk⌉
    forward passes and reverse passes carrying ``chunk`` cotangents (memory about chunk² × one
    sample's activations; ``chunk=None``: all B in one pass, B² × and B times the work of a
    reverse pass), and B × P numbers on the host.
    """

    default_name = "grad_snr"

    def __init__(self, every: int = 1, name: str | None = None, batch_stats: str = "frozen",
                 chunk: int | None = 16):
        super().__init__(every, name)
        if batch_stats not in BATCH_STATS:
            raise ValueError(f"GradientSNR: unknown batch_stats {batch_stats!r}; valid: "
                             f"{', '.join(map(repr, BATCH_STATS))}")
        self.batch_stats, self.chunk = batch_stats, chunk

    def measure(self, step) -> dict:
        model = step.model
        with at_parameters(model, {**step.params_before, **step.buffers_before}):
            norms = [m for m in model.modules()
                     if isinstance(m, BatchNorm1d | BatchNorm2d) and m.training]
            stats = (batch_statistics(model, norms, step.x, "instruments.GradientSNR")
                     if norms and self.batch_stats == "frozen" else {})
            with substituted(model, stats):
                for m in norms:  # the samples decoupled; untouched puts the modes back
                    object.__setattr__(m, "training", False)
                result = per_sample_gradients(model, step.x, step.y, chunk=self.chunk)
        s = result.snr_summary()
        return {"stem": s.stem, "blocks": s.blocks.tolist(), "head": s.head, "total": s.total}


def step_alpha(loss_before: float, loss_after: float, slope_before: float,
               slope_after: float) -> float:
    """Where a step landed on the quadratic fitted along it (Cockpit's α).

    Along the step, ``f(τ) = L(θ + τ Δ)`` with ``f(0), f(1)`` the losses and ``f'(0) = g(θ)·Δ``,
    ``f'(1) = g(θ + Δ)·Δ`` the slopes before and after. The quadratic ``q(τ) = c₀ + c₁τ + c₂τ²``
    is fitted to these four values by (unweighted) least squares (exact when ``f`` is
    quadratic); with ``τ* = −c₁ / 2c₂`` its minimum,

        α = (1 − τ*) / |τ*|,

    so for a step towards the minimum (τ* > 0): −1 = no move, 0 = landed at the minimum,
    +1 = overshot to the mirror point of equal loss, > 1 = beyond it; a step away from the
    minimum (τ* < 0) gives α > 1. NaN when ``q`` has no minimum (c₂ ≤ 0).
    """
    a = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    b = np.array([loss_before, loss_after, slope_before, slope_after], dtype=np.float64)
    if not np.all(np.isfinite(b)):
        return math.nan
    c = np.linalg.lstsq(a, b, rcond=None)[0]
    if not c[2] > 0:
        return math.nan
    t = -c[1] / (2 * c[2])
    return math.inf if t == 0 else float((1 - t) / abs(t))


class StepAlpha(Instrument):
    """Cockpit's α of the step (:func:`step_alpha`) on the step's minibatch and loss (the
    mean cross-entropy, without weight decay), the model in its own mode (training: batch
    norm with the minibatch's statistics, as the step saw it; running statistics frozen).
    Returns ``{"alpha", "loss_before", "loss_after", "slope_before", "slope_after"}``.

    Cost: one forward and one reverse pass at ``θ_after``."""

    default_name = "alpha"

    def measure(self, step) -> dict:
        model = step.model
        names = list(step.params_after)
        delta = _differences(step.params_after, step.params_before)
        with untouched(model):

            def loss(*arrays):
                out = functional_call(model, dict(zip(names, arrays)), step.x)
                return F.cross_entropy(out, as_tensor(step.y))

            f1, g1 = value_and_grad(loss, argnums=tuple(range(len(names))))(
                *(step.params_after[n] for n in names))
        be = as_tensor(f1).backend
        xp, wide = be.xp, be.xp.float64

        def dot(a, b):
            return xp.sum(xp.astype(a, wide) * xp.astype(b, wide))

        both = xp.stack([xp.astype(as_tensor(f1).raw, wide),
                         sum(dot(as_tensor(step.gradients[n]).raw, delta[n]) for n in names),
                         sum(dot(as_tensor(g).raw, delta[n]) for n, g in zip(names, g1))])
        f1, d0, d1 = be.to_numpy(both).tolist()
        return {"alpha": step_alpha(step.loss, f1, d0, d1), "loss_before": step.loss,
                "loss_after": f1, "slope_before": d0, "slope_after": d1}


class HessianTop(Instrument):
    """The top ``k`` eigenvalues of the minibatch loss's Hessian at ``θ_after``
    (:func:`~miniresnet.inspect.hessian_top`, ``steps`` Lanczos steps, batch norm ``bn``:
    "frozen", the minibatch's statistics held constant, by default), with the step's learning
    rate: ``{"values": [λ_1, ..], "lr": lr}``. Gradient descent on a quadratic is stable only
    while ``lr · λ_1 < 2``, which :func:`plot_cockpit` draws.

    Cost: ``steps`` Hessian-vector products (each about 4 forward passes' work)."""

    default_name = "hessian_top"

    def __init__(self, every: int = 50, name: str | None = None, *, k: int = 1,
                 steps: int = 20, bn: str = "frozen"):
        super().__init__(every, name)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"HessianTop: k must be a positive int, got {k!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < k:
            raise ValueError(f"HessianTop: steps must be an int >= k={k}, got {steps!r}")
        self.k, self.steps, self.bn = k, steps, bn

    def measure(self, step) -> dict:
        from miniresnet.inspect.curvature import hessian_top

        top = hessian_top(step.model, step.x, step.y, self.k, steps=self.steps, bn=self.bn)
        return {"values": [float(v) for v in top.values], "lr": float(step.lr)}


def cockpit(every: int = 1, snr_every: int | None = None,
            hessian_every: int | None = None) -> list[Instrument]:
    """The built-ins under their default names, as :func:`plot_cockpit` draws them; the SNR
    (costly) every ``snr_every`` steps (default: ``every``) and the Hessian's top eigenvalue
    (costlier) every ``hessian_every`` steps (default: not recorded)."""
    return [GradientNorm(every), GradientSNR(snr_every or every), UpdateRatio(every),
            DistanceFromInit(every), StepAlpha(every),
            *([HessianTop(hessian_every)] if hessian_every else [])]


# -- the figure ---------------------------------------------------------------------------------


def _series(history, name: str, key: str):
    """``(steps, values)`` of ``key`` in instrument ``name``'s records (key ``"blocks"``: one
    column per block)."""
    records = history.instruments.get(name, [])
    steps = np.array([s for s, _ in records], dtype=float)
    if key == "blocks":
        return steps, np.array([v["blocks"] for _, v in records], dtype=float)
    return steps, np.array([v[key] for _, v in records], dtype=float)


def plot_cockpit(history, path) -> Path:
    """Draw a run's one-page cockpit as a PNG at ``path`` and return the path.

    Eight panels over the steps: the minibatch loss, the gradient norm per block, the gradient
    SNR, the update ratio per block, the distance from initialisation, α, the Hessian's top
    eigenvalue and the learning rate times it (beside 2, the stability limit of gradient
    descent on a quadratic), from
    ``history.step_loss`` and the built-ins' records under their default names (a panel
    whose instrument was not recorded says so). Matplotlib's Agg canvas: no display needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 11), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 2).ravel()
    steps_per_epoch = len(history.step_loss) // max(1, len(history.records)) or 1
    first = history.records[0]["epoch"] * steps_per_epoch if history.records else 0

    def missing(ax, name):
        ax.text(0.5, 0.5, f"{name!r} not recorded", ha="center", va="center",
                transform=ax.transAxes, color="0.4")

    def per_block(ax, name, title, log=True):
        ax.set_title(title)
        if name not in history.instruments:
            return missing(ax, name)
        steps, blocks = _series(history, name, "blocks")
        cmap = _colours(blocks.shape[1])
        for j in range(blocks.shape[1]):
            ax.plot(steps, blocks[:, j], color=cmap[j], lw=1,
                    label=f"block {j + 1}" if blocks.shape[1] <= 12 else None)
        for key, style in (("stem", ":"), ("head", "--"), ("total", "-")):
            ax.plot(*_series(history, name, key), color="k", ls=style, lw=1.4, label=key)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=6, ncol=2)

    ax = axes[0]
    ax.set_title("minibatch loss")
    if history.step_loss:
        ax.plot(np.arange(len(history.step_loss)) + first, history.step_loss, lw=0.8,
                color="C0")
        ax.set_yscale("log")
    per_block(axes[1], "grad_norm", "gradient norm (minibatch, before clipping)")
    per_block(axes[2], "grad_snr", "gradient SNR over the minibatch's samples")
    per_block(axes[3], "update_ratio", "update / weight norm")
    per_block(axes[4], "distance", "distance from initialisation ‖θ − θ₀‖", log=False)
    if "distance" in history.instruments:
        relative = history.instruments["distance"][-1][1]["relative"]
        axes[4].set_title(f"distance from initialisation ‖θ − θ₀‖ (last: {relative:.3g} ‖θ₀‖)")
    ax = axes[5]
    ax.set_title("α: −1 no move, 0 at the minimum, 1 mirror point")
    if "alpha" in history.instruments:
        steps, alpha = _series(history, "alpha", "alpha")
        ax.axhspan(-1, 1, color="C2", alpha=0.1)
        ax.axhline(0, color="k", lw=0.8)
        ax.scatter(steps, np.clip(alpha, -3, 3), s=8, color="C1")
        ax.set_ylim(-3.2, 3.2)
    else:
        missing(ax, "alpha")
    top, sharp = axes[6], axes[7]
    top.set_title("Hessian's top eigenvalue λ₁ (minibatch)")
    sharp.set_title("learning rate × λ₁ (GD on a quadratic is stable below 2)")
    if "hessian_top" in history.instruments:
        records = history.instruments["hessian_top"]
        steps = np.array([s for s, _ in records], dtype=float)
        values = np.array([v["values"][0] for _, v in records], dtype=float)
        top.plot(steps, values, "o-", ms=3, color="C3")
        sharp.plot(steps, values * np.array([v["lr"] for _, v in records]), "o-", ms=3,
                   color="C3")
        sharp.axhline(2.0, color="k", lw=0.8, ls="--", label="2")
        sharp.legend(fontsize=7)
    else:
        missing(top, "hessian_top")
        missing(sharp, "hessian_top")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("training cockpit")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _colours(n: int) -> list:
    """``n`` colours from light to dark, block 1 to block n."""
    from matplotlib import colormaps

    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.9, max(n, 1))]
