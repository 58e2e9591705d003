"""miniresnet: an exact laboratory for why residual networks train when deep.

The engine: :class:`Tensor` (with an eager tape: ``requires_grad=True`` and ``backward()``),
function transforms (:func:`grad`, :func:`vjp`, :func:`jvp`, :func:`jacobian`, :func:`hvp`),
array operations (``miniresnet.ops``, also exported here), neural-network functions
(:mod:`miniresnet.functional`) and swappable backends (:func:`use_backend`).
"""

from miniresnet import ops
from miniresnet import primitives as _primitives  # noqa: F401  (registers the primitive table)
from miniresnet import functional
from miniresnet.backends import BackendUnavailable, available_backends, get_backend
from miniresnet.config import current_backend, to_backend, use_backend
from miniresnet.ops import *  # noqa: F403
from miniresnet.tracing import Primitive, Tensor, bind, detect_anomaly, is_grad_enabled, no_grad
from miniresnet.transforms import grad, hvp, jacobian, jvp, value_and_grad, vjp
from miniresnet.creation import ones, tensor, zeros

__version__ = "0.1.0"
