"""Gradients as functions of the input and of the minibatch: Balduzzi et al.'s shattering
statistics (input gradients over a grid, their autocorrelation, their correlation across
random initialisations) and the gradient signal-to-noise ratio over minibatches."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from miniresnet import functional as F
from miniresnet.inspect._common import (
    batch_statistics,
    check_module,
    check_network,
    host,
    host_data,
    untouched,
)
from miniresnet.nn.layers import BatchNorm1d, BatchNorm2d
from miniresnet.nn.module import functional_call, substituted
from miniresnet.tracing import as_tensor
from miniresnet.transforms import grad, vjp

BATCH_STATS = ("frozen", "coupled")


# -- input gradients ----------------------------------------------------------------------------


def input_gradients(model, x, *, output: int = 0, batch_stats: str = "frozen") -> np.ndarray:
    """The gradient of output unit ``output`` at every sample with respect to that sample's
    input: ``g[n] = ∂ out[n, output] / ∂ x[n]``, of ``x``'s shape.

    For 1-D inputs on a grid this is Balduzzi et al.'s "gradient as a function of x" (feed it to
    :func:`autocorrelation` or, over several initialisations, :func:`gradient_correlation`).

    Parameters
    ----------
    model : Module
        Any module mapping ``(N, ...)`` to ``(N, K)`` (a ``Network`` from ``nn.mlp`` or
        ``nn.resnet_cifar``); it is left as it was.
    x : array
        The inputs, samples on axis 0.
    output : int
        The output unit, an index into ``out``'s axis 1 (0 to K − 1).
    batch_stats : {"frozen", "coupled"}
        Only matters for batch norm in training mode, which couples the samples of a batch.
        ``"frozen"`` holds this batch's statistics (mean and biased variance) constant, so each
        sample's gradient is its own; ``"coupled"`` differentiates through them: ``g[n]`` is
        then the diagonal block ``∂ out[n, output] / ∂ x[n]`` of the batch Jacobian. In
        evaluation mode, or without batch norm, the two are the same.

    Cost
    ----
    One forward and one reverse pass (O(L) in depth); ``"frozen"`` with training-mode batch
    norm adds one forward pass to read the statistics; ``"coupled"`` with training-mode batch
    norm carries N cotangents through one reverse pass (N times its work and memory).
    """
    model = check_module(model, "input_gradients")
    if batch_stats not in BATCH_STATS:
        raise ValueError(f"inspect.input_gradients: unknown batch_stats {batch_stats!r}; valid: "
                         f"{', '.join(map(repr, BATCH_STATS))}")
    if isinstance(output, bool) or not isinstance(output, int | np.integer):
        raise TypeError(f"inspect.input_gradients: output must be an int (an output unit), got "
                        f"{output!r}")
    x = as_tensor(x)
    if x.ndim < 1:
        raise ValueError("inspect.input_gradients: x must have a sample axis (axis 0), got a "
                         "scalar")
    with untouched(model):
        norms = [m for m in model.modules()
                 if isinstance(m, BatchNorm1d | BatchNorm2d) and m.training]
        frozen = {}
        if norms and batch_stats == "frozen":
            frozen = batch_statistics(model, norms, x, "inspect.input_gradients")
            for m in norms:  # evaluation mode with this batch's statistics as the running ones
                object.__setattr__(m, "training", False)
        with substituted(model, frozen):
            out, vjp_fn = vjp(model, x)
            out = as_tensor(out)
            if out.ndim != 2 or out.shape[0] != x.shape[0]:
                raise ValueError(f"inspect.input_gradients: the model maps x of shape {x.shape} "
                                 f"to {out.shape}; it must give (N, K) outputs, one row per "
                                 "sample")
            n, k = out.shape
            if not 0 <= output < k:
                raise IndexError(f"inspect.input_gradients: output={output} is out of range; "
                                 f"the model has {k} output units, 0 to {k - 1}")
            xp, dev = out.backend.xp, out.raw.device
            unit = xp.astype(xp.arange(k, device=dev) == int(output), out.dtype)
            if not norms or batch_stats == "frozen":  # samples independent: one cotangent
                ct = xp.broadcast_to(xp.reshape(unit, (1, k)), (n, k))
                return host(vjp_fn(ct)[0])
            # coupled: cotangent n is unit `output` of sample n; keep block (n, n) of the result
            eye = xp.eye(n, dtype=out.dtype, device=dev)
            ct = xp.reshape(eye, (n, n, 1)) * xp.reshape(unit, (1, 1, k))
            g = as_tensor(vjp_fn(ct)[0]).raw
            rows = xp.reshape(g, (n * n, -1))
            diag = xp.take(rows, xp.arange(0, n * n, n + 1, device=dev), axis=0)
            return host(xp.reshape(diag, x.shape))


# -- correlations -------------------------------------------------------------------------------


def _check_lag(max_lag, length: int, name: str) -> int:
    if isinstance(max_lag, bool) or not isinstance(max_lag, int | np.integer):
        raise TypeError(f"inspect.{name}: max_lag must be an int, got {max_lag!r}")
    if not 0 <= max_lag < length:
        raise ValueError(f"inspect.{name}: max_lag={max_lag} is out of range for a series of "
                         f"length {length}; valid: 0 to {length - 1}")
    return int(max_lag)


def autocorrelation(series, max_lag: int) -> np.ndarray:
    """The sample autocorrelation function of ``series`` along axis 0, lags 0 to ``max_lag``.

    ``r[k] = Σ_{t<M−k} (s_t − s̄)(s_{t+k} − s̄) / Σ_t (s_t − s̄)²`` with ``s̄`` the mean of the
    series (the standard estimator, as in Box & Jenkins; ``r[0] = 1``). A series of shape
    ``(M, ...)`` is a set of series, one per trailing index, each treated on its own: the result
    has shape ``(max_lag + 1, ...)`` (average it over the trailing axes, e.g. over networks, for
    one curve). A constant series has no autocorrelation: its entries are NaN.

    Cost: O(M · max_lag) on the host.
    """
    s = host_data(series, "autocorrelation", "series")
    if s.ndim < 1 or s.shape[0] < 2:
        raise ValueError(f"inspect.autocorrelation: series must have at least 2 points along "
                         f"axis 0, got shape {s.shape}")
    max_lag = _check_lag(max_lag, s.shape[0], "autocorrelation")
    d = s - s.mean(axis=0)
    norm = np.sum(d * d, axis=0)
    # a constant series is recognised by its values, not by norm == 0: its rounded mean may
    # differ from its value, leaving a constant d != 0 (and r = 1 - k/M) on some machines
    defined = (norm > 0) & np.any(s != s[:1], axis=0)
    acf = np.stack([np.sum(d[: len(d) - k] * d[k:], axis=0) for k in range(max_lag + 1)])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(defined, acf / np.where(defined, norm, 1.0), np.nan)


def gradient_correlation(grads, max_lag: int | None = None) -> np.ndarray:
    """Balduzzi et al.'s correlation of gradients across random initialisations.

    ``grads`` has shape ``(nets, M)``: the gradient ``∇ᵢ`` at grid point ``i`` for each of
    ``nets`` independently initialised networks (e.g. :func:`input_gradients` of each on the
    same grid). Their covariance is ``C(i, j) = E[(∇ᵢ − E∇ᵢ)(∇ⱼ − E∇ⱼ)]`` with ``E`` the mean
    over networks, and the correlation ``R(i, j) = C(i, j) / √(C(i, i) C(j, j))``.

    Returns the ``(M, M)`` matrix ``R``, or with ``max_lag`` the mean correlation at each lag,
    ``mean_i R(i, i + k)`` for k = 0..max_lag, shape ``(max_lag + 1,)``. Grid points where the
    gradient does not vary across networks have no correlation (NaN, left out of the means).

    Cost: O(nets · M²) on the host.
    """
    g = host_data(grads, "gradient_correlation", "grads")
    if g.ndim != 2 or g.shape[0] < 2:
        raise ValueError(f"inspect.gradient_correlation: grads must have shape (nets, M) with at "
                         f"least 2 networks, got shape {g.shape}")
    d = g - g.mean(axis=0)
    cov = d.T @ d / g.shape[0]
    sd = np.sqrt(np.diag(cov))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.outer(sd, sd)
    r[~np.isfinite(r)] = np.nan
    if max_lag is None:
        return r
    max_lag = _check_lag(max_lag, g.shape[1], "gradient_correlation")
    with np.errstate(invalid="ignore"):  # a lag with no defined pair is NaN
        return np.array([np.nanmean(np.diagonal(r, k)) if np.any(np.isfinite(np.diagonal(r, k)))
                         else np.nan for k in range(max_lag + 1)])


# -- gradient signal-to-noise ratio -------------------------------------------------------------


@dataclass
class GradientSNR:
    """:func:`gradient_snr`'s result: ``‖mean g‖² / mean ‖g − mean g‖²`` over minibatches.

    ``parameters`` maps each parameter name to its SNR; ``blocks`` has one entry per block
    (block l at index l − 1; NaN for a block without parameters); ``stem``, ``head`` and
    ``total`` group the stem's, the head's and all parameters. A group whose gradient is the
    same on every minibatch has SNR ``inf`` (``nan`` if that gradient is 0).
    """

    parameters: dict[str, float]
    blocks: np.ndarray
    stem: float
    head: float
    total: float
    batches: int


def _snr(gs: list[np.ndarray]) -> float:
    """SNR of one group from its per-batch flattened gradients."""
    if not gs or gs[0].size == 0:
        return math.nan
    g = np.stack(gs)
    mean = g.mean(axis=0)
    signal = float(mean @ mean)
    noise = float(np.mean(np.sum((g - mean) ** 2, axis=1)))
    if noise == 0.0:
        return math.inf if signal > 0 else math.nan
    return signal / noise


def gradient_snr(model, batches: Iterable) -> GradientSNR:
    """The gradient signal-to-noise ratio over minibatches, per parameter tensor and per block.

    For each group of parameters, with ``g_b`` its gradient of the mean cross-entropy on
    minibatch b (b = 1..B) and ``ḡ = mean_b g_b``: ``SNR = ‖ḡ‖² / mean_b ‖g_b − ḡ‖²``.

    Parameters
    ----------
    model : Network
        Its mode decides batch norm: training mode normalises each minibatch with its own
        statistics (and updates nothing); the model is left as it was.
    batches : iterable of (x, y)
        At least two minibatches of inputs and integer labels.

    Cost
    ----
    One forward and one reverse pass per minibatch (O(L) in depth each); the B gradients are
    kept on the host (B × the number of parameters).
    """
    model = check_network(model, "gradient_snr")
    names = [n for n, _ in model.named_parameters()]
    params = [p.raw for p in model.parameters()]
    if not names:
        raise ValueError("inspect.gradient_snr: the model has no parameters")
    per_batch: list[list[np.ndarray]] = []
    with untouched(model):
        for b, item in enumerate(batches):
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise TypeError(f"inspect.gradient_snr: batches must yield (x, y) pairs; item "
                                f"{b} is a {type(item).__name__}")
            x, y = item

            def loss(*arrays, x=x, y=y):
                return F.cross_entropy(functional_call(model, dict(zip(names, arrays)), x),
                                       as_tensor(y))

            gs = grad(loss, argnums=tuple(range(len(params))))(*params)
            per_batch.append([host(g).reshape(-1) for g in gs])
    if len(per_batch) < 2:
        raise ValueError(f"inspect.gradient_snr: needs at least 2 minibatches to measure the "
                         f"noise, got {len(per_batch)}")

    def group(indices) -> float:
        return _snr([np.concatenate([gs[i] for i in indices]) if indices else np.zeros(0)
                     for gs in per_batch])

    position = {id(p): i for i, p in enumerate(model.parameters())}

    def of(module) -> list[int]:
        return [position[id(p)] for p in module.parameters()]

    return GradientSNR(
        parameters={n: group([i]) for i, n in enumerate(names)},
        blocks=np.array([group(of(block)) for block in model.blocks]),
        stem=group(of(model.stem)), head=group(of(model.head)),
        total=group(list(range(len(names)))), batches=len(per_batch))
