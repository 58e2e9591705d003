"""What every inspection function shares: argument checks, the scalar that is differentiated,
and the guard that leaves the model as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np

from miniresnet import functional as F
from miniresnet import ops
from miniresnet.backends import backend_of
from miniresnet.nn.blocks import ResidualBlock
from miniresnet.nn.models import Network
from miniresnet.nn.module import Module, frozen_stats
from miniresnet.tracing import Tensor, as_tensor, no_grad


def check_network(model, name: str) -> Network:
    """``model`` if it is a :class:`~miniresnet.nn.Network`, else a TypeError naming ``name``."""
    if not isinstance(model, Network):
        raise TypeError(f"inspect.{name}: model must be a Network built by nn.resnet_cifar or "
                        f"nn.mlp (with stem, blocks and head), got {type(model).__name__}")
    return model


def check_block_index(model: Network, i, name: str, what: str = "i") -> int:
    """A 1-based block index of ``model`` as an int, or a clear error giving the valid range."""
    n = len(model.blocks)
    if isinstance(i, bool) or not isinstance(i, int | np.integer):
        raise TypeError(f"inspect.{name}: {what} must be a block index (an int from 1 to {n}), "
                        f"got {i!r}")
    if not 1 <= i <= n:
        raise IndexError(f"inspect.{name}: block {what}={i} is out of range; this network has "
                         f"{n} blocks, numbered 1 to {n}")
    return int(i)


def residual_block(model: Network, i: int, name: str) -> ResidualBlock:
    """Block ``i`` (1-based) if it splits into a skip and a branch, else a clear error."""
    block = model.blocks[i - 1]
    if not isinstance(block, ResidualBlock):
        raise TypeError(f"inspect.{name}: block {i} is a {type(block).__name__}, which has no "
                        f"skip/branch split (only residual and plain blocks do)")
    return block


def host(x) -> np.ndarray:
    """A host NumPy copy of a backend array or Tensor (the documented way off a device)."""
    raw = x.raw if isinstance(x, Tensor) else x
    return backend_of(raw).to_numpy(raw)


@contextlib.contextmanager
def untouched(model: Module) -> Iterator[Module]:
    """Run a measurement on ``model``: batch norm in training mode normalises with the batch's
    statistics but updates nothing (:func:`~miniresnet.nn.frozen_stats`), and every module's
    train/eval mode is put back on exit, whatever happened inside."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        with frozen_stats(model):
            yield model
    finally:
        for m, training in modes:
            object.__setattr__(m, "training", training)


def stream(model: Network, x) -> list:
    """``[h_0, h_1, ..., h_L]`` as backend arrays (call inside :func:`untouched`)."""
    with no_grad():
        hs = [as_tensor(model.stem(x))]
        for block in model.blocks:
            hs.append(as_tensor(block(hs[-1])))
    return [h.raw for h in hs]


def scalar_of_output(model: Network, h_last, y=None, cotangent=None) -> Callable:
    """The scalar ``s`` that inspection differentiates, as a function of the output ``out``:
    the mean cross-entropy against ``y`` when it is given, else ``sum(out * c)`` with ``c`` the
    ``cotangent`` (default: standard normal draws, seed 0, of ``out``'s shape and dtype).
    ``h_last`` (h_L) fixes that shape."""
    if y is not None:
        target = as_tensor(y)
        return lambda out: F.cross_entropy(out, target)
    with no_grad():
        out = as_tensor(model.head(h_last))
    if cotangent is None:
        c = out.backend.rng(0).normal(out.shape, out.backend.dtype_name(out.dtype))
    else:
        c = as_tensor(cotangent)
        if c.shape != out.shape:
            raise ValueError(f"cotangent has shape {c.shape}; it must have the output's shape "
                             f"{out.shape}")
        c = c.raw
    return lambda out: ops.sum(out * c)


def check_module(model, name: str) -> Module:
    """``model`` if it is a :class:`~miniresnet.nn.Module`, else a TypeError naming ``name``."""
    if not isinstance(model, Module):
        raise TypeError(f"inspect.{name}: model must be a miniresnet Module (e.g. a Network built "
                        f"by nn.resnet_cifar or nn.mlp), got {type(model).__name__}")
    return model


def host_data(a, name: str, what: str) -> np.ndarray:
    """``a`` (a NumPy array, a list, a backend array or a Tensor) as a host float64 array: for
    functions that analyse results already measured, such as a series of gradients."""
    if isinstance(a, Tensor) or not isinstance(a, np.ndarray | list | tuple | float | int):
        try:
            a = host(a)
        except TypeError:
            raise TypeError(f"inspect.{name}: {what} must be an array, got "
                            f"{type(a).__name__}") from None
    out = np.asarray(a)
    if not (np.issubdtype(out.dtype, np.floating) or np.issubdtype(out.dtype, np.integer)):
        raise TypeError(f"inspect.{name}: {what} must hold real numbers, got dtype {out.dtype}")
    return out.astype(np.float64)


def output_gradient(model: Network, h_last, y=None, cotangent=None) -> tuple:
    """``(s, ∂s/∂h_L)`` as backend arrays, ``s`` as in :func:`scalar_of_output` (call inside
    :func:`untouched`). Cost: one forward and one reverse pass of the head."""
    from miniresnet.transforms import vjp

    y, cotangent = on_backend_of(h_last, y, cotangent)
    scalar = scalar_of_output(model, h_last, y, cotangent)
    s, vjp_fn = vjp(lambda h: scalar(model.head(h)), h_last)
    return s, vjp_fn(ops.ones_like(as_tensor(s)).raw)[0]


def on_backend_of(like, *values) -> tuple:
    """``values`` (arrays, Tensors or None) moved to the backend and device of ``like``, so that
    host NumPy labels or cotangents can be given for a model on any backend."""
    from miniresnet.backend_choice import as_backend_array

    be = as_tensor(like).backend
    return tuple(None if v is None else as_backend_array(as_tensor(v).raw, backend=be)
                 for v in values)


@contextlib.contextmanager
def hooked(modules, hook) -> Iterator[None]:
    """Within this context, ``hook(module, inputs, output)`` runs after every forward pass of
    each of ``modules``; the hooks are removed on exit, whatever happened inside."""
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def batch_statistics(model, norms, x, caller: str) -> dict:
    """``{buffer name: array}``: the mean and biased variance each training-mode batch norm in
    ``norms`` computes on ``x`` (one forward pass, observed by hooks), named as ``model``'s
    running-statistics buffers so that they can stand in for them (``caller`` names the function
    in errors)."""
    stats, calls = {}, {}

    def observe(module, inputs, _output):
        h = as_tensor(inputs[0]).raw
        xp = as_tensor(inputs[0]).backend.xp
        axes = (0,) if h.ndim == 2 else (0, 2, 3)
        shape = (1, h.shape[1]) + (1,) * (h.ndim - 2)
        mean = xp.mean(h, axis=axes)
        var = xp.mean((h - xp.reshape(mean, shape)) ** 2, axis=axes)  # biased, as training uses
        stats[module] = (mean, var)
        calls[module] = calls.get(module, 0) + 1

    with hooked(norms, observe), no_grad():
        model(x)
    names = {m: name for name, m in model.named_modules()}
    values = {}
    for m, (mean, var) in stats.items():
        if calls[m] > 1:
            raise ValueError(f"{caller}: batch norm {names[m]!r} runs "
                             f"{calls[m]} times in one forward pass; batch_stats='frozen' needs "
                             "each batch norm to see one batch (use batch_stats='coupled')")
        prefix = f"{names[m]}." if names[m] else ""
        values[prefix + "running_mean"], values[prefix + "running_var"] = mean, var
    return values
