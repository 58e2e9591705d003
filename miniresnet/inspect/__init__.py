"""Inspection: the exact quantities the residual-network papers argue about, for one model at
one input, as host NumPy data ready to plot.

Notation: ``h_0 = model.stem(x)``, ``h_l = block_l(h_{l-1})`` for l = 1..L (blocks are
numbered from 1), ``out = model.head(h_L)``. The scalar differentiated is the mean
cross-entropy when ``y`` is given, otherwise ``sum(out * c)`` with ``c`` the ``cotangent``
(default: standard normal, seed 0). A residual block computes ``out = P(λ·S(u) + α·β·F(x))``
(see :meth:`~miniresnet.nn.ResidualBlock.terms`).

Every function works on every backend, returns host NumPy arrays or Python numbers and leaves
the model as it was: parameters, their ``.grad``, batch-norm running statistics and train/eval
mode. In training mode, batch norm normalises with the statistics of the batch it sees (so the
samples of a batch are coupled) and updates nothing.
"""

from __future__ import annotations

from miniresnet.inspect.curvature import (
    Eigenpairs,
    Lanczos,
    TraceEstimate,
    ggn_top,
    ggn_vector_product,
    hessian_density,
    hessian_top,
    hessian_trace,
    hessian_vector_product,
    lanczos,
)
from miniresnet.inspect.gradients import (
    GradientSNR,
    autocorrelation,
    gradient_correlation,
    gradient_snr,
    input_gradients,
)
from miniresnet.inspect.lesion import accuracy, lesioned
from miniresnet.inspect.paths import (
    path_gradients,
    path_gradients_sampled,
    path_summary,
    shortest_range,
    split_block,
)
from miniresnet.inspect.per_sample import PerSampleGradients, per_sample_gradients
from miniresnet.inspect.profile import Profile, block_jacobian, profile, stream_jacobian
from miniresnet.inspect.spectra import Hessian, hessian, singular_values
from miniresnet.inspect.units import UnitStatistics, unit_statistics

__all__ = [
    "Eigenpairs", "GradientSNR", "Hessian", "Lanczos", "PerSampleGradients", "Profile",
    "TraceEstimate",
    "UnitStatistics", "accuracy", "autocorrelation", "block_jacobian", "ggn_top",
    "ggn_vector_product", "gradient_correlation", "gradient_snr", "hessian", "hessian_density",
    "hessian_top", "hessian_trace", "hessian_vector_product", "input_gradients", "lanczos",
    "lesioned", "path_gradients", "path_gradients_sampled", "path_summary",
    "per_sample_gradients", "profile",
    "shortest_range", "singular_values", "split_block", "stream_jacobian", "unit_statistics",
]
