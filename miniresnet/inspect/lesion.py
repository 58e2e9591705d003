"""Veit et al.'s lesion study: remove residual branches at test time (:func:`lesioned`) and
measure what is left (:func:`accuracy`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import numpy as np

from miniresnet.inspect._common import check_block_index, check_network, untouched
from miniresnet.nn.blocks import ResidualBlock
from miniresnet.nn.layers import Identity
from miniresnet.tracing import as_tensor


def _skip_only(block: ResidualBlock):
    """The forward of ``block`` without its branch: ``P(λ·S(u))``."""

    def forward(x):
        u = x
        if block.order == "full_preact" and not isinstance(block.shortcut, Identity):
            # as in ResidualBlock._branch: a full pre-activation block's projection (or
            # zero-pad) shortcut sees act(N₁(x)), which stays though the branch is gone
            u = block.acts[0](block.norms[0](x))
        s = as_tensor(block.shortcut(u))
        return block.post(s if block.lam == 1.0 else s * block.lam)

    return forward


def _identity(x):
    return x


def _lesion(model, i: int):
    """The forward that block ``i`` computes when lesioned, or a clear error."""
    block = model.blocks[i - 1]
    if not isinstance(block, ResidualBlock):
        raise TypeError(f"inspect.lesioned: block {i} is a {type(block).__name__}; only residual "
                        f"blocks (and plain blocks that keep the shape) can be lesioned")
    if block.shortcut is not None:
        return _skip_only(block)
    if block.stride != 1 or block.in_features != block.out_features:
        raise ValueError(f"inspect.lesioned: block {i} is plain and maps {block.in_features} "
                         f"to {block.out_features} features with stride {block.stride}, so it "
                         f"cannot become the identity; lesion a block that keeps the shape")
    return _identity


@contextlib.contextmanager
def lesioned(model, drop: int | Iterable[int]) -> Iterator:
    """Within this context, each block in ``drop`` (1-based indices, or one index) computes
    only ``P(λ·S(u))``: its residual branch is removed, as in Veit et al.'s lesion study; a
    plain block whose input and output shapes match becomes the identity. Yields ``model``.

    For ``bn_after_add`` the batch norm N₂ inside ``P`` keeps the statistics it has (in
    evaluation mode its running statistics, learned with the branch present). For
    ``full_preact`` with a projection or zero-pad shortcut, ``u = act(N₁(x))`` is still
    computed. Everything is restored on exit, also after an error. Nothing else changes:
    running statistics update as in any forward pass in training mode (evaluate in eval mode,
    e.g. with :func:`accuracy`).

    Raises
    ------
    TypeError, IndexError, ValueError
        Before anything changes: a model that is not a Network, an index out of range, a
        highway block, or a plain block that changes the shape (named in the message).
    """
    model = check_network(model, "lesioned")
    try:
        indices = [drop] if isinstance(drop, int | np.integer) else list(drop)
    except TypeError:
        raise TypeError(f"inspect.lesioned: drop must be a block index or an iterable of block "
                        f"indices (1 to {len(model.blocks)}), got {drop!r}") from None
    indices = [check_block_index(model, i, "lesioned", "drop") for i in indices]
    overrides = {i: _lesion(model, i) for i in indices}  # every check before any change
    saved = []
    try:
        for i, forward in overrides.items():
            block = model.blocks[i - 1]
            saved.append((block, block.__dict__.get("forward")))  # a lesion inside a lesion
            object.__setattr__(block, "forward", forward)
        yield model
    finally:
        for block, previous in reversed(saved):
            if previous is None:
                del block.__dict__["forward"]
            else:
                object.__setattr__(block, "forward", previous)


def accuracy(model, split, *, batch_size: int = 500) -> float:
    """The fraction of ``split = (x, y)`` (inputs and integer labels, e.g.
    ``(data.x_test, data.y_test)``) that ``model`` classifies correctly, in evaluation mode
    (every module's mode is restored afterwards). Cost: one forward pass over ``x``, in batches
    of ``batch_size``."""
    from miniresnet.train import evaluate

    model = check_network(model, "accuracy")
    try:
        x, y = split
    except (TypeError, ValueError):
        raise TypeError(f"inspect.accuracy: split must be a pair (x, y) of inputs and labels, "
                        f"got {type(split).__name__}") from None
    with untouched(model):
        model.eval()
        return evaluate(model, x, y, batch_size)[1]
