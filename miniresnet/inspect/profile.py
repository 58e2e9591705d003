"""One forward and one backward pass, measured everywhere (:func:`profile`), and the exact
Jacobians of blocks (:func:`block_jacobian`, :func:`stream_jacobian`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from miniresnet.inspect._common import (
    check_block_index,
    check_network,
    hooked,
    host,
    on_backend_of,
    scalar_of_output,
    untouched,
)
from miniresnet.nn import layers
from miniresnet.nn.blocks import ResidualBlock
from miniresnet.nn.module import Module, substituted
from miniresnet.tracing import as_tensor, no_grad
from miniresnet.transforms import jacobian, vjp


@dataclasses.dataclass(frozen=True, eq=False)
class Profile:
    """What :func:`profile` measured; every array is host NumPy.

    Norms are Euclidean (Frobenius) over the whole batch.

    Attributes
    ----------
    value : float
        The scalar ``s`` that was differentiated.
    grad_norm : (L+1,)
        ‖∂s/∂h_l‖ for l = 0..L.
    forward_norm, forward_std : (L+1,)
        ‖h_l‖ and the standard deviation of all entries of h_l.
    activations : tuple of str
        The dotted names of the activation modules, in the order they ran (a module that runs
        twice appears twice).
    active : (A,)
        Per activation, the fraction of its units (every entry of its input but the batch axis)
        that are active, i.e. whose input (pre-activation) is > 0, over the batch; for ReLU this
        is where the output is nonzero, for tanh and sigmoid where it is above its value at 0.
    coactive : (A,)
        Balduzzi et al.'s statistic: the fraction of units active for both samples of a pair,
        averaged over all pairs of distinct samples (NaN for a batch of one).
    parameters : tuple of str
        Parameter names, as ``model.named_parameters()``.
    param_grad_norm, param_norm, param_ratio : (P,)
        ‖∂s/∂W‖, ‖W‖ and their ratio (inf where W = 0).
    skip_norm, branch_norm : (L,)
        Per block, ‖λ·S(u)‖ and ‖α·β·F(h_{l-1})‖ (NaN for the skip of a plain block and for
        both terms of a highway block).
    """

    value: float
    grad_norm: np.ndarray
    forward_norm: np.ndarray
    forward_std: np.ndarray
    activations: tuple
    active: np.ndarray
    coactive: np.ndarray
    parameters: tuple
    param_grad_norm: np.ndarray
    param_norm: np.ndarray
    param_ratio: np.ndarray
    skip_norm: np.ndarray
    branch_norm: np.ndarray


def _norm(xp, a):
    return xp.sqrt(xp.sum(a * a))


def _host_stack(xp, values, like) -> np.ndarray:
    """0-d backend arrays (or None for NaN) as one host array: one transfer, not one each."""
    if not values:
        return np.zeros(0)
    nan = xp.asarray(float("nan"), dtype=like.dtype, device=like.device)
    return host(xp.stack([nan if v is None else v for v in values]))


def _activation_types() -> tuple:
    # read at call time: the table of activations grows; Identity is no activation to measure
    return tuple({cls for cls in layers.ACTIVATIONS.values() if cls is not layers.Identity})


def _unit_statistics(xp, a):
    """(active, coactive) of pre-activations ``a`` (batch first) as 0-d backend arrays."""
    n = a.shape[0]
    on = xp.astype(xp.reshape(a > 0, (n, -1)), a.dtype)
    units = on.shape[1]
    per_unit = xp.sum(on, axis=0)  # Σ_{i≠j} on_i·on_j = (Σ_i on_i)² − Σ_i on_i (on² = on)
    pairs = xp.sum(per_unit * per_unit) - xp.sum(per_unit)
    coactive = pairs / (n * (n - 1) * units) if n > 1 else None
    return xp.mean(on), coactive


def _parts(module: Module) -> tuple[list[str], list]:
    names = [n for n, _ in module.named_parameters()]
    return names, [p.raw for _, p in module.named_parameters()]


def profile(model, x, y=None, *, cotangent=None) -> Profile:
    """Measure the forward signal, the backward gradient, the activations and the parameters
    of ``model`` at input ``x`` in one forward and one backward pass.

    ``s`` is the mean cross-entropy against ``y`` when it is given, else ``sum(out * c)`` with
    ``c`` the ``cotangent`` (default: standard normal, seed 0). The model is run in its mode
    (training-mode batch norm normalises with the batch's statistics and updates nothing) and
    left as it was. See :class:`Profile` for what is returned.

    Cost: one forward and one reverse pass of the network (the graph of the whole network is
    held, as in training), and a few reductions per block, parameter and activation.
    """
    model = check_network(model, "profile")
    names = {id(m): name for name, m in model.named_modules()}
    kinds = _activation_types()
    recording, acts, stats = [True], [], []

    def hook(module, args, out):
        if recording[0]:
            a = as_tensor(args[0])
            acts.append(names.get(id(module), type(module).__name__))
            stats.append(_unit_statistics(a.backend.xp, a.raw))

    with hooked((m for m in model.modules() if isinstance(m, kinds)), hook), untouched(model):
        return _profile(model, x, y, cotangent, recording, acts, stats)


def _profile(model, x, y, cotangent, recording, acts, stats) -> Profile:
    stem_names, stem_params = _parts(model.stem)

    def stem(*ps):
        with substituted(model.stem, dict(zip(stem_names, ps))):
            return model.stem(x)

    h, stem_vjp = vjp(stem, *stem_params)
    xp = as_tensor(h).backend.xp
    hs, block_vjps, skips, branches, block_names = [h], [], [], [], []
    for block in model.blocks:
        names, params = _parts(block)
        terms = []

        def run(u, *ps, block=block, names=names, terms=terms):
            with substituted(block, dict(zip(names, ps))):
                if not isinstance(block, ResidualBlock):
                    return block(u)
                skip, branch = block.terms(u)
                terms.append((skip, branch))
                return block.post(branch if skip is None else branch + skip)

        h, block_vjp = vjp(run, h, *params)
        hs.append(h)
        block_vjps.append(block_vjp)
        block_names.append(names)
        skip, branch = terms[0] if terms else (None, None)
        skips.append(None if skip is None else _norm(xp, as_tensor(skip).raw))
        branches.append(None if branch is None else _norm(xp, as_tensor(branch).raw))
    recording[0] = False  # the head's shape probe in scalar_of_output is not a forward pass
    scalar = scalar_of_output(model, h, *on_backend_of(h, y, cotangent))
    recording[0] = True
    head_names, head_params = _parts(model.head)

    def head(u, *ps):
        with substituted(model.head, dict(zip(head_names, ps))):
            return scalar(model.head(u))

    value, head_vjp = vjp(head, h, *head_params)
    # one reverse pass, block by block, keeping ∂s/∂h_l and every parameter gradient
    g, *head_grads = head_vjp(xp.ones((), dtype=value.dtype, device=value.device))
    grads = {f"head.{n}": d for n, d in zip(head_names, head_grads)}
    grad_norms = [_norm(xp, g)]
    for j in range(len(block_vjps) - 1, -1, -1):
        g, *block_grads = block_vjps[j](g)
        grads.update({f"blocks.{j}.{n}": d for n, d in zip(block_names[j], block_grads)})
        grad_norms.append(_norm(xp, g))
    grads.update({f"stem.{n}": d for n, d in zip(stem_names, stem_vjp(g))})
    params = list(model.named_parameters())
    param_grad_norm = _host_stack(xp, [_norm(xp, grads[n]) for n, _ in params], value)
    param_norm = _host_stack(xp, [_norm(xp, p.raw) for _, p in params], value)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = param_grad_norm / param_norm
    return Profile(
        value=float(host(value)),
        grad_norm=_host_stack(xp, grad_norms[::-1], value),
        forward_norm=_host_stack(xp, [_norm(xp, a) for a in hs], value),
        forward_std=_host_stack(xp, [xp.std(a) for a in hs], value),
        activations=tuple(acts),
        active=_host_stack(xp, [a for a, _ in stats], value),
        coactive=_host_stack(xp, [c for _, c in stats], value),
        parameters=tuple(n for n, _ in params),
        param_grad_norm=param_grad_norm,
        param_norm=param_norm,
        param_ratio=ratio,
        skip_norm=_host_stack(xp, skips, value),
        branch_norm=_host_stack(xp, branches, value),
    )


def _input_of(model, x, start: int):
    """``h_{start-1}``, a backend array (call inside :func:`untouched`)."""
    with no_grad():
        h = as_tensor(model.stem(x))
        for block in list(model.blocks)[:start - 1]:
            h = as_tensor(block(h))
    return h.raw


def stream_jacobian(model, x, start: int, stop: int) -> np.ndarray:
    """The exact Jacobian of blocks ``start..stop`` (1-based, inclusive) together at the point
    ``h_{start-1}`` the input ``x`` reaches, shape ``h_stop.shape + h_{start-1}.shape``.

    The shapes include the batch axis: with batch norm in training mode the samples of a batch
    are coupled (the off-diagonal sample blocks are nonzero, and each normalisation has two
    null directions per channel, the batch mean and scale); in evaluation mode the Jacobian is
    block diagonal over samples.

    Cost: a forward pass to block ``start``, then reverse passes through the blocks that carry
    many basis cotangents at once; memory h_stop.size × h_{start-1}.size numbers.
    """
    model = check_network(model, "stream_jacobian")
    start = check_block_index(model, start, "stream_jacobian", "start")
    stop = check_block_index(model, stop, "stream_jacobian", "stop")
    if start > stop:
        raise ValueError(f"inspect.stream_jacobian: start={start} is after stop={stop}; give "
                         f"1 <= start <= stop <= {len(model.blocks)}")
    blocks = list(model.blocks)[start - 1:stop]

    def run(h):
        for block in blocks:
            h = block(h)
        return h

    with untouched(model):
        return host(jacobian(run)(_input_of(model, x, start)))


def block_jacobian(model, x, i: int) -> np.ndarray:
    """The exact Jacobian of block ``i`` (1-based) at its input ``h_{i-1}``, of shape
    ``h_i.shape + h_{i-1}.shape`` (see :func:`stream_jacobian` for batch norm's coupling of the
    samples in training mode).

    Cost: a forward pass to block ``i``, then reverse passes through block ``i`` carrying many
    basis cotangents at once; memory h_i.size × h_{i-1}.size numbers.
    """
    model = check_network(model, "block_jacobian")
    i = check_block_index(model, i, "block_jacobian")
    return stream_jacobian(model, x, i, i)
