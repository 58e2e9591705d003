"""Weight initialisers. Each returns a backend array drawn from a :class:`~miniresnet.backends.Rng`
(numbers are drawn on the host, so a seed gives the same network on every backend)."""

from __future__ import annotations

import math

from miniresnet.backend_choice import current_backend
from miniresnet.backends import Rng

_default = {"rng": None}


def seed(value: int) -> None:
    """Seed the generator used by layers created without an explicit ``rng``."""
    _default["rng"] = current_backend().rng(value)


def as_rng(rng: Rng | int | None) -> Rng:
    """An Rng on the current backend: ``rng`` itself, a new one seeded with an int, or the
    default generator (see :func:`seed`) when ``None``."""
    if isinstance(rng, Rng):
        return rng
    if rng is not None:
        return current_backend().rng(rng)
    if _default["rng"] is None or _default["rng"].backend is not current_backend():
        seed(0)
    return _default["rng"]


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of a linear (out, in) or conv (out, in, kh, kw) weight."""
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def he_normal(rng: Rng, shape, dtype="float64", gain: float = math.sqrt(2.0)):
    """He et al. 2015: N(0, gain² / fan_in); the default gain √2 suits ReLU."""
    return rng.normal(shape, dtype, std=gain / math.sqrt(fans(tuple(shape))[0]))


def xavier_normal(rng: Rng, shape, dtype="float64", gain: float = 1.0):
    """Glorot & Bengio 2010: N(0, gain² · 2 / (fan_in + fan_out))."""
    fan_in, fan_out = fans(tuple(shape))
    return rng.normal(shape, dtype, std=gain * math.sqrt(2.0 / (fan_in + fan_out)))


def orthogonal(rng: Rng, shape, dtype="float64", gain: float = 1.0):
    """Saxe et al. 2014: a random (semi-)orthogonal matrix over (out, in·kh·kw), times gain."""
    return rng.orthogonal(shape, dtype, gain)


def looks_linear(rng: Rng, shape, dtype="float64", gain: float = 1.0):
    """Balduzzi et al. 2017's mirrored weights for a layer fed by a CReLU: ``[W, −W]`` along the
    input axis (1), ``W`` of shape ``(out, in/2, ...)`` drawn by :func:`orthogonal`.

    CReLU gives ``(relu(x), relu(−x))`` and ``W·relu(x) − W·relu(−x) = W·x``, so a network of
    CReLUs and such layers is exactly linear at initialisation. A layer fed by anything else
    takes plain orthogonal weights (the models do that for their stem).
    """
    shape = tuple(shape)
    if len(shape) < 2 or shape[1] % 2:
        raise ValueError(f"looks_linear: a weight fed by a CReLU needs an even number of inputs "
                         f"(axis 1: the two halves relu(x), relu(-x)), got shape {shape}")
    w = orthogonal(rng, (shape[0], shape[1] // 2, *shape[2:]), dtype, gain)
    return rng.backend.xp.concat([w, -w], axis=1)


INITIALIZERS = {"he": he_normal, "xavier": xavier_normal, "orthogonal": orthogonal,
                "looks_linear": looks_linear}


def initializer(name: str):
    """The initialiser called ``name``: "he", "xavier", "orthogonal" or "looks_linear" (mirrored
    orthogonal weights ``[W, −W]``, for layers fed by a CReLU)."""
    try:
        return INITIALIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown initialiser {name!r}; valid: {', '.join(INITIALIZERS)}"
        ) from None
