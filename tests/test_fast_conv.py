"""The compiled 3x3 convolution kernels (``backends/_fast_conv.py``) against a float64 oracle.

The oracle is the NumPy backend's own ``conv``, ``conv_transpose`` and ``conv_weight_grad`` on
float64 copies of the inputs with the compiled kernels switched off (those NumPy kernels are
checked against the generic ones in test_backends.py). Each result entry is a sum of K
products (K = 9 C for conv, 9 F for its input gradient, N H W for the filter gradient) rounded
in some order, so it must lie within
``2 K u`` times the same sum of absolute products (the oracle on ``|x|``, ``|w|``, ``|g|``), u the
unit roundoff of the dtype; the factor 2 covers the float64 oracle's own rounding. A wrong tap,
shift or border is off by the size of a whole term and fails.
"""

from __future__ import annotations

import numpy as np
import pytest
from conv_kernel_checks import DTYPES, channel_major, check, given_problems, inputs

numba = pytest.importorskip("numba")

from miniresnet.backends import _fast_conv as fc  # noqa: E402
from miniresnet.backends import compiled_kernels, get_backend  # noqa: E402

pytestmark = pytest.mark.backends("numpy")






def _oracle(x, w, g, gs):
    """Float64 results and their sums of absolute products: (conv, input grad, filter grad,
    stacked filter grad), each as (value, bound scale)."""
    be = get_backend("numpy")
    h, wd = x.shape[2:]

    def ops(x, w, g, gs):
        x, w, g, gs = (np.asarray(a, dtype=np.float64) for a in (x, w, g, gs))
        return [be.conv(x, w, 1, 1, keep=False)[0], be.conv_transpose(g, w, h, wd, 1, 1),
                be.conv_weight_grad(x, g, 3, 3, 1, 1), be.conv_weight_grad(x, gs, 3, 3, 1, 1)]

    with compiled_kernels(False):  # the NumPy kernels, not the ones under test
        return list(zip(ops(x, w, g, gs), ops(*map(np.abs, (x, w, g, gs))), strict=True))




def _fast(x, w, g, gs):
    out, xs = fc.conv3x3(x, w)
    return [out, fc.conv3x3_transpose(g, w), fc.conv3x3_weight_grad(x, g, xs),
            fc.conv3x3_weight_grad(x, gs)]


def _check_all(x, w, g, gs, dtype):
    n, c, h, wd = x.shape
    f = w.shape[0]
    got = _fast(x, w, g, gs)
    for a, (want, scale), terms in zip(got, _oracle(x, w, g, gs),
                                       [9 * c, 9 * f, n * h * wd, n * h * wd], strict=True):
        check(a, want, scale, terms, dtype)
    for a in got[:2]:  # (N, ., H, W) views of channel-major buffers, like the NumPy kernels'
        assert a.transpose(1, 0, 2, 3).flags.c_contiguous
    return got


@given_problems
def test_kernels_match_float64_oracle(n, c, h, w, f, lead, dtype, channel_major, seed):
    _check_all(*inputs(seed, n, c, h, w, f, dtype, channel_major, lead), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [
    (2, 3, 40, 37, 5),  # one image's grid longer than a forward job's block
    (45, 3, 8, 8, 4),  # many images per block, several blocks, a grid of several chunks
    (4, 16, 32, 32, 16),  # the hot case: ResNet's first stage
])
def test_blocks_and_chunks(monkeypatch, shape, dtype):
    x, w, g, gs = inputs(0, *shape, dtype, True, (2,))
    _check_all(x, w, g, gs, dtype)
    monkeypatch.setattr(fc, "BLOCK", 1)  # one image per job
    monkeypatch.setattr(fc, "CHUNK", 64)  # many small chunks
    _check_all(x, w, g, gs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_do_not_depend_on_the_thread_count(dtype):
    args = inputs(1, 9, 4, 12, 12, 8, dtype, True, (2,))
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _fast(*args)
    finally:
        numba.set_num_threads(threads)
    for a, b in zip(one, _fast(*args), strict=True):
        np.testing.assert_array_equal(a, b)


def test_saved_shifted_images_give_the_same_filter_gradient():
    x, w, g, _ = inputs(2, 3, 4, 6, 5, 3, np.float32, False)
    _, xs = fc.conv3x3(x, w)
    np.testing.assert_array_equal(fc.conv3x3_weight_grad(x, g, xs), fc.conv3x3_weight_grad(x, g))
    np.testing.assert_array_equal(xs, fc.shifted_images(channel_major(x)))


@pytest.mark.parametrize("where", [(0, 0), (0, 5), (3, 0), (3, 5), (1, 2)])
def test_non_finite_inputs_reach_only_their_neighbours(where):
    """A NaN (inf) pixel spoils exactly the outputs whose 3x3 window holds it: no shift wraps a
    border pixel into the next row or image. (The oracle is no help here: its dense-matrix path
    multiplies every pixel by zeros.)"""
    x, w, g, _ = inputs(3, 2, 2, 4, 6, 3, np.float64, True)
    x[1, 0][where] = np.nan
    g[0, 1][where] = np.inf
    window = np.zeros((4, 6), bool)
    window[max(where[0] - 1, 0) : where[0] + 2, max(where[1] - 1, 0) : where[1] + 2] = True
    out = fc.conv3x3(x, w)[0]
    want = np.zeros(out.shape, bool)
    want[1] = window
    np.testing.assert_array_equal(np.isnan(out), want)
    dx = fc.conv3x3_transpose(g, w)
    want = np.zeros(dx.shape, bool)
    want[0] = window
    np.testing.assert_array_equal(~np.isfinite(dx), want)


def test_supported():
    x, w = np.zeros((2, 3, 5, 5), np.float32), np.zeros((4, 3, 3, 3), np.float32)
    assert fc.supported(x, w, (1, 1), (1, 1))
    assert fc.supported(x.astype(np.float64), w.astype(np.float64), (1, 1), (1, 1))
    assert not fc.supported(x, w, (2, 2), (1, 1))
    assert not fc.supported(x, w, (1, 1), (0, 0))
    assert not fc.supported(x, w[:, :, :2], (1, 1), (1, 1))
    assert not fc.supported(x, w.astype(np.float64), (1, 1), (1, 1))
    assert not fc.supported(x.astype(np.int64), w.astype(np.int64), (1, 1), (1, 1))
    assert not fc.supported(x.astype(np.float16), w.astype(np.float16), (1, 1), (1, 1))


def test_kernels_stay_in_bounds(monkeypatch):
    """The kernels' Python originals, run by the interpreter (which checks every index, unlike
    the compiled parallel loops), give the compiled results: no read or write past an array,
    even for a last job or chunk that starts mid-block."""
    x, w, g, gs = inputs(4, 4, 2, 3, 4, 5, np.float64, True, (2,))  # a grid of 64 points
    want = _fast(x, w, g, gs)
    for name in ("_fill_shifted", "_fill_grid", "_conv_grid", "_weight_grad_grid"):
        monkeypatch.setattr(fc, name, getattr(fc, name).py_func)
    monkeypatch.setattr(fc, "BLOCK", 1)  # a job per grid row: the last one starts mid-block
    monkeypatch.setattr(fc, "CHUNK", 48)
    for a, b in zip(_fast(x, w, g, gs), want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
