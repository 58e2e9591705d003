"""The gradient at the stem taken apart by path: Veit et al.'s unravelled view, exactly.

A residual block ``h_l = P(λ·S(u) + α·β·F(h_{l-1}))`` has a VJP that is the sum of two: the skip
path ``P'·λ·S'·u'`` and the branch path ``P'·α·β·F'``. Multiplying out the chain of L blocks
gives 2^L paths; a path's length is the number of branches it goes through. Here every path of
one length is summed at once, by dynamic programming over the blocks (never 2^L).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from miniresnet.backend_choice import as_backend_array
from miniresnet.inspect._common import (
    check_block_index,
    check_network,
    host,
    output_gradient,
    residual_block,
    stream,
    untouched,
)
from miniresnet.nn.blocks import ResidualBlock
from miniresnet.tracing import as_tensor, no_grad
from miniresnet.transforms import vjp


class _Split:
    """A residual or plain block linearised at its input ``h``: ``post`` maps a stack of
    cotangents of the output to cotangents of ``z = skip + branch`` (``P'ᵀ``), ``skip`` and
    ``branch`` map those to cotangents of ``h``. ``skip`` is None for a plain block. Backend
    arrays in and out; two forward passes of the block, kept for any number of calls."""

    def __init__(self, block: ResidualBlock, h):
        branch, branch_vjp = vjp(lambda u: block.terms(u)[1], h)
        if block.shortcut is None:
            z, self.skip = branch, None
        else:
            skip, skip_vjp = vjp(lambda u: block.terms(u)[0], h)
            z, self.skip = branch + skip, lambda ct: skip_vjp(ct)[0]
        self.branch = lambda ct: branch_vjp(ct)[0]
        _, post_vjp = vjp(block.post, z)
        self.post = lambda ct: post_vjp(ct)[0]


def _check_splittable(model, name: str) -> None:
    """Every block must be residual or plain: checked before any work is done."""
    for i in range(1, len(model.blocks) + 1):
        residual_block(model, i, name)


def split_block(model, x, i: int) -> tuple[Callable, Callable]:
    """The VJPs of the skip path and of the branch path of block ``i`` (1-based) at the point
    the input ``x`` reaches it.

    With ``h = h_{i-1}`` and ``z = λ·S(u) + α·β·F(h)``, block i is ``P(z)``; the two functions
    are ``ct ↦ (P'·λ·S'·u')ᵀ ct`` and ``ct ↦ (P'·α·β·F')ᵀ ct``, and their sum is the block's VJP.
    Each takes a stack of cotangents of shape ``(k, ...) + h_i.shape`` (NumPy or backend arrays
    of the model's dtype) and returns a host NumPy array of shape ``(k, ...) + h_{i-1}.shape``.
    They are linearised once, here (with batch norm in training mode, at this batch's
    statistics, coupling the samples), and can be called any number of times; calling them
    never touches the model.

    Cost: a forward pass through blocks 1..i, then two forward passes of block i.

    Raises
    ------
    TypeError
        If ``model`` is not a Network, or block ``i`` is a highway block (no split).
    ValueError
        If block ``i`` is plain (``residual=False``): it has no skip path.
    IndexError
        If ``i`` is not in 1..L.
    """
    model = check_network(model, "split_block")
    i = check_block_index(model, i, "split_block")
    block = residual_block(model, i, "split_block")
    if block.shortcut is None:
        raise ValueError(f"inspect.split_block: block {i} is plain (residual=False): it has no "
                         f"skip path; its whole VJP is its branch's (inspect.block_jacobian "
                         f"gives it)")
    with untouched(model):
        h = _stream_to(model, x, i - 1)
        split = _Split(block, h)
    be, dtype = as_tensor(h).backend, h.dtype

    def wrap(path: Callable) -> Callable:
        def path_vjp(cotangents):
            ct = as_backend_array(as_tensor(cotangents).raw, backend=be)
            if ct.dtype != dtype:
                raise TypeError(f"inspect.split_block: cotangents have dtype {ct.dtype}; the "
                                f"model computes in {dtype}")
            return host(path(split.post(ct)))
        return path_vjp

    return wrap(split.skip), wrap(split.branch)


def _stream_to(model, x, stop: int):
    """``h_stop`` as a backend array (call inside :func:`untouched`)."""
    with no_grad():
        h = as_tensor(model.stem(x))
        for block in list(model.blocks)[:stop]:
            h = as_tensor(block(h))
    return h.raw


def path_gradients(model, x, y=None, *, cotangent=None) -> np.ndarray:
    """``g`` of shape ``(L+1,) + h_0.shape``: ``g[k]`` is the exact sum of the contributions to
    ``∂s/∂h_0`` of all paths through exactly ``k`` residual branches.

    ``s`` is the mean cross-entropy against ``y`` when it is given, else ``sum(out * c)`` with
    ``c`` the ``cotangent`` (default: standard normal, seed 0). Dynamic programming from block L
    down to block 1 keeps a stack of cotangents, entry k holding the paths with k branches so
    far: a skip VJP keeps entry k, a branch VJP moves it to k+1. A plain block has no skip, so
    it moves every entry. ``g.sum(0)`` is ``∂s/∂h_0``. With batch norm in training mode each
    block is linearised at this batch's statistics (the samples are coupled).

    Cost: one forward pass, then O(L²) block VJPs: block l carries the L-l+1 entries that can
    be nonzero there through its skip and its branch (one stacked reverse pass each), about L²
    in all. Memory: the stack (at most L+1 copies of one h_l) and one block's reverse pass
    over it.

    Raises
    ------
    TypeError
        If ``model`` is not a Network or has a highway block.
    """
    model = check_network(model, "path_gradients")
    _check_splittable(model, "path_gradients")
    with untouched(model):
        hs = stream(model, x)
        _, g = output_gradient(model, hs[-1], y, cotangent)
        xp = as_tensor(g).backend.xp
        stack = g[None, ...]
        for i in range(len(model.blocks), 0, -1):
            split = _Split(model.blocks[i - 1], hs[i - 1])
            ct = split.post(stack)
            through = split.branch(ct)
            if split.skip is None:  # a plain block: every path goes through it
                stack = xp.concat([xp.zeros_like(through[:1, ...]), through], axis=0)
            else:
                skipped = split.skip(ct)
                stack = xp.concat([skipped[:1, ...], skipped[1:, ...] + through[:-1, ...],
                                   through[-1:, ...]], axis=0)
        return host(stack)


def _masked_path_gradients(model, x, branches: np.ndarray, y=None, cotangent=None,
                           chunk: int = 64) -> np.ndarray:
    """For each row of the boolean ``branches`` (n, L), the gradient at h_0 of the one
    backward pass through the branch of the blocks marked True and the skip of the others
    (zero if it asks for the skip of a plain block), as a host array ``(n,) + h_0.shape``.
    ``chunk`` rows go through a block VJP at once. Cost: n·L block VJP rows."""
    model = check_network(model, "path_gradients_sampled")
    _check_splittable(model, "path_gradients_sampled")
    n_blocks = len(model.blocks)
    with untouched(model):
        hs = stream(model, x)
        _, g = output_gradient(model, hs[-1], y, cotangent)
        be = as_tensor(g).backend
        xp = be.xp
        stack = xp.zeros((branches.shape[0],) + g.shape, dtype=g.dtype, device=g.device) + g
        for i in range(n_blocks, 0, -1):
            split = _Split(model.blocks[i - 1], hs[i - 1])
            chosen = np.flatnonzero(branches[:, i - 1])
            others = np.flatnonzero(~branches[:, i - 1])
            parts = []
            for rows, path in ((chosen, split.branch), (others, split.skip)):
                for start in range(0, rows.size, chunk):
                    ct = xp.take(stack, be.asarray(rows[start:start + chunk], "int64"), axis=0)
                    parts.append(_apply(path, split, ct, xp, hs[i - 1]))
            order = np.argsort(np.concatenate([chosen, others]), kind="stable")
            stack = xp.take(xp.concat(parts, axis=0), be.asarray(order, "int64"), axis=0)
        return host(stack)


def _apply(path, split: _Split, ct, xp, h):
    """``path`` (a skip or branch VJP) after ``P'ᵀ``; a missing skip path gives zeros."""
    if path is None:
        return xp.zeros(ct.shape[:1] + h.shape, dtype=h.dtype, device=h.device)
    return path(split.post(ct))


def path_gradients_sampled(model, x, k: int, samples: int, seed: int = 0, y=None, *,
                           cotangent=None) -> np.ndarray:
    """Veit et al.'s per-path gradients: ``samples`` backward passes that each go through the
    branch of ``k`` blocks chosen uniformly at random and through the skip of the others;
    returns the gradients at ``h_0``, shape ``(samples,) + h_0.shape`` (host NumPy).

    As in the paper, the forward pass is the full network's; only the backward pass is
    restricted. The subsets are drawn by ``numpy.random.default_rng(seed)`` (each a uniformly
    random set of ``k`` of the L blocks). A plain block has no skip: a sample that skips it gets
    zero. Summed over all C(L, k) subsets these are ``path_gradients(...)[k]``; their mean times
    C(L, k) estimates it. ``s`` is defined as in :func:`path_gradients`.

    Cost: one forward pass, then ``samples``·L block VJPs (stacked up to 64 at a time).

    Raises
    ------
    TypeError
        If ``model`` is not a Network or has a highway block, or k or samples is not an int.
    ValueError
        If ``k`` is not in 0..L or ``samples`` < 1.
    """
    model = check_network(model, "path_gradients_sampled")
    n_blocks = len(model.blocks)
    for value, what, low, high in ((k, "k", 0, n_blocks), (samples, "samples", 1, None)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"inspect.path_gradients_sampled: {what} must be an int, got "
                            f"{value!r}")
        if value < low or (high is not None and value > high):
            valid = f"{low}..{high} (the network has {high} blocks)" if high is not None \
                else f">= {low}"
            raise ValueError(f"inspect.path_gradients_sampled: {what}={value} is out of range; "
                             f"valid: {valid}")
    order = np.argsort(np.random.default_rng(seed).random((samples, n_blocks)), axis=1)
    branches = np.zeros((samples, n_blocks), dtype=bool)
    branches[np.arange(samples)[:, None], order[:, :k]] = True
    return _masked_path_gradients(model, x, branches, y, cotangent)


def shortest_range(weights, fraction: float = 0.9) -> tuple[int, int]:
    """The shortest range ``(lo, hi)`` of indices (inclusive) whose ``weights`` (non-negative)
    hold at least ``fraction`` of their total; among equally short ranges, the heaviest (then
    the first). Veit et al.'s "paths between 5 and 17 modules long" is this range of their
    per-length gradient measure."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("inspect.shortest_range: weights must be a non-empty 1-D array of "
                         "finite non-negative numbers")
    if not 0 < fraction <= 1:
        raise ValueError(f"inspect.shortest_range: fraction must be in (0, 1], got {fraction!r}")
    cum = np.concatenate([[0.0], np.cumsum(w)])
    target = fraction * cum[-1] * (1 - 1e-12)  # rounding in the sums must not lose a range
    lo = np.arange(w.size)
    hi = np.searchsorted(cum, cum[lo] + target, side="left") - 1  # smallest hi reaching target
    hi = np.maximum(hi, lo)
    ok = hi < w.size
    lo, hi = lo[ok], hi[ok]
    length = hi - lo
    best = length == length.min()
    mass = cum[hi + 1] - cum[lo]
    j = np.flatnonzero(best)[np.argmax(mass[best])]
    return int(lo[j]), int(hi[j])


def path_summary(g, sampled: Mapping | None = None, fraction: float = 0.9) -> dict:
    """Per path length k, what :func:`path_gradients` (and optionally
    :func:`path_gradients_sampled`) found, as host NumPy data.

    Parameters
    ----------
    g : array (L+1, ...)
        ``path_gradients(...)``.
    sampled : mapping k -> array, optional
        For some lengths k, ``path_gradients_sampled(model, x, k, ...)`` (one gradient per
        sample) or already a 1-D array of their norms.
    fraction : float
        The mass the reported ranges hold (0.9).

    Returns
    -------
    dict with
        ``length`` (0..L), ``count`` C(L, k) (float), ``norm`` ‖g^(k)‖, ``share``
        ⟨g^(k), g⟩/‖g‖² with ``g = Σ_k g^(k)`` (the shares sum to 1 up to rounding; the norms
        do not add, because paths of one length partly cancel), ``share_range`` the shortest
        range of lengths holding ``fraction`` of the absolute shares; with ``sampled`` also
        ``sampled_norm`` (mean ‖g_path‖ per k, NaN where not sampled), ``samples`` (count per
        k), ``veit`` = count·sampled_norm (Veit et al.'s per-length gradient measure) and
        ``veit_range`` the shortest range holding ``fraction`` of it (unsampled lengths count
        as 0).
    """
    g = host(g) if not isinstance(g, np.ndarray) else g
    if g.ndim < 2:
        raise ValueError(f"inspect.path_summary: g must be path_gradients' result, of shape "
                         f"(L+1,) + h_0.shape, got shape {g.shape}")
    n = g.shape[0] - 1
    flat = g.reshape(n + 1, -1)
    total = flat.sum(axis=0)
    share = flat @ total / (total @ total)
    result = {
        "length": np.arange(n + 1),
        "count": np.array([float(math.comb(n, k)) for k in range(n + 1)]),
        "norm": np.sqrt(np.einsum("ij,ij->i", flat, flat)),
        "share": share,
        "share_range": shortest_range(np.abs(share), fraction),
    }
    if sampled is not None:
        mean_norm = np.full(n + 1, np.nan)
        counts = np.zeros(n + 1, dtype=np.int64)
        for k, values in sampled.items():
            if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= k <= n:
                raise ValueError(f"inspect.path_summary: sampled has key {k!r}; keys must be "
                                 f"path lengths 0..{n}")
            v = host(values) if not isinstance(values, np.ndarray) else values
            norms = v if v.ndim == 1 else np.sqrt((v.reshape(v.shape[0], -1) ** 2).sum(axis=1))
            mean_norm[k], counts[k] = norms.mean(), norms.size
        veit = result["count"] * mean_norm
        result.update(sampled_norm=mean_norm, samples=counts, veit=veit,
                      veit_range=shortest_range(np.nan_to_num(veit, nan=0.0), fraction))
    return result
