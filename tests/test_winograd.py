"""The Winograd F(2x2, 3x3) kernels (``backends/_winograd.py``) against a float64 oracle.

The oracle is the NumPy backend's direct ``conv``, ``conv_transpose`` and ``conv_weight_grad``
on float64 copies of the inputs (compiled kernels off). The bound is Winograd's own: every
result is a sum of products of transformed values, rounded in some order, so its error is at
most ``2 K u`` times the same sum taken over the magnitudes, ``S`` below: the Winograd formulas
with the absolute values of the transform matrices, inputs and filters (computed here from
4x4 tile windows, in float64), ``u`` the unit roundoff of the dtype and ``K`` the number of
rounded additions along the way plus the oracle's own (``10 C + 16`` for conv, ``10 F + 16``
for its input gradient, ``N H W + T + 16`` for the filter gradient over T tiles). ``S`` is at
least the direct sum of magnitudes, and a wrong transform, tap or border is off by a sizeable
part of ``S`` and fails.
"""

from __future__ import annotations

import numpy as np
import pytest
from conv_kernel_checks import DTYPES, channel_major, check, given_problems, inputs

pytest.importorskip("numba")

from miniresnet.backends import _winograd as wg  # noqa: E402
from miniresnet.backends import compiled_kernels, get_backend  # noqa: E402

pytestmark = pytest.mark.backends("numpy")

_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], float)
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], float)






def _tile_windows(a: np.ndarray) -> np.ndarray:
    """The 4x4 tiles (..., N, C, th, tw, 4, 4) of the zero-padded (..., N, C, H, W) images."""
    h, w = a.shape[-2:]
    th, tw = (h + 1) // 2, (w + 1) // 2
    pad = [(0, 0)] * (a.ndim - 2) + [(1, 2 * th + 1 - h), (1, 2 * tw + 1 - w)]
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(a, pad), (4, 4), axis=(-2, -1))
    return windows[..., ::2, ::2, :, :]


def _blocks(a: np.ndarray) -> np.ndarray:
    """The 2x2 output blocks (..., th, tw, 2, 2) of (..., H, W) arrays (zero-padded if odd)."""
    h, w = a.shape[-2:]
    th, tw = (h + 1) // 2, (w + 1) // 2
    a = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, 2 * th - h), (0, 2 * tw - w)])
    return np.swapaxes(a.reshape(*a.shape[:-2], th, 2, tw, 2), -3, -2)


def _magnitudes(x, w, g, gs):
    """The bound scales ``S`` of conv, its input gradient, and the filter gradient for ``g``
    and for the stacked ``gs``: the Winograd formulas on magnitudes, in float64."""
    x, w, g, gs = (np.abs(np.asarray(a, np.float64)) for a in (x, w, g, gs))
    bt, gm, at = np.abs(_BT), np.abs(_G), np.abs(_AT)
    n, c, h, wd = x.shape
    u = np.einsum("ik,fckl,jl->fcij", gm, w, gm)
    v = np.einsum("ir,nctxrs,js->nctxij", bt, _tile_windows(x), bt)
    m = np.einsum("fcij,nctxij->nftxij", u, v)
    out = np.einsum("ai,nftxij,bj->nftaxb", at, m, at)  # (N, F, th, 2, tw, 2)
    th, tw = out.shape[2], out.shape[4]
    s_conv = out.reshape(n, -1, 2 * th, 2 * tw)[:, :, :h, :wd]

    dm = np.einsum("ai,nftxab,bj->nftxij", at, _blocks(g), at)
    dv = np.einsum("fcij,nftxij->nctxij", u, dm)
    tiles = np.einsum("ri,nctxij,sj->nctxrs", bt, dv, bt)
    s_dx = np.zeros((n, c, 2 * th + 2, 2 * tw + 2))
    for r in range(4):  # overlap-add the 4x4 tiles
        for s in range(4):
            s_dx[:, :, r : r + 2 * th : 2, s : s + 2 * tw : 2] += tiles[..., r, s]
    s_dx = s_dx[:, :, 1 : h + 1, 1 : wd + 1]

    def dw(gg):
        dmg = np.einsum("ai,...nftxab,bj->...nftxij", at, _blocks(gg), at)
        du = np.einsum("...nftxij,nctxij->...fcij", dmg, v)
        return np.einsum("ik,...fcij,jl->...fckl", gm, du, gm)

    return s_conv, s_dx, dw(g), dw(gs)


def _oracle(x, w, g, gs):
    """Float64 results of the NumPy backend's direct kernels: conv, input grad, filter grad,
    stacked filter grad."""
    be = get_backend("numpy")
    h, wd = x.shape[2:]
    x, w, g, gs = (np.asarray(a, dtype=np.float64) for a in (x, w, g, gs))
    with compiled_kernels(False):
        return [be.conv(x, w, 1, 1, keep=False)[0], be.conv_transpose(g, w, h, wd, 1, 1),
                be.conv_weight_grad(x, g, 3, 3, 1, 1), be.conv_weight_grad(x, gs, 3, 3, 1, 1)]




def _winograd(x, w, g, gs):
    out, saved = wg.conv(x, w)
    return [out, wg.conv_transpose(g, w), wg.weight_grad(x, g, saved), wg.weight_grad(x, gs)]


def _check_all(x, w, g, gs, dtype):
    n, c, h, wd = x.shape
    f = w.shape[0]
    tiles = n * ((h + 1) // 2) * ((wd + 1) // 2)
    got = _winograd(x, w, g, gs)
    terms = [10 * c + 16, 10 * f + 16, n * h * wd + tiles + 16, n * h * wd + tiles + 16]
    for a, want, scale, k in zip(got, _oracle(x, w, g, gs), _magnitudes(x, w, g, gs), terms,
                                 strict=True):
        check(a, want, scale, k, dtype)
    for a in got[:2]:  # (N, ., H, W) views of channel-major buffers, like the NumPy kernels'
        assert a.transpose(1, 0, 2, 3).flags.c_contiguous
    return got


@given_problems
def test_kernels_match_float64_oracle(n, c, h, w, f, lead, dtype, channel_major, seed):
    _check_all(*inputs(seed, n, c, h, w, f, dtype, channel_major, lead), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [
    (1, 1, 1, 1, 1),  # one tile, mostly padding
    (3, 2, 7, 1, 2),  # one-pixel-wide images
    (4, 16, 32, 32, 16),  # the hot case: ResNet's first stage
])
def test_shapes_and_chunks(monkeypatch, shape, dtype):
    x, w, g, gs = inputs(0, *shape, dtype, True, (2,))
    _check_all(x, w, g, gs, dtype)
    monkeypatch.setattr(wg, "CHUNK_BYTES", 1)  # one image per chunk
    _check_all(x, w, g, gs, dtype)


def test_saved_tiles_give_the_same_filter_gradient():
    x, w, g, gs = inputs(2, 3, 4, 6, 5, 3, np.float32, False, (2,))
    _, saved = wg.conv(x, w)
    np.testing.assert_array_equal(wg.weight_grad(x, g, saved), wg.weight_grad(x, g))
    np.testing.assert_array_equal(wg.weight_grad(x, gs, saved), wg.weight_grad(x, gs))
    stacked = wg.weight_grad(x, gs, saved)
    for k in range(2):  # a stacked cotangent is its cotangents' gradients, stacked
        np.testing.assert_allclose(stacked[k], wg.weight_grad(x, gs[k], saved), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grads_are_both_adjoints(monkeypatch, dtype):
    """One pass for both adjoints gives exactly the two separate ones (same chunks, same
    products, same order), with one chunk and with several."""
    x, w, g, _ = inputs(5, 5, 3, 7, 6, 4, dtype, True)
    for chunk in (wg.CHUNK_BYTES, 1):
        monkeypatch.setattr(wg, "CHUNK_BYTES", chunk)
        _, saved = wg.conv(x, w)
        dx, dw = wg.grads(g, w, saved)
        np.testing.assert_array_equal(dx, wg.conv_transpose(g, w))
        np.testing.assert_array_equal(dw, wg.weight_grad(x, g, saved))
        assert dx.transpose(1, 0, 2, 3).flags.c_contiguous


@pytest.mark.parametrize("where", [(0, 0), (0, 5), (3, 0), (3, 5), (1, 2)])
def test_non_finite_inputs_stay_in_their_tiles(where):
    """A NaN pixel spoils the outputs of the tiles whose 4x4 window reads it (at most 4x4
    outputs around it, a superset of the direct product's 3x3), in its own image only."""
    x, w, g, _ = inputs(3, 2, 2, 4, 6, 3, np.float64, True)
    x[1, 0][where] = np.nan
    g[0, 1][where] = np.nan
    y, z = where
    near = np.zeros((4, 6), bool)
    near[max(y - 2, 0) : y + 3, max(z - 2, 0) : z + 3] = True
    window = np.zeros((4, 6), bool)
    window[max(y - 1, 0) : y + 2, max(z - 1, 0) : z + 2] = True
    for got, image in ((wg.conv(x, w)[0], 1), (wg.conv_transpose(g, w), 0)):
        bad = np.isnan(got)
        assert not bad[1 - image].any()
        assert np.all(bad[image] <= near) and np.all(bad[image] >= window)


def test_supported():
    x, w = np.zeros((2, 3, 5, 5), np.float32), np.zeros((4, 3, 3, 3), np.float32)
    assert wg.supported(x, w, (1, 1), (1, 1))
    assert wg.supported(x.astype(np.float64), w.astype(np.float64), (1, 1), (1, 1))
    assert not wg.supported(x, w, (2, 2), (1, 1))
    assert not wg.supported(x, w, (1, 1), (0, 0))
    assert not wg.supported(x, w[:, :, :2], (1, 1), (1, 1))
    assert not wg.supported(x, w[:, :2], (1, 1), (1, 1))
    assert not wg.supported(x, w.astype(np.float64), (1, 1), (1, 1))
    assert not wg.supported(x.astype(np.float16), w.astype(np.float16), (1, 1), (1, 1))
    assert not wg.preferred(x, w, (1, 1), (1, 1))  # 5x5 images: below MIN_SIZE
    big = np.zeros((2, 3, wg.MIN_SIZE, wg.MIN_SIZE), np.float32)
    assert wg.preferred(big, w, (1, 1), (1, 1))


def test_kernels_stay_in_bounds(monkeypatch):
    """The kernels' Python originals, run by the interpreter (which checks every index, unlike
    the compiled kernels), give the compiled results: no read or write past an array, on odd
    and even images."""
    for shape in [(2, 2, 3, 4, 3), (2, 3, 4, 5, 2)]:
        x, w, g, gs = inputs(4, *shape, np.float64, True, (2,))
        want = _winograd(x, w, g, gs)
        with monkeypatch.context() as patch:
            for name in ("_input_transform", "_output_transform", "_output_adjoint",
                         "_input_adjoint"):
                patch.setattr(wg, name, getattr(wg, name).py_func)
            for a, b in zip(_winograd(x, w, g, gs), want, strict=True):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_numpy_backend_runs_them_on_large_images(dtype):
    """With the compiled kernels on, the NumPy backend computes a 3x3 stride-1 conv on images
    of MIN_SIZE or more with Winograd, hands the filter gradient found with the input gradient
    to conv_weight_grad for that very cotangent only, and agrees with its direct kernels; off,
    or on smaller images, Winograd never runs."""
    be = get_backend("numpy")
    size = wg.MIN_SIZE
    x, w, g, gs = inputs(7, 3, 2, size, size + 1, 4, dtype, True, (2,))
    other = channel_major(g + 1)
    with compiled_kernels(True):
        out, saved = be.conv(x, w, (1, 1), (1, 1))
        assert set(saved) == {"winograd"}
        dx = be.conv_transpose(g, w, size, size + 1, (1, 1), (1, 1), saved)
        assert saved["winograd_dw"][0] is g
        dw_other = be.conv_weight_grad(x, other, 3, 3, (1, 1), (1, 1), saved)  # not g's
        assert "winograd_dw" not in saved  # taken (and dropped) by the first filter gradient
        dx = be.conv_transpose(g, w, size, size + 1, (1, 1), (1, 1), saved)
        dw = be.conv_weight_grad(x, g, 3, 3, (1, 1), (1, 1), saved)
        dw_stack = be.conv_weight_grad(x, gs, 3, 3, (1, 1), (1, 1), saved)
        assert "cols" in be.conv(x[:, :, :8, :8], w, (1, 1), (1, 1))[1]  # below MIN_SIZE
    want = _oracle(x, w, g, gs)
    want_other = _oracle(x, w, other, gs)[2]
    mags = _magnitudes(x, w, g, gs)
    tiles = 3 * (size // 2) * ((size + 2) // 2)
    terms = [10 * 2 + 16, 10 * 4 + 16] + [3 * size * (size + 1) + tiles + 16] * 2
    for got, ref, scale, k in zip([out, dx, dw, dw_stack], want, mags, terms, strict=True):
        check(got, ref, scale, k, dtype)
    check(dw_other, want_other, _magnitudes(x, w, other, gs)[2], terms[2], dtype)
    with compiled_kernels(False):
        assert "winograd" not in be.conv(x, w, (1, 1), (1, 1))[1]


def test_a_stack_of_cotangents_through_the_engine():
    """Input and filter gradients of a stack of cotangents (the stack folded into the batch
    for conv_transpose) match the direct kernels: the filter gradient kept for one cotangent
    is never taken for another."""
    import miniresnet as mr

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, wg.MIN_SIZE, wg.MIN_SIZE))
    w = rng.standard_normal((4, 3, 3, 3))
    cts = rng.standard_normal((3, 2, 4, wg.MIN_SIZE, wg.MIN_SIZE))

    def grads():
        out, pull = mr.vjp(lambda a, b: mr.ops.conv(a, b, 1, 1), x, w)
        return pull(cts)

    with compiled_kernels(True):
        fast = grads()
    with compiled_kernels(False):
        direct = grads()
    for a, b in zip(fast, direct, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-11, atol=1e-11)
