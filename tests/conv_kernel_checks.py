"""Test helper for the compiled 3x3 convolution kernels (test_fast_conv.py, test_winograd.py):
their inputs, the bound check, and the hypothesis search both run."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

DTYPES = [np.float32, np.float64]


def channel_major(a: np.ndarray) -> np.ndarray:
    """(N, C, H, W) ``a`` as a transposed view of a C-contiguous (C, N, H, W) buffer, the layout
    of our activations."""
    return np.ascontiguousarray(a.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)


def inputs(seed, n, c, h, w, f, dtype, in_channel_major, lead=()):
    """Images x (N, C, H, W), filters (F, C, 3, 3), a cotangent g (N, F, H, W) and a stack of
    cotangents (*lead, N, F, H, W), standard normal."""
    rng = np.random.default_rng(seed)
    layout = channel_major if in_channel_major else np.ascontiguousarray
    x = layout(rng.standard_normal((n, c, h, w)).astype(dtype))
    wt = rng.standard_normal((f, c, 3, 3)).astype(dtype)
    g = layout(rng.standard_normal((n, f, h, w)).astype(dtype))
    gs = rng.standard_normal((*lead, n, f, h, w)).astype(dtype)
    return x, wt, g, gs


def check(got, want, scale, terms, dtype):
    """``got`` has ``want``'s shape and ``dtype``, and lies within ``2 terms u scale`` of it
    (``u`` the unit roundoff of ``dtype``)."""
    assert got.shape == want.shape and got.dtype == dtype
    u = float(np.finfo(dtype).eps) / 2
    err = np.abs(got.astype(np.float64) - want)
    bound = 2 * terms * u * scale + np.finfo(np.float64).tiny
    assert np.all(err <= bound), f"max error / bound {np.max(err / bound):.3g}"


#: the hypothesis search of a kernel module's test against its float64 oracle: images, filters,
#: cotangent stacks, dtypes and layouts
given_problems = given(
    n=st.integers(1, 4), c=st.integers(1, 5), h=st.integers(1, 9), w=st.integers(1, 9),
    f=st.integers(1, 6), lead=st.sampled_from([(), (2,), (2, 3)]),
    dtype=st.sampled_from(DTYPES), channel_major=st.booleans(), seed=st.integers(0, 2**31))
