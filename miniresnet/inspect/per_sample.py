"""Per-sample gradients: every sample's parameter gradient of its own loss, from one reverse
pass carrying a stack of cotangents, and the gradient-noise statistics they give (mean,
variance, second moment, per-sample norms and the signal-to-noise ratio), per parameter tensor
and per block. BackPACK estimates these with extensions of PyTorch's backward pass; here they
are the exact individual gradients, checked against a loop of single-sample gradients."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from miniresnet import functional as F
from miniresnet.inspect._common import check_network, host, on_backend_of, untouched
from miniresnet.inspect.gradients import GradientSNR, _snr
from miniresnet.nn.layers import BatchNorm1d, BatchNorm2d
from miniresnet.nn.module import functional_call
from miniresnet.tracing import as_tensor
from miniresnet.transforms import vjp

GROUPS = ("stem", "head", "total")


@dataclass
class PerSampleGradients:
    """:func:`per_sample_gradients`' result: every sample's gradients and their statistics.

    ``gradients`` maps each parameter name to an ``(N, *shape)`` host array: row n is the
    gradient of sample n's cross-entropy. ``losses`` holds those N losses. Statistics are taken
    over the N samples (biased: divided by N, as :func:`~miniresnet.inspect.gradient_snr` does)
    for a *group*, named by

    - a parameter name (e.g. ``"blocks.0.branch.0.weight"``): per-coordinate results have the
      parameter's shape;
    - ``"stem"``, ``"head"``, ``"total"`` (all parameters), or an int l (block l, 1-based, as in
      ``gradient_snr``'s ``blocks[l - 1]``): per-coordinate results are flat vectors over the
      group's parameters in registration order.
    """

    gradients: dict[str, np.ndarray]
    losses: np.ndarray
    blocks: list[list[str]] = field(repr=False)
    stem: list[str] = field(repr=False)
    head: list[str] = field(repr=False)

    @property
    def samples(self) -> int:
        return int(self.losses.shape[0])

    def names(self, group) -> list[str]:
        """The parameter names of ``group``."""
        if isinstance(group, str):
            if group in self.gradients:
                return [group]
            if group == "total":
                return list(self.gradients)
            if group in ("stem", "head"):
                return list(getattr(self, group))
        elif not isinstance(group, bool) and isinstance(group, int | np.integer):
            if 1 <= group <= len(self.blocks):
                return list(self.blocks[group - 1])
            raise IndexError(f"PerSampleGradients: block {group} is out of range; the network "
                             f"has {len(self.blocks)} blocks, numbered 1 to {len(self.blocks)}")
        raise KeyError(f"PerSampleGradients: unknown group {group!r}; valid: a parameter name, "
                       f"'stem', 'head', 'total' or a block number 1 to {len(self.blocks)}")

    def flat(self, group) -> np.ndarray:
        """``(N, P_group)``: each sample's gradient over the group, flattened and joined."""
        names = self.names(group)
        if not names:
            return np.zeros((self.samples, 0))
        return np.concatenate([self.gradients[n].reshape(self.samples, -1) for n in names],
                              axis=1)

    def _shaped(self, group, v: np.ndarray) -> np.ndarray:
        if isinstance(group, str) and group in self.gradients:
            return v.reshape(self.gradients[group].shape[1:])
        return v

    def mean(self, group) -> np.ndarray:
        """``ḡ = mean_n g_n``, the gradient of the batch's mean loss, per coordinate."""
        return self._shaped(group, self.flat(group).mean(axis=0))

    def variance(self, group) -> np.ndarray:
        """``mean_n (g_n − ḡ)²`` per coordinate (biased); its sum is the SNR's noise."""
        g = self.flat(group)
        return self._shaped(group, np.mean((g - g.mean(axis=0)) ** 2, axis=0))

    def second_moment(self, group) -> np.ndarray:
        """``mean_n g_n²`` per coordinate (= variance + mean²)."""
        return self._shaped(group, np.mean(self.flat(group) ** 2, axis=0))

    def norms(self, group) -> np.ndarray:
        """``(N,)``: each sample's gradient L2 norm over the group."""
        return np.linalg.norm(self.flat(group), axis=1)

    def snr(self, group) -> float:
        """``‖ḡ‖² / mean_n ‖g_n − ḡ‖²`` over the samples: :func:`~miniresnet.inspect.
        gradient_snr`'s definition with one-sample minibatches (``inf`` when every sample has
        the same nonzero gradient, ``nan`` for a group without parameters or all zero)."""
        return _snr(list(self.flat(group)))

    def snr_summary(self) -> GradientSNR:
        """The SNR of every parameter, block, the stem, the head and all, as
        :func:`~miniresnet.inspect.gradient_snr` returns it (``batches`` = N samples)."""
        return GradientSNR(parameters={n: self.snr(n) for n in self.gradients},
                           blocks=np.array([self.snr(i + 1) for i in range(len(self.blocks))]),
                           stem=self.snr("stem"), head=self.snr("head"),
                           total=self.snr("total"), batches=self.samples)

    def summary(self) -> dict:
        """JSON-ready scalars per group (``"stem"``, ``"block 1"``.., ``"head"``,
        ``"total"``): ``mean_norm`` ‖ḡ‖, ``variance`` (summed over coordinates),
        ``second_moment`` (summed), ``norm_mean`` and ``norm_max`` of the per-sample norms,
        ``snr``."""
        out = {}
        keys = ["stem", *range(1, len(self.blocks) + 1), "head", "total"]
        for key in keys:
            g = self.flat(key)
            norms = np.linalg.norm(g, axis=1)
            out[f"block {key}" if isinstance(key, int) else key] = {
                "mean_norm": float(np.linalg.norm(g.mean(axis=0))),
                "variance": float(np.sum(np.mean((g - g.mean(axis=0)) ** 2, axis=0))),
                "second_moment": float(np.sum(np.mean(g ** 2, axis=0))),
                "norm_mean": float(norms.mean()) if norms.size else math.nan,
                "norm_max": float(norms.max()) if norms.size else math.nan,
                "snr": _snr(list(g)),
            }
        return out


def _check_chunk(chunk) -> int | None:
    if chunk is None:
        return None
    if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer) or chunk < 1:
        raise ValueError(f"inspect.per_sample_gradients: chunk must be a positive int (samples "
                         f"per pass) or None (all in one pass), got {chunk!r}")
    return int(chunk)


def per_sample_gradients(model, x, y, *, chunk: int | None = None) -> PerSampleGradients:
    """Every sample's parameter gradients of its own cross-entropy, in one stacked pass.

    With ``ℓ_n`` the cross-entropy of sample n, the result holds ``g_n = ∂ℓ_n/∂θ`` for every
    parameter tensor: the reverse pass of the per-sample losses ``(ℓ_1..ℓ_N)`` carries the N
    unit cotangents ``e_1..e_N`` at once. This is exact only when the samples do not interact,
    i.e. in evaluation mode (batch norm in training mode normalises with the batch's statistics,
    so ``ℓ_n`` depends on every sample: refused). Their mean is the gradient of the batch's
    mean cross-entropy.

    Parameters
    ----------
    model : Network
        Built by ``nn.resnet_cifar`` or ``nn.mlp``; every batch norm must be in evaluation
        mode (``model.eval()``). The model is left as it was.
    x, y : arrays
        N inputs and their integer labels (host NumPy or the model's backend).
    chunk : int, optional
        Samples per pass (default: all N in one pass); bounds device memory (below).

    Returns
    -------
    PerSampleGradients
        Host float arrays; statistics per parameter, per block and in total.

    Cost
    ----
    One forward pass and one reverse pass carrying N cotangents. Each cotangent spans the whole
    batch (it is zero outside its sample), so that pass does the work of N reverse passes and
    holds N cotangents of every activation: device memory about N² × one sample's activations.
    With ``chunk=k`` there are ⌈N/k⌉ passes of k samples and k cotangents: memory about k² ×
    one sample's activations, work about N·k single-sample reverse passes (``chunk=1`` is the
    plain loop). The result takes N × P numbers on the host (P parameters).
    """
    model = check_network(model, "per_sample_gradients")
    chunk = _check_chunk(chunk)
    coupled = [name for name, m in model.named_modules()
               if isinstance(m, BatchNorm1d | BatchNorm2d) and m.training]
    if coupled:
        more = f" (and {len(coupled) - 1} more)" if len(coupled) > 1 else ""
        raise ValueError(
            f"inspect.per_sample_gradients: batch norm {coupled[0]!r}{more} is in training "
            "mode, where it normalises each sample with the batch's statistics, so the samples "
            "are coupled and none has a gradient of its own; call model.eval() first (or pass "
            "an evaluation-mode copy, e.g. copy.deepcopy(model).eval())")
    names = [n for n, _ in model.named_parameters()]
    if not names:
        raise ValueError("inspect.per_sample_gradients: the model has no parameters")
    params = [p.raw for p in model.parameters()]
    x, y = on_backend_of(params[0], x, y)
    if x.ndim < 1 or y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"inspect.per_sample_gradients: x must have N samples on axis 0 and y "
                         f"N labels; got x of shape {tuple(x.shape)} and y of shape "
                         f"{tuple(y.shape)}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("inspect.per_sample_gradients: x holds no samples")
    step = n if chunk is None else min(chunk, n)
    xp = as_tensor(params[0]).backend.xp
    parts: list[list[np.ndarray]] = [[] for _ in names]
    losses = []
    with untouched(model):
        for start in range(0, n, step):
            stop = min(n, start + step)
            xb, yb = x[start:stop, ...], y[start:stop]

            def loss(*arrays, xb=xb, yb=yb):
                out = functional_call(model, dict(zip(names, arrays)), xb)
                return F.cross_entropy(out, as_tensor(yb), reduction="none")

            ell, vjp_fn = vjp(loss, *params)
            ell = as_tensor(ell)
            # cotangent k is e_k: row k of the result is sample k's own gradient
            eye = xp.eye(stop - start, dtype=ell.dtype, device=ell.raw.device)
            for part, g in zip(parts, vjp_fn(eye)):
                part.append(host(g))
            losses.append(host(ell))
    gradients = {name: np.concatenate(part) if len(part) > 1 else part[0]
                 for name, part in zip(names, parts)}
    name_of = {id(p): name for name, p in model.named_parameters()}

    def of(module) -> list[str]:
        return [name_of[id(p)] for p in module.parameters()]

    return PerSampleGradients(gradients=gradients, losses=np.concatenate(losses),
                              blocks=[of(b) for b in model.blocks], stem=of(model.stem),
                              head=of(model.head))
