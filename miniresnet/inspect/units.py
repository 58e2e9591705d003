"""Orhan & Pitkow's three singularities, measured per layer: eliminated units, linearly
dependent units and overlapping units."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from miniresnet.inspect._common import check_module, hooked, host, untouched
from miniresnet.nn import layers
from miniresnet.tracing import as_tensor, no_grad


@dataclass
class UnitStatistics:
    """:func:`unit_statistics`'s result, keyed by module name (``named_modules``).

    Per activation that runs (a module of :data:`~miniresnet.nn.layers.ACTIVATIONS`' classes; a
    module run twice gets ``name[1]`` for its second call):

    ``active``
        (units,) the fraction of samples (times spatial positions, for feature maps) on which
        each unit's output is > 0.
    ``eliminated``
        the fraction of units never active on x (``active == 0``; apply another threshold to
        ``active`` for Orhan & Pitkow's "inactive on ≥ 99 % of inputs").
    ``participation_ratio``
        ``(Σλ)² / Σλ²`` of the eigenvalues λ of the units' covariance over samples (positions
        count as samples): from 1 (rank one, fully linearly dependent) to the number of units
        (isotropic); NaN when every unit is constant.

    Per ``Linear`` and ``Conv2d`` layer:

    ``overlap``
        the largest ``|cos|`` between two output units' incoming weight vectors (rows of the
        weight, a convolution's flattened over input channels and kernel): 1 for duplicated
        units; NaN with fewer than two nonzero rows.
    """

    active: dict[str, np.ndarray]
    eliminated: dict[str, float]
    participation_ratio: dict[str, float]
    overlap: dict[str, float]


def _overlap(weight: np.ndarray) -> float:
    rows = weight.reshape(weight.shape[0], -1)
    norms = np.linalg.norm(rows, axis=1)
    rows = rows[norms > 0] / norms[norms > 0, None]
    if len(rows) < 2:
        return math.nan
    cos = np.abs(rows @ rows.T)
    np.fill_diagonal(cos, -1.0)
    return float(min(cos.max(), 1.0))


def unit_statistics(model, x) -> UnitStatistics:
    """Eliminated units, linear dependence and overlap per layer on the inputs ``x``
    (Orhan & Pitkow 2018's three singularities); see :class:`UnitStatistics`.

    The model runs once in its own mode (training-mode batch norm uses the batch's statistics
    and updates nothing) and is left as it was.

    Cost
    ----
    One forward pass (O(L) in depth); per activation with C units seen on S samples × positions,
    an O(S·C²) covariance on the device and an O(C²) transfer to the host.
    """
    model = check_module(model, "unit_statistics")
    kinds = tuple(set(layers.ACTIVATIONS.values()))
    names = {m: name for name, m in model.named_modules()}
    seen: dict[str, tuple] = {}
    calls: dict = {}

    def observe(module, _inputs, output):
        h = as_tensor(output)
        xp, raw = h.backend.xp, h.raw
        if raw.ndim == 4:  # units are channels; every position is a sample
            raw = xp.permute_dims(raw, (0, 2, 3, 1))
        raw = xp.reshape(raw, (-1, raw.shape[-1]))
        active = xp.mean(xp.astype(raw > 0, raw.dtype), axis=0)
        centred = raw - xp.mean(raw, axis=0, keepdims=True)
        cov = xp.matmul(xp.matrix_transpose(centred), centred) / raw.shape[0]
        j = calls[module] = calls.get(module, -1) + 1
        seen[names[module] + (f"[{j}]" if j else "")] = (active, cov)

    with untouched(model):
        with hooked((m for m in model.modules() if isinstance(m, kinds)), observe), no_grad():
            model(x)
    stats = UnitStatistics({}, {}, {}, {})
    for key, (active, cov) in seen.items():
        a, c = host(active), host(cov)
        stats.active[key] = a
        stats.eliminated[key] = float(np.mean(a == 0))
        square = float(np.sum(c * c))  # Σλ² = ‖C‖_F², Σλ = tr C: no eigendecomposition
        stats.participation_ratio[key] = float(np.trace(c)) ** 2 / square if square else math.nan
    for name, m in model.named_modules():
        if isinstance(m, layers.Linear | layers.Conv2d):
            stats.overlap[name] = _overlap(host(m.weight))
    return stats
