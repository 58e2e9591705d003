"""miniresnet: an exact laboratory for why residual networks train when deep.

The engine: :class:`Tensor` (with an eager tape: ``requires_grad=True`` and ``backward()``),
function transforms (:func:`grad`, :func:`vjp`, :func:`jvp`, :func:`jacobian`, :func:`hvp`),
array operations (``miniresnet.ops``, also exported here), neural-network functions
(:mod:`miniresnet.functional`) and swappable backends (:func:`use_backend`).
"""

from miniresnet import functional, normalization, ops
from miniresnet import primitives as _primitives  # noqa: F401  (registers the primitive table)
from miniresnet.backend_choice import current_backend, use_backend
from miniresnet.backends import BackendUnavailable, available_backends, get_backend
from miniresnet.creation import ones, tensor, to_backend, to_numpy, zeros
from miniresnet.normalization import *  # noqa: F403
from miniresnet.ops import *  # noqa: F403
from miniresnet.tracing import Primitive, Tensor, bind, detect_anomaly, is_grad_enabled, no_grad
from miniresnet.transforms import grad, hvp, jacobian, jvp, value_and_grad, vjp

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable", "Primitive", "Tensor", "available_backends", "bind", "current_backend",
    "detect_anomaly", "functional", "get_backend", "grad", "hvp", "is_grad_enabled", "jacobian",
    "jvp", "no_grad", "ones", "ops", "tensor", "to_backend", "to_numpy", "use_backend",
    "value_and_grad", "vjp", "zeros", *ops.__all__, *normalization.__all__,
]
