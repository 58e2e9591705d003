"""Curvature of the loss from Hessian-vector products: top eigenpairs (Lanczos with full
reorthogonalisation), the trace (Hutchinson, Hutch++), the spectral density (stochastic Lanczos
quadrature) and the generalised Gauss–Newton matrix's products and top eigenpairs.

These are the estimates PyHessian makes for PyTorch models; here each one is tested against
the exact Hessian (:func:`~miniresnet.inspect.hessian`) and the exact Gauss–Newton matrix of
networks small enough to form them, so a number measured on a large network comes from a
method whose answer is known to be right where it can be checked.

The scalar is the mean cross-entropy ``L(θ) = CE(model_θ(x), y)`` over all parameters or a
selection ``params``: ``None`` (all), a block index ``l`` (1-based, the parameters of
``model.blocks[l - 1]``) or a list of parameter names. Vectors over the selection are host
float64 arrays flattened in ``named_parameters`` order; every product runs on the model's
backend, in the parameters' dtype.

Batch norm (argument ``bn``, the same in every function):

- ``"frozen"`` (default): training-mode batch norm with *this batch's* mean and biased
  variance held constant, i.e. evaluation mode with the running statistics replaced by the
  batch's. The samples stay independent and, unlike ``"eval"``, it means something at
  initialisation, where the running statistics are still 0 and 1 and evaluation mode is then
  (nearly) a network without batch norm.
- ``"eval"``: evaluation mode, the running statistics (what PyHessian measures).
- ``"batch"``: training mode, differentiated through the batch statistics, which depend on
  θ and couple the samples: the Hessian of the loss that training descends.

Without batch norm the three agree. The model is left as it was: parameters, ``.grad``,
running statistics and train/eval mode.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy.linalg import eigh_tridiagonal

from miniresnet import functional as F
from miniresnet.inspect._common import (
    batch_statistics,
    check_block_index,
    check_module,
    check_network,
    host,
    on_backend_of,
    untouched,
)
from miniresnet.nn.layers import BatchNorm1d, BatchNorm2d
from miniresnet.nn.module import functional_call, substituted
from miniresnet.tracing import as_tensor
from miniresnet.transforms import hvp, jvp, vjp

#: the batch-norm modes every function here accepts (see the module's docstring)
BN_MODES = ("frozen", "eval", "batch")
TRACE_METHODS = ("hutchinson", "hutch++")
#: Lanczos steps by default (capped at the number of parameters)
DEFAULT_STEPS = 40
#: probes (tangents) pushed through the network together in one Hessian-vector product
DEFAULT_CHUNK = 8


# -- argument checks ----------------------------------------------------------------------------


def _check_int(value, name: str, what: str, low: int, high: int | None = None,
               why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"inspect.{name}: {what} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        valid = f"{low} to {high}" if high is not None else f"at least {low}"
        raise ValueError(f"inspect.{name}: {what}={value} is out of range; valid: {valid}{why}")
    return int(value)


def _check_bn(bn, name: str) -> str:
    if not isinstance(bn, str) or bn not in BN_MODES:
        raise ValueError(f"inspect.{name}: unknown bn {bn!r}; valid: "
                         f"{', '.join(map(repr, BN_MODES))}")
    return bn


def _select(model, params, name: str) -> list:
    """The selected ``(name, parameter)`` pairs, in ``named_parameters`` order."""
    named = list(model.named_parameters())
    if not named:
        raise ValueError(f"inspect.{name}: the model has no parameters")
    if params is None:
        return named
    if isinstance(params, int | np.integer) and not isinstance(params, bool):
        net = check_network(model, name)
        i = check_block_index(net, params, name, "params")
        own = {id(p) for p in net.blocks[i - 1].parameters()}
        chosen = [(n, p) for n, p in named if id(p) in own]
        if not chosen:
            raise ValueError(f"inspect.{name}: block {i} has no parameters")
        return chosen
    if not isinstance(params, list | tuple) or not all(isinstance(n, str) for n in params):
        raise TypeError(f"inspect.{name}: params must be None (all parameters), a block index "
                        f"(an int) or a list of parameter names, got {params!r}")
    known = dict(named)
    unknown = [n for n in params if n not in known]
    if unknown or not params or len(set(params)) != len(params):
        what = (f"unknown names {unknown}" if unknown else "an empty list" if not params
                else "repeated names")
        raise ValueError(f"inspect.{name}: params has {what}; valid names: "
                         f"{', '.join(known)}")
    return [(n, p) for n, p in named if n in set(params)]


def _check_data(x, y, like, name: str) -> tuple:
    """``x`` and ``y`` on the backend of ``like``, with ``y`` one integer label per sample."""
    x, y = on_backend_of(like, x, y)
    xt, yt = as_tensor(x), as_tensor(y)
    if xt.ndim < 1:
        raise ValueError(f"inspect.{name}: x must have a sample axis (axis 0), got a scalar")
    if yt.shape != (xt.shape[0],):
        raise ValueError(f"inspect.{name}: y must hold one integer label per sample, shape "
                         f"({xt.shape[0]},) for x of shape {xt.shape}; got shape {yt.shape}")
    if not yt.backend.xp.isdtype(yt.dtype, "integral"):
        raise TypeError(f"inspect.{name}: y must be integer class labels, got dtype {yt.dtype}")
    return x, y


# -- the operators, on the device ---------------------------------------------------------------


class _Curvature:
    """The loss at one point and its curvature products; host ``(P, k)`` blocks in and out,
    ``k`` tangents in one pass on the device. Build inside :func:`_prepared`."""

    def __init__(self, model, x, y, chosen):
        self.model, self.x, self.y = model, x, as_tensor(y)
        self.names = [n for n, _ in chosen]
        self.params = tuple(p.raw for _, p in chosen)
        self.shapes = [tuple(p.shape) for _, p in chosen]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.dim = sum(self.sizes)
        t = as_tensor(self.params[0])
        self.backend = t.backend
        self.eps = float(np.finfo(np.dtype(t.backend.dtype_name(t.dtype))).eps)
        self._linearised = None

    def output(self, *arrays):
        return functional_call(self.model, dict(zip(self.names, arrays)), self.x)

    def loss(self, *arrays):
        return F.cross_entropy(self.output(*arrays), self.y)

    def _to_device(self, v: np.ndarray) -> tuple:
        rows, out, start = np.ascontiguousarray(v.T), [], 0
        for p, shape, size in zip(self.params, self.shapes, self.sizes):
            dtype = self.backend.dtype_name(as_tensor(p).dtype)
            piece = rows[:, start:start + size].reshape((v.shape[1],) + shape)
            out.append(self.backend.asarray(piece, dtype))
            start += size
        return tuple(out)

    def _to_host(self, parts, k: int) -> np.ndarray:
        return np.concatenate([host(t).reshape(k, -1) for t in parts], axis=1).T.astype(
            np.float64)

    def hessian(self, v: np.ndarray) -> np.ndarray:
        """``H v`` for the columns of ``v`` (P, k): one forward-over-reverse pass."""
        return self._to_host(hvp(self.loss, self.params, self._to_device(v)), v.shape[1])

    def ggn(self, v: np.ndarray) -> np.ndarray:
        """``Jᵀ H_out J v`` for the columns of ``v`` (P, k): a JVP of the logits, the softmax
        cross-entropy Hessian per sample, then a VJP through the linearisation kept from the
        first call."""
        if self._linearised is None:
            out, vjp_fn = vjp(self.output, *self.params)
            z = as_tensor(out).raw
            xp = self.backend.xp
            e = xp.exp(z - xp.max(z, axis=1, keepdims=True))
            self._linearised = (e / xp.sum(e, axis=1, keepdims=True), vjp_fn, z.shape[0])
        p, vjp_fn, n = self._linearised
        xp = self.backend.xp
        _, jv = jvp(self.output, self.params, self._to_device(v))
        jv = as_tensor(jv).raw  # (k, N, C)
        # ∂²CE_n/∂z_n² = diag(p_n) − p_n p_nᵀ; the mean over N samples divides by N
        u = p * (jv - xp.sum(p * jv, axis=-1, keepdims=True)) / n
        return self._to_host(vjp_fn(u), v.shape[1])


@contextlib.contextmanager
def _prepared(model, x, y, bn: str, chosen) -> Iterator[_Curvature]:
    """The curvature operators of ``model`` with batch norm as ``bn`` says; on exit the model
    is as it was."""
    with untouched(model):
        stats = {}
        if bn == "eval":
            model.eval()
        else:
            model.train()  # untouched: training-mode batch norm updates nothing
            norms = [m for m in model.modules() if isinstance(m, BatchNorm1d | BatchNorm2d)]
            if bn == "frozen" and norms:
                stats = batch_statistics(model, norms, x, "inspect (bn='frozen')")
                for m in norms:  # evaluation mode with this batch's statistics as running ones
                    object.__setattr__(m, "training", False)
        with substituted(model, stats):
            yield _Curvature(model, x, y, chosen)


def _in_chunks(apply: Callable, v: np.ndarray, chunk: int) -> np.ndarray:
    """``apply`` to the columns of ``v``, ``chunk`` at a time (each chunk one pass)."""
    return np.concatenate([apply(v[:, i:i + chunk]) for i in range(0, v.shape[1], chunk)],
                          axis=1)


def _rademacher(seed: int, dim: int, first: int, count: int) -> np.ndarray:
    """Probes ``first .. first + count − 1`` of stream ``seed``: (dim, count) of ±1. Probe i
    has its own generator, so the same seed gives the same probes however they are chunked
    (the Hutchinson probes of :func:`hessian_trace` are the start vectors of
    :func:`hessian_density` with the same seed)."""
    children = np.random.SeedSequence(seed).spawn(first + count)[first:]
    return np.stack([np.random.default_rng(c).integers(0, 2, dim) * 2.0 - 1.0
                     for c in children], axis=1)


# -- results ------------------------------------------------------------------------------------


def _slices(names, shapes) -> dict[str, slice]:
    out, start = {}, 0
    for name, shape in zip(names, shapes):
        size = math.prod(shape)
        out[name], start = slice(start, start + size), start + size
    return out


@dataclass
class Eigenpairs:
    """Top eigenpairs of a symmetric operator found by Lanczos.

    ``values`` (k,) in descending order; ``vectors`` (k, P): unit Ritz vectors, one per row,
    flattened in ``named_parameters`` order over the selected parameters ``names`` of
    ``shapes`` (sign fixed so that the entry largest in magnitude is positive);
    ``residuals`` (k,): Lanczos's estimate of ``‖A v − λ v‖`` at no extra cost (raise the
    steps if they are not small next to ``|values|``); ``lanczos`` the run they came from:
    its :meth:`Lanczos.trace` and :meth:`Lanczos.density` reuse it.
    """

    values: np.ndarray
    vectors: np.ndarray | None
    residuals: np.ndarray
    names: list[str] | None
    shapes: list[tuple[int, ...]] | None
    lanczos: Lanczos

    def slices(self) -> dict[str, slice]:
        """Each parameter's columns of ``vectors``."""
        if self.names is None:
            raise ValueError("Eigenpairs.slices: these vectors are not over named parameters")
        return _slices(self.names, self.shapes)

    def parameter(self, name: str) -> np.ndarray:
        """The eigenvectors' part for parameter ``name``, shape ``(k,) + its shape``."""
        where = self.slices()
        if name not in where:
            raise KeyError(f"Eigenpairs.parameter: no parameter {name!r}; valid: "
                           f"{', '.join(self.names)}")
        if self.vectors is None:
            raise ValueError("Eigenpairs.parameter: the vectors were not kept")
        shape = self.shapes[self.names.index(name)]
        return self.vectors[:, where[name]].reshape((len(self.values),) + shape)


@dataclass
class TraceEstimate:
    """A trace estimate: ``value`` and its standard error ``stderr`` (NaN from one sample),
    from ``samples`` operator products by ``method``. ``draws`` are the independent terms
    whose mean is the random part: ``zᵀ A z`` per probe (Hutchinson), or per probe of the
    deflated remainder (Hutch++, whose ``value`` adds the exact trace on the sketched
    subspace)."""

    value: float
    stderr: float
    samples: int
    method: str
    draws: np.ndarray


@dataclass
class Lanczos:
    """One or more Lanczos runs on a symmetric ``dim × dim`` operator ``A``.

    Run r of ``m`` steps gives the tridiagonal ``T = Qᵀ A Q`` (``alphas[r]`` its diagonal,
    ``betas[r][:-1]`` its off-diagonal; ``betas[r][-1]`` the norm of the residual left after
    the last step, ≈ 0 if the Krylov space was exhausted). ``basis[r]`` holds the orthonormal
    Lanczos vectors as rows (``None`` if not kept). ``names``/``shapes`` say which parameters
    the vectors run over, if any.

    From T: :meth:`top` (Ritz values and vectors), :attr:`nodes` and :attr:`weights`
    (Gauss quadrature of the spectral measure seen from the start vector ``q``:
    ``qᵀ f(A) q ≈ Σ_i w_i f(θ_i)``, exact for polynomials of degree < 2m), :meth:`trace`
    and :meth:`density` (stochastic Lanczos quadrature over the runs).
    """

    alphas: list[np.ndarray]
    betas: list[np.ndarray]
    dim: int
    basis: list[np.ndarray] | None = None
    names: list[str] | None = None
    shapes: list[tuple[int, ...]] | None = None

    @property
    def runs(self) -> int:
        return len(self.alphas)

    def _check_run(self, run) -> int:
        return _check_int(run, "Lanczos", "run", 0, self.runs - 1)

    def tridiagonal(self, run: int = 0) -> np.ndarray:
        """Run ``run``'s ``T`` as a dense (m, m) matrix."""
        run = self._check_run(run)
        a, b = self.alphas[run], self.betas[run][:-1]
        return np.diag(a) + np.diag(b, 1) + np.diag(b, -1)

    def _eig(self, run: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.alphas[run], self.betas[run][:-1]
        if len(a) == 1:
            return a.copy(), np.ones((1, 1))
        return eigh_tridiagonal(a, b)

    @property
    def nodes(self) -> list[np.ndarray]:
        """Per run, the Ritz values ``θ_i`` (eigenvalues of T), ascending."""
        return [self._eig(r)[0] for r in range(self.runs)]

    @property
    def weights(self) -> list[np.ndarray]:
        """Per run, the quadrature weights ``w_i`` (squared first entries of T's
        eigenvectors, summing to 1), matching :attr:`nodes`."""
        return [self._eig(r)[1][0] ** 2 for r in range(self.runs)]

    def top(self, k: int = 1, *, run: int = 0) -> Eigenpairs:
        """The k largest Ritz values of run ``run`` (descending), with Ritz vectors if the
        basis was kept and residual estimates ``|β_m s_{m,i}|``."""
        run = self._check_run(run)
        m = len(self.alphas[run])
        k = _check_int(k, "Lanczos.top", "k", 1, m,
                       f" (run {run} has {m} steps: the Krylov space from its start vector "
                       f"has dimension {m})")
        theta, s = self._eig(run)
        order = np.argsort(theta)[::-1][:k]
        residuals = np.abs(self.betas[run][-1] * s[-1, order])
        vectors = None
        if self.basis is not None:
            vectors = (self.basis[run][:m].T @ s[:, order]).T
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            big = np.argmax(np.abs(vectors), axis=1)
            vectors *= np.sign(vectors[np.arange(k), big])[:, None]
        return Eigenpairs(theta[order], vectors, residuals, self.names, self.shapes, self)

    def trace(self) -> TraceEstimate:
        """Stochastic Lanczos quadrature of ``tr A``: ``dim · Σ_i w_i θ_i`` per run, averaged
        over the runs (standard error over runs; NaN from one run). With unit start vectors
        ``q = z / √dim``, z Rademacher, this equals Hutchinson's ``zᵀ A z`` on the same
        probes (``Σ w θ = qᵀ A q``), however many steps were taken."""
        draws = np.array([self.dim * float(w @ t) for w, t in zip(self.weights, self.nodes)])
        stderr = float(np.std(draws, ddof=1) / np.sqrt(len(draws))) if len(draws) > 1 \
            else math.nan
        return TraceEstimate(float(np.mean(draws)), stderr, self.runs, "slq", draws)

    def density(self, grid=None, sigma: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The spectral density smoothed by a Gaussian of width ``sigma``:
        ``ρ(t) = mean_r Σ_i w_ri N(t; θ_ri, σ²)``, which integrates to 1 over the real line.

        ``grid`` defaults to 1001 points from the smallest node − 5σ to the largest + 5σ;
        ``sigma`` to 1% of the nodes' range (1e-3 · max(1, |θ|) if they all coincide).
        Returns ``(grid, ρ(grid))``.
        """
        nodes, weights = np.concatenate(self.nodes), np.concatenate(self.weights) / self.runs
        low, high = float(nodes.min()), float(nodes.max())
        if sigma is None:
            sigma = 0.01 * (high - low) or 1e-3 * max(1.0, abs(high))
        if not (isinstance(sigma, int | float | np.floating) and np.isfinite(sigma)
                and sigma > 0):
            raise ValueError(f"Lanczos.density: sigma must be a positive number, got {sigma!r}")
        t = (np.linspace(low - 5 * sigma, high + 5 * sigma, 1001) if grid is None
             else np.asarray(grid, dtype=np.float64))
        z = (t[:, None] - nodes[None, :]) / sigma
        return t, np.exp(-0.5 * z * z) @ weights / (sigma * np.sqrt(2 * np.pi))


# -- Lanczos on any symmetric operator (host) ---------------------------------------------------


def lanczos(matvec: Callable, dim: int, steps: int, seed: int = 0, *, runs: int = 1,
            start=None, reorthogonalize: bool = True, keep_basis: bool = True,
            tol: float | None = None) -> Lanczos:
    """Lanczos tridiagonalisation of a symmetric operator on host float64 vectors.

    Parameters
    ----------
    matvec : callable
        ``matvec(V)`` for a host (dim, r) block returns ``A V`` (dim, r); the ``runs`` are
        carried in lockstep, so each step is one call with all active runs' vectors (one
        stacked pass when ``A`` is a network's curvature).
    dim, steps : int
        The operator's size and the most steps per run (1 to dim).
    seed : int
        Start vectors ``z / √dim`` with z Rademacher, one independent stream per run (probe r of
        :func:`hessian_trace` with the same seed).
    runs : int
        Independent start vectors (for stochastic Lanczos quadrature).
    start : array, optional
        (dim,) or (dim, runs) start vectors instead (normalised here).
    reorthogonalize : bool
        Full reorthogonalisation (two Gram–Schmidt passes against every earlier vector) keeps
        the basis orthogonal to rounding, so converged eigenvalues are not found again as
        spurious copies ("ghosts"); ``False`` is the plain three-term recurrence.
    keep_basis : bool
        Keep the Lanczos vectors for Ritz vectors (they are kept during the run anyway when
        reorthogonalising).
    tol : float, optional
        A run stops early when its residual norm falls below ``tol`` times the largest
        |entry| of T so far (the Krylov space is exhausted); default 100 · float64 eps.

    Returns
    -------
    Lanczos

    Cost
    ----
    ``steps`` calls of ``matvec``; on the host O(runs · steps² · dim) for the
    reorthogonalisation and runs · steps · dim float64 numbers for the basis.
    """
    dim = _check_int(dim, "lanczos", "dim", 1)
    steps = _check_int(steps, "lanczos", "steps", 1, dim)
    runs = _check_int(runs, "lanczos", "runs", 1)
    if not callable(matvec):
        raise TypeError(f"inspect.lanczos: matvec must be callable, got {type(matvec).__name__}")
    if start is None:
        q = _rademacher(seed, dim, 0, runs)
    else:
        q = np.array(start, dtype=np.float64).reshape(dim, -1) if np.size(start) == dim * runs \
            else None
        if q is None or not np.all(np.isfinite(q)) or np.any(np.linalg.norm(q, axis=0) == 0):
            raise ValueError(f"inspect.lanczos: start must be {runs} finite nonzero vector(s) of "
                             f"length {dim}, shape ({dim},) or ({dim}, {runs}); got shape "
                             f"{np.shape(start)}")
    q = q / np.linalg.norm(q, axis=0)
    tol = 100 * np.finfo(np.float64).eps if tol is None else float(tol)
    basis = np.zeros((runs, steps, dim)) if reorthogonalize or keep_basis else None
    alphas: list[list[float]] = [[] for _ in range(runs)]
    betas: list[list[float]] = [[] for _ in range(runs)]
    scale, beta_prev = np.zeros(runs), np.zeros(runs)
    prev = np.zeros((dim, runs))
    active = np.arange(runs)
    for j in range(steps):
        if basis is not None:
            basis[active, j] = q[:, active].T
        w = np.asarray(matvec(q[:, active]), dtype=np.float64)
        if w.shape != (dim, len(active)):
            raise ValueError(f"inspect.lanczos: matvec returned shape {w.shape} for a block of "
                             f"shape {(dim, len(active))}; it must return A V of V's shape")
        alpha = np.einsum("ij,ij->j", q[:, active], w)
        w -= alpha * q[:, active] + beta_prev[active] * prev[:, active]
        if reorthogonalize:
            for c, r in enumerate(active):
                v = basis[r, :j + 1]
                for _ in range(2):  # twice is enough (Kahan–Parlett)
                    w[:, c] -= v.T @ (v @ w[:, c])
        beta = np.linalg.norm(w, axis=0)
        going = []
        for c, r in enumerate(active):
            alphas[r].append(float(alpha[c]))
            betas[r].append(float(beta[c]))
            scale[r] = max(scale[r], abs(alpha[c]), beta[c])
            if beta[c] > tol * scale[r]:
                going.append(c)
        going = np.array(going, dtype=int)
        cont = active[going]
        prev[:, cont] = q[:, cont]
        q[:, cont] = w[:, going] / beta[going]
        beta_prev[cont] = beta[going]
        active = cont
        if not len(active):
            break
    kept = [basis[r, :len(alphas[r])] for r in range(runs)] if keep_basis else None
    return Lanczos([np.array(a) for a in alphas], [np.array(b) for b in betas], dim, kept)


# -- on a network -------------------------------------------------------------------------------


def _setup(model, x, y, name: str, bn: str, params) -> tuple:
    """Checks shared by every function: ``(model, chosen, x, y)``."""
    model = check_module(model, name)
    _check_bn(bn, name)
    chosen = _select(model, params, name)
    x, y = _check_data(x, y, chosen[0][1], name)
    return model, chosen, x, y


def _top(model, x, y, k, steps, seed, bn, params, name: str, which: str) -> Eigenpairs:
    model, chosen, x, y = _setup(model, x, y, name, bn, params)
    dim = sum(p.size for _, p in chosen)
    k = _check_int(k, name, "k", 1, dim, f" (the number of parameters selected is {dim})")
    if steps is None:
        steps = min(dim, max(DEFAULT_STEPS, 3 * k))
    steps = _check_int(steps, name, "steps", k, dim, " (at least k, at most the number of "
                       "parameters selected)")
    with _prepared(model, x, y, bn, chosen) as op:
        run = lanczos(getattr(op, which), dim, steps, seed, tol=100 * op.eps)
    run.names, run.shapes = op.names, op.shapes
    return run.top(k)


def hessian_top(model, x, y, k: int = 1, *, steps: int | None = None, seed: int = 0,
                bn: str = "frozen", params=None) -> Eigenpairs:
    """The k largest eigenvalues of the loss Hessian and their eigenvectors, by Lanczos with
    full reorthogonalisation on Hessian-vector products.

    Parameters
    ----------
    model : Module
    x, y : arrays
        Inputs and integer labels (host or backend arrays).
    k : int
        How many (1 to P, the number of parameters selected).
    steps : int, optional
        Lanczos steps, from k to P; default min(P, max(40, 3k)). The top few eigenvalues of a
        network's Hessian stand apart from the bulk and converge in a few dozen steps; check
        :attr:`Eigenpairs.residuals`.
    seed : int
        Seeds the Rademacher start vector.
    bn : {"frozen", "eval", "batch"}
        Batch norm (module docstring): default ``"frozen"``, this batch's statistics held
        constant.
    params : None, int or list of str
        All parameters, block ``l``'s (1-based) or these names.

    Returns
    -------
    Eigenpairs
        Values descending, unit eigenvectors as rows flattened in ``named_parameters``
        order (:meth:`Eigenpairs.parameter` splits them by name), and the Lanczos run
        (``.lanczos.trace()``, ``.lanczos.density()`` reuse it).

    Cost
    ----
    ``steps`` Hessian-vector products (forward-over-reverse: about four forward passes'
    work each, O(L) in depth); ``"frozen"`` adds one forward pass. Host: O(steps² · P) for the
    reorthogonalisation and steps · P float64 numbers for the basis.
    """
    return _top(model, x, y, k, steps, seed, bn, params, "hessian_top", "hessian")


def ggn_top(model, x, y, k: int = 1, *, steps: int | None = None, seed: int = 0,
            bn: str = "frozen", params=None) -> Eigenpairs:
    """The k largest eigenvalues and eigenvectors of the generalised Gauss–Newton matrix
    ``G = Jᵀ H_out J`` (J the Jacobian of the logits in θ, ``H_out`` the cross-entropy's
    Hessian in the logits, ``(diag(p_n) − p_n p_nᵀ)/N`` per sample), by Lanczos as
    :func:`hessian_top` (same arguments and result). G is positive semi-definite and equals
    the Hessian where the logits are linear in the selected parameters (e.g. the classifier's
    own).

    Batch norm: ``bn`` as in :func:`hessian_top`, default ``"frozen"``.

    Cost
    ----
    One forward pass kept for its VJP, then ``steps`` products, each a JVP (a forward pass
    carrying a tangent) and a VJP (a reverse pass); host as :func:`hessian_top`.
    """
    return _top(model, x, y, k, steps, seed, bn, params, "ggn_top", "ggn")


def _product(model, x, y, v, bn, params, name: str, which: str) -> np.ndarray:
    model, chosen, x, y = _setup(model, x, y, name, bn, params)
    dim = sum(p.size for _, p in chosen)
    vs = np.asarray(host(v) if not isinstance(v, np.ndarray | list | tuple) else v)
    if vs.ndim not in (1, 2) or vs.shape[-1] != dim or not np.all(np.isfinite(vs)):
        raise ValueError(f"inspect.{name}: v must be finite, of shape ({dim},) or (k, {dim}) "
                         f"(the number of parameters selected), got shape {vs.shape}")
    block = np.atleast_2d(vs).astype(np.float64).T
    with _prepared(model, x, y, bn, chosen) as op:
        out = getattr(op, which)(block).T
    return out[0] if vs.ndim == 1 else out


def hessian_vector_product(model, x, y, v, *, bn: str = "frozen", params=None) -> np.ndarray:
    """``H v`` for the loss Hessian over the selected parameters: ``v`` of shape (P,) or
    (k, P) (host, flattened in ``named_parameters`` order) gives the same shape, all k in one
    pass. Batch norm and ``params`` as in :func:`hessian_top` (default ``bn="frozen"``).

    Cost: one forward-over-reverse pass carrying k tangents.
    """
    return _product(model, x, y, v, bn, params, "hessian_vector_product", "hessian")


def ggn_vector_product(model, x, y, v, *, bn: str = "frozen", params=None) -> np.ndarray:
    """``G v = Jᵀ H_out J v`` (see :func:`ggn_top`): the logits' JVP, the softmax
    cross-entropy Hessian per sample, then a VJP. ``v`` and the result as in
    :func:`hessian_vector_product`; batch norm and ``params`` as in :func:`hessian_top`
    (default ``bn="frozen"``).

    Cost: a forward and a reverse pass plus a forward pass carrying k tangents.
    """
    return _product(model, x, y, v, bn, params, "ggn_vector_product", "ggn")


def hessian_trace(model, x, y, samples: int, seed: int = 0, *, method: str = "hutchinson",
                  bn: str = "frozen", params=None, chunk: int = DEFAULT_CHUNK) -> TraceEstimate:
    """An unbiased estimate of the trace of the loss Hessian, with its standard error.

    Parameters
    ----------
    model, x, y :
        As in :func:`hessian_top`.
    samples : int
        Hessian-vector products to spend (≥ 1; ≥ 3 for Hutch++).
    seed : int
        Seeds the Rademacher probes; probe i is the same for every ``samples`` and ``chunk``.
    method : {"hutchinson", "hutch++"}
        ``"hutchinson"``: the mean of ``zᵀ H z`` over Rademacher probes z. ``"hutch++"``
        (Meyer et al. 2021): a third of the products sketch the dominant subspace
        (``Q = orth(H S)``), whose trace ``tr(Qᵀ H Q)`` is taken exactly (another third),
        and Hutchinson estimates the rest on probes projected off Q. It pays when a few large
        eigenvalues carry most of the Hessian's Frobenius norm; with a wide bulk (as at
        initialisation) its fewer probes can leave a larger standard error than Hutchinson's:
        compare ``stderr``. Both are unbiased.
    bn : {"frozen", "eval", "batch"}
        Batch norm (module docstring); default ``"frozen"``.
    params : None, int or list of str
        As in :func:`hessian_top`.
    chunk : int
        Probes pushed through the network together (one pass each ``chunk``; memory grows
        with it).

    Returns
    -------
    TraceEstimate

    Cost
    ----
    ``samples`` Hessian-vector products in ceil(samples / chunk) stacked passes; Hutch++ adds
    a QR of a (P, samples/3) block on the host.
    """
    name = "hessian_trace"
    model, chosen, x, y = _setup(model, x, y, name, bn, params)
    if method not in TRACE_METHODS:
        raise ValueError(f"inspect.{name}: unknown method {method!r}; valid: "
                         f"{', '.join(map(repr, TRACE_METHODS))}")
    samples = _check_int(samples, name, "samples", 3 if method == "hutch++" else 1,
                         why=" for Hutch++ (a sketch, its trace and one probe)"
                         if method == "hutch++" else "")
    chunk = _check_int(chunk, name, "chunk", 1)
    dim = sum(p.size for _, p in chosen)
    with _prepared(model, x, y, bn, chosen) as op:
        if method == "hutchinson":
            z = _rademacher(seed, dim, 0, samples)
            exact, draws = 0.0, np.einsum("ij,ij->j", z, _in_chunks(op.hessian, z, chunk))
        else:
            k = min(samples // 3, dim)
            rest = samples - 2 * k
            rng = np.random.default_rng([seed, 1])  # a stream apart from the probes'
            q, _ = np.linalg.qr(_in_chunks(op.hessian, rng.integers(0, 2, (dim, k)) * 2.0 - 1,
                                           chunk))
            exact = float(np.einsum("ij,ij->", q, _in_chunks(op.hessian, q, chunk)))
            g = _rademacher(seed, dim, 0, rest)
            g -= q @ (q.T @ g)
            draws = np.einsum("ij,ij->j", g, _in_chunks(op.hessian, g, chunk))
    stderr = float(np.std(draws, ddof=1) / np.sqrt(len(draws))) if len(draws) > 1 else math.nan
    return TraceEstimate(exact + float(np.mean(draws)), stderr, samples, method, draws)


def hessian_density(model, x, y, *, steps: int = DEFAULT_STEPS, runs: int = 1, seed: int = 0,
                    bn: str = "frozen", params=None) -> Lanczos:
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al.
    2019, as PyHessian): ``runs`` Lanczos runs from Rademacher start vectors, each giving
    nodes (Ritz values) and weights whose weighted sum of Gaussians estimates the density.

    Parameters
    ----------
    model, x, y :
        As in :func:`hessian_top`.
    steps : int
        Lanczos steps per run, 1 to P (default 40, capped at P): the extreme eigenvalues
        converge first; the bulk is resolved to about (spectrum's width) / steps.
    runs : int
        Independent start vectors, carried in lockstep (one stacked pass per step).
    seed : int
        Run r starts from probe r of :func:`hessian_trace` with this seed.
    bn : {"frozen", "eval", "batch"}
        Batch norm (module docstring); default ``"frozen"``.
    params : None, int or list of str
        As in :func:`hessian_top`.

    Returns
    -------
    Lanczos
        ``.nodes`` and ``.weights`` per run, ``.density(grid, sigma)`` the smoothed density,
        ``.trace()`` the SLQ trace estimate, ``.top(k, run=r)`` Ritz values (no vectors: the
        basis is not kept).

    Cost
    ----
    ``steps`` passes, each a Hessian-vector product carrying ``runs`` tangents; host
    O(runs · steps² · P) and runs · steps · P float64 numbers during the run.
    """
    name = "hessian_density"
    model, chosen, x, y = _setup(model, x, y, name, bn, params)
    dim = sum(p.size for _, p in chosen)
    steps = _check_int(steps, name, "steps", 1)
    steps = min(steps, dim)
    runs = _check_int(runs, name, "runs", 1)
    with _prepared(model, x, y, bn, chosen) as op:
        run = lanczos(op.hessian, dim, steps, seed, runs=runs, keep_basis=False,
                      tol=100 * op.eps)
    run.names, run.shapes = op.names, op.shapes
    return run


__all__ = ["BN_MODES", "DEFAULT_STEPS", "Eigenpairs", "Lanczos", "TraceEstimate",
           "ggn_top", "ggn_vector_product", "hessian_density", "hessian_top", "hessian_trace",
           "hessian_vector_product", "lanczos"]
