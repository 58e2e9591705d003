"""Hypothesis strategies for miniresnet tests (requires ``hypothesis``).

Arrays are drawn as NumPy data and moved to the current backend (see
:func:`miniresnet.use_backend`), so one test body runs on every backend.
"""

from __future__ import annotations

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from miniresnet.backend_choice import as_backend_array, current_backend
from miniresnet.backends import conv_output_size

__all__ = ["shapes", "arrays", "host_arrays", "conv_configs", "to_backend_array"]


def to_backend_array(host: np.ndarray):
    """Move host data to the current backend."""
    return as_backend_array(host, backend=current_backend())


def shapes(min_dims: int = 1, max_dims: int = 3, min_side: int = 1, max_side: int = 4):
    """Array shapes."""
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side,
                            max_side=max_side)


def host_arrays(shape, dtype: str = "float64", low: float = -2.0, high: float = 2.0,
                avoid: tuple[float, ...] = (), margin: float = 1e-3):
    """Host NumPy arrays with finite elements in ``[low, high]``.

    ``avoid`` lists points (kinks such as 0 for relu) that elements keep ``margin`` away from.
    ``shape`` may be a tuple or a strategy of tuples.
    """
    elements = st.floats(low, high, allow_nan=False, allow_infinity=False, width=64)
    if avoid:
        elements = elements.filter(lambda v: all(abs(v - p) > margin for p in avoid))
    return hnp.arrays(np.dtype(dtype), shape, elements=elements)


def arrays(shape, dtype: str = "float64", low: float = -2.0, high: float = 2.0,
           avoid: tuple[float, ...] = (), margin: float = 1e-3):
    """Like :func:`host_arrays`, but arrays of the current backend."""
    return host_arrays(shape, dtype, low, high, avoid, margin).map(to_backend_array)


@st.composite
def conv_configs(draw, max_batch: int = 2, max_channels: int = 3, max_size: int = 6,
                 max_kernel: int = 3, max_stride: int = 2, max_padding: int = 1):
    """Valid conv2d configurations: a dict with ``x_shape``, ``w_shape``, ``stride``,
    ``padding`` (pairs) and the output size ``out_hw``."""
    n = draw(st.integers(1, max_batch))
    c = draw(st.integers(1, max_channels))
    f = draw(st.integers(1, max_channels))
    h, w = draw(st.integers(1, max_size)), draw(st.integers(1, max_size))
    kh, kw = draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel))
    stride = (draw(st.integers(1, max_stride)), draw(st.integers(1, max_stride)))
    padding = (draw(st.integers(0, max_padding)), draw(st.integers(0, max_padding)))
    oh = conv_output_size(h, kh, stride[0], padding[0])
    ow = conv_output_size(w, kw, stride[1], padding[1])
    assume(oh >= 1 and ow >= 1)
    return {"x_shape": (n, c, h, w), "w_shape": (f, c, kh, kw), "stride": stride,
            "padding": padding, "out_hw": (oh, ow)}
