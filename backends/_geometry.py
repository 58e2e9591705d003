"""Convolution geometry: the one place that checks a stride, a padding and an output size
(and the shape arithmetic of reductions with kept dimensions).

Every convolution-like operation (the ops ``conv``, ``conv_transpose``, ``conv_weight_grad``,
``im2col``, ``col2im``, the pooling functions and the backends' kernels) checks its geometry
here, so that each mistake gets the same message wherever it is made.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["conv_geometry", "conv_output_size", "int_pair", "keepdims_shape"]

_MINIMUM = {"stride": 1, "padding": 0}  # every other size (kernel, output) is at least 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def int_pair(name: str, value: Any, what: str) -> tuple[int, int]:
    """``value``, an int or a pair of ints, as a pair of Python ints.

    Each entry must be at least 1, or at least 0 for ``what == "padding"``.

    Raises
    ------
    TypeError
        If an entry is no real number (a string, a bool, None ...).
    ValueError
        If an entry is out of range or not integral (0, -1, 1.5), or there are not two entries.
        Both messages read ``"{name}: {what} must be an int >= {low} or a pair of them, got
        {value!r}"``.
    """
    low = _MINIMUM.get(what, 1)
    pair = tuple(value) if isinstance(value, tuple | list) else (value, value)
    if len(pair) == 2 and all(_is_int(v) and v >= low for v in pair):
        return int(pair[0]), int(pair[1])
    numbers = all(isinstance(v, float | np.floating) or _is_int(v) for v in pair)
    raise (ValueError if numbers else TypeError)(
        f"{name}: {what} must be an int >= {low} or a pair of them, got {value!r}")


def conv_output_size(size: int, k: int, stride: int, padding: int) -> int:
    """Output length of a convolution along one axis: ``(size + 2 padding - k) // stride + 1``
    (unchecked: less than 1 when the kernel does not fit)."""
    return (size + 2 * padding - k) // stride + 1


def conv_geometry(
    name: str,
    image_size: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: Any,
    padding: Any,
    output_size: tuple[int, int] | None = None,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Check a 2-D convolution's geometry; return ``(stride, padding, (OH, OW))`` as int pairs.

    Parameters
    ----------
    name : str
        The operation, to start every message with.
    image_size, kernel_size : pair of ints
        ``(H, W)`` and ``(kh, kw)``, e.g. ``x.shape[-2:]`` and ``w.shape[-2:]``.
    stride, padding : int or pair of ints
        Checked by :func:`int_pair`.
    output_size : pair of ints, optional
        The spatial size an argument already has in the output space (a cotangent, the
        patches of col2im), which must be ``(OH, OW)``.

    Raises
    ------
    TypeError, ValueError
        For a bad stride or padding (see :func:`int_pair`); ValueError if the kernel does not
        fit the padded image (or a kernel size is < 1) or ``output_size`` is not ``(OH, OW)``.
    """
    key = _cache_key(image_size, kernel_size, stride, padding, output_size)
    if key is not None:
        hit = _CHECKED.get(key)
        if hit is not None:
            return hit
    stride, padding = int_pair(name, stride, "stride"), int_pair(name, padding, "padding")
    kh, kw = kernel_size
    oh = conv_output_size(image_size[0], kh, stride[0], padding[0])
    ow = conv_output_size(image_size[1], kw, stride[1], padding[1])
    if oh < 1 or ow < 1 or min(kh, kw) < 1:
        raise ValueError(
            f"{name}: a {kh}x{kw} kernel with stride {stride} and padding {padding} does not "
            f"fit input of spatial size {tuple(image_size)}"
        )
    if output_size is not None and (oh, ow) != tuple(output_size):
        raise ValueError(
            f"{name}: a cotangent of spatial size {tuple(output_size)} does not match an image "
            f"of size {tuple(image_size)} with a {kh}x{kw} kernel, stride {stride} and padding "
            f"{padding} (output size {(oh, ow)})"
        )
    result = stride, padding, (oh, ow)
    if key is not None and len(_CHECKED) < _CHECKED_MAX:
        _CHECKED[key] = result
    return result


# Geometries already checked, keyed by their arguments when every one is a plain int or tuple
# of plain ints (so that a bool, float or NumPy integer, equal to an int as a dict key, is
# never taken for it and still meets int_pair's checks): each layer's few geometries are
# checked once instead of at every forward and adjoint call.
_CHECKED: dict[tuple, tuple] = {}
_CHECKED_MAX = 4096


def _cache_key(*args: Any) -> tuple | None:
    # plain loops, not generators: this runs at every conv call and adjoint
    for a in args:
        kind = type(a)
        if kind is tuple:
            for v in a:
                if type(v) is not int:
                    return None
        elif kind is not int and a is not None:
            return None
    return args


def keepdims_shape(shape: tuple[int, ...], axis: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with 1 on the ``axis`` axes (negative ones allowed): the shape of a reduction
    over ``axis`` with kept dimensions."""
    reduced = {a % len(shape) for a in axis}
    return tuple(1 if i in reduced else d for i, d in enumerate(shape))
