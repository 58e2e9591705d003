"""Spectra: singular values of Jacobians (dense, or by Krylov methods on a matrix-free
operator built from our JVP and VJP) and the exact loss Hessian of a tiny network."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh, svds

from miniresnet import functional as F
from miniresnet import ops
from miniresnet.backends import backend_of
from miniresnet.inspect._common import check_module, host, untouched
from miniresnet.nn.module import Module, functional_call
from miniresnet.tracing import Tensor, as_tensor
from miniresnet.transforms import grad, jacobian, jvp, vjp

#: the largest matrix (number of entries) that :func:`singular_values` forms densely by default
#: (4096 × 4096 float64: 128 MiB)
DENSE_LIMIT = 4096 * 4096
#: the most parameters :func:`hessian` accepts by default ((P, P) float64: 128 MiB)
HESSIAN_LIMIT = 4096
WHICH = ("all", "largest", "smallest")
METHODS = ("auto", "dense", "operator")


# -- the matrix, dense or as an operator --------------------------------------------------------


class _Map:
    """A linear map ``A`` of shape ``(m, n)``: a matrix, or the Jacobian of ``f`` at ``x``
    (matvec = JVP, rmatvec = VJP at the fixed linearisation point; host NumPy at the boundary).
    """

    def __init__(self, a, x):
        self.matrix = None
        if callable(a) and not isinstance(a, np.ndarray):
            if x is None:
                raise ValueError("inspect.singular_values: a function needs the point x at which "
                                 "its Jacobian is taken")
            self.f, self.x = a, as_tensor(x)
            out, self.vjp_fn = vjp(a, self.x)
            self.out = as_tensor(out)
            self.backend = self.x.backend
            self.dtype = self.x.backend.dtype_name(self.x.dtype)
            self.shape = (self.out.size, self.x.size)
        else:
            if x is not None:
                raise ValueError("inspect.singular_values: x is only for a function; a matrix is "
                                 "its own linear map")
            try:
                raw = a.raw if isinstance(a, Tensor) else a
                m = raw if isinstance(raw, np.ndarray) else backend_of(raw).to_numpy(raw)
            except TypeError:
                raise TypeError(f"inspect.singular_values: expected a matrix (NumPy or backend "
                                f"array), a function or a Module, got {type(a).__name__}"
                                ) from None
            if m.ndim != 2 or not np.issubdtype(m.dtype, np.floating):
                raise ValueError(f"inspect.singular_values: a matrix must be 2-d and real "
                                 f"floating point, got shape {m.shape} dtype {m.dtype}")
            self.matrix, self.shape = m, m.shape

    @property
    def np_dtype(self):
        return self.matrix.dtype if self.matrix is not None else np.dtype(self.dtype)

    def dense(self) -> np.ndarray:
        if self.matrix is not None:
            return self.matrix
        return host(jacobian(self.f)(self.x)).reshape(self.shape)

    def matmat(self, v: np.ndarray) -> np.ndarray:
        """``A @ v`` for ``v`` of shape (n, k): one forward pass carrying k tangents."""
        if self.matrix is not None:
            return self.matrix @ v
        k = v.shape[1]
        t = self.backend.asarray(np.ascontiguousarray(v.T).reshape((k,) + self.x.shape),
                                 self.dtype)
        return host(jvp(self.f, (self.x,), (t,))[1]).reshape(k, -1).T

    def rmatmat(self, u: np.ndarray) -> np.ndarray:
        """``Aᵀ @ u`` for ``u`` of shape (m, k): one reverse pass carrying k cotangents."""
        if self.matrix is not None:
            return self.matrix.T @ u
        k = u.shape[1]
        ct = self.backend.asarray(np.ascontiguousarray(u.T).reshape((k,) + self.out.shape),
                                  self.dtype)
        return host(self.vjp_fn(ct)[0]).reshape(k, -1).T

    def operator(self) -> LinearOperator:
        return LinearOperator(
            self.shape, dtype=self.np_dtype,
            matvec=lambda v: self.matmat(np.reshape(v, (-1, 1)))[:, 0],
            rmatvec=lambda u: self.rmatmat(np.reshape(u, (-1, 1)))[:, 0],
            matmat=self.matmat, rmatmat=self.rmatmat)


def _smallest(amap: _Map, k: int, seed: int, rounds: int = 10) -> np.ndarray:
    """The k smallest singular values (descending) by Rayleigh–Ritz without squaring.

    Lanczos (ARPACK ``eigsh``) on the smaller Gram matrix G (AᵀA or AAᵀ) finds a subspace
    ``V`` around its smallest eigenvalues; the singular values are then those of the thin
    product ``A V`` (or ``Aᵀ V``), computed directly, not square roots of G's eigenvalues.
    G's eigenvalues only pick the subspace: below √eps·σ_max they are rounding noise, but the
    subspace of a cluster of small values stays accurate while the cluster is separated from the
    rest, and the thin SVD resolves the values within it to about eps·σ_max·(σ_max/σ_{p+1})
    (absolute; σ_{p+1} the first value outside the subspace). Lanczos from one start vector can
    miss copies in such a cluster, so Lanczos runs again on G with the subspace found deflated
    (shifted past σ_max²), adding what it finds, until that no longer lowers any of the k Ritz
    values. Ritz values are upper bounds: the i-th smallest returned is ≥ the i-th smallest
    singular value."""
    m, n = amap.shape
    dim, dtype = min(m, n), amap.np_dtype
    forward, backward = (amap.matmat, amap.rmatmat) if m >= n else (amap.rmatmat, amap.matmat)
    rng = np.random.default_rng(seed)

    def gram(v):
        return backward(forward(v))

    def lanczos(apply, count: int, which: str):
        op = LinearOperator((dim, dim), dtype=dtype,
                            matvec=lambda v: apply(np.reshape(v, (-1, 1)))[:, 0])
        try:
            return eigsh(op, k=count, which=which, tol=0 if which == "SA" else 1e-6,
                         v0=rng.standard_normal(dim).astype(dtype),
                         ncv=min(dim, max(2 * count + 1, 20)), maxiter=max(1000, 20 * dim))
        except ArpackNoConvergence as e:
            raise RuntimeError(f"inspect.singular_values: Lanczos did not converge to the {k} "
                               f"smallest singular values of a {m}×{n} map ({e}); use "
                               "method='dense' if the matrix fits") from None

    shift = 2 * lanczos(gram, 1, "LA")[0][0]  # above every eigenvalue of G
    slack = 64 * np.finfo(dtype).eps * np.sqrt(shift)  # rounding in A v, absolute
    basis, s = np.zeros((dim, 0), dtype), None
    for _ in range(rounds):
        q = basis

        def deflated(v, q=q):  # G on the complement of q; q itself pushed past the top
            w = v - q @ (q.T @ v)
            g = gram(w)
            return g - q @ (q.T @ g) + shift * (q @ (q.T @ v))

        count = min(dim - 1, max(2 * k, k + 10) if s is None else k)
        _, found = lanczos(deflated if q.shape[1] else gram, count, "SA")
        basis, _ = np.linalg.qr(np.concatenate([basis, found], axis=1))
        before, s = s, np.linalg.svd(forward(basis), compute_uv=False)
        if basis.shape[1] >= dim or (before is not None
                                     and np.all(before[-k:] - s[-k:] <= slack)):
            return s[-k:]
    raise RuntimeError(f"inspect.singular_values: the {k} smallest singular values of a {m}×{n} "
                       f"map did not settle in {rounds} deflated Lanczos runs; use "
                       "method='dense' if the matrix fits")


def singular_values(a, x=None, *, k: int | None = None, which: str = "all",
                    method: str = "auto", seed: int = 0) -> np.ndarray:
    """Singular values of a matrix, or of the Jacobian of a function (or Module) at ``x``,
    in descending order.

    Parameters
    ----------
    a : matrix, callable or Module
        A 2-d NumPy or backend array; or ``f`` with ``x``: the Jacobian of ``f`` at ``x`` as the
        ``(f(x).size, x.size)`` matrix. A Module is run under :func:`~miniresnet.nn.frozen_stats`
        and left as it was. Batch norm in training mode couples the samples, so the Jacobian is
        over the whole batch; it has two null directions per channel (shifting a channel's
        inputs, or scaling them about their mean, changes nothing), i.e. 2·C singular values
        that are 0 up to rounding (with ``eps = 0``; batch norm's ``eps`` makes the scaling
        direction's value of order eps / variance instead).
    k : int, optional
        How many (required with ``which="largest"`` or ``"smallest"``).
    which : {"all", "largest", "smallest"}
    method : {"auto", "dense", "operator"}
        ``"dense"`` forms the matrix (``mr.jacobian``) and takes a full SVD: every value to
        about eps·σ_max (absolute). ``"operator"`` never forms it: a ``LinearOperator`` whose
        matvec is our JVP and rmatvec our VJP; the largest k come from ``scipy.sparse.linalg
        .svds`` (relative accuracy about eps); the smallest k from Lanczos subspaces of the
        Gram matrix (rerun with what was found deflated, until the values settle) and
        Rayleigh–Ritz on the thin product ``A V``, accurate to about eps·σ_max²/σ_{p+1}
        (absolute, σ_{p+1} the smallest value outside the subspace, p ≥ max(2k, k + 10)) —
        not the √eps·σ_max of square roots of Gram eigenvalues; e.g. 1e-12 next to
        σ_max = 1 comes out to 1e-15 (tested). ``"auto"`` is dense when the matrix has at most
        :data:`DENSE_LIMIT` entries. The operator path needs ``k < min(m, n)``.
    seed : int
        Seeds the Krylov start vector.

    Cost
    ----
    Dense: m reverse passes' worth of work in a few stacked VJPs, an O(m n min(m, n)) SVD and
    m·n memory. Operator: each Krylov step is one JVP and one VJP (a forward and a reverse pass,
    O(L) in depth); ARPACK takes O(k) to a few hundred steps, more for clustered values; the
    smallest values need at least three Lanczos runs (σ_max, then two or more deflated).
    """
    if which not in WHICH:
        raise ValueError(f"inspect.singular_values: unknown which {which!r}; valid: "
                         f"{', '.join(map(repr, WHICH))}")
    if method not in METHODS:
        raise ValueError(f"inspect.singular_values: unknown method {method!r}; valid: "
                         f"{', '.join(map(repr, METHODS))}")
    guard = untouched(a) if isinstance(a, Module) else contextlib.nullcontext()
    with guard:
        amap = _Map(a, x)
        m, n = amap.shape
        r = min(m, n)
        if which == "all":
            if k is not None:
                raise ValueError("inspect.singular_values: k is for which='largest' or "
                                 "'smallest'; which='all' returns every value")
            k = r
        elif isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= r:
            raise ValueError(f"inspect.singular_values: which={which!r} needs k, an int from 1 "
                             f"to {r} (the map is {m}×{n}), got {k!r}")
        dense = method == "dense" or (method == "auto" and m * n <= DENSE_LIMIT)
        if not dense and which == "all":
            raise ValueError(f"inspect.singular_values: all {r} singular values of a {m}×{n} "
                             f"map need the dense matrix ({m * n} entries, more than "
                             f"DENSE_LIMIT={DENSE_LIMIT}); pass method='dense' to form it "
                             "anyway, or which='largest'/'smallest' with k")
        if not dense and k >= r:
            raise ValueError(f"inspect.singular_values: the operator method finds k < "
                             f"min(m, n) = {r} values of a {m}×{n} map, got k={k}; use "
                             "method='dense'")
        if dense:
            s = np.linalg.svd(amap.dense(), compute_uv=False)
            return s[:k] if which != "smallest" else s[r - k:]
        if which == "largest":
            s = svds(amap.operator(), k=k, which="LM", tol=0, solver="arpack",
                     random_state=seed, return_singular_vectors=False)
            return np.sort(s)[::-1]
        return _smallest(amap, k, seed)


# -- the loss Hessian ---------------------------------------------------------------------------


@dataclass
class Hessian:
    """:func:`hessian`'s result: ``matrix`` (P, P) over all parameters flattened in
    ``named_parameters`` order; ``names`` and ``shapes`` of the parameters, and
    ``block(a, b)`` the sub-matrix of two of them."""

    matrix: np.ndarray
    names: list[str]
    shapes: list[tuple[int, ...]]

    def slices(self) -> dict[str, slice]:
        """Each parameter's rows (and columns) of ``matrix``."""
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = int(np.prod(shape, dtype=np.int64))
            out[name], start = slice(start, start + size), start + size
        return out

    def block(self, a: str, b: str) -> np.ndarray:
        """``∂²L / ∂a ∂b`` as a (size of a, size of b) matrix."""
        where = self.slices()
        for name in (a, b):
            if name not in where:
                raise KeyError(f"Hessian.block: no parameter {name!r}; valid: "
                               f"{', '.join(self.names)}")
        return self.matrix[where[a], where[b]]


def hessian(model, x, y, *, max_params: int = HESSIAN_LIMIT) -> Hessian:
    """The exact Hessian of the mean cross-entropy ``L(θ) = CE(model_θ(x), y)`` over all
    parameters, for tiny networks.

    Batch norm follows the model's mode: in training mode it uses this batch's statistics
    (which depend on θ and are differentiated through) and updates nothing. The model is left
    as it was.

    Parameters
    ----------
    model : Module
    x, y : arrays
        Inputs and integer labels.
    max_params : int
        Refuse models with more parameters than this (default :data:`HESSIAN_LIMIT`): the
        result is a dense (P, P) matrix.

    Cost
    ----
    Reverse over reverse: the gradient's graph is built once and P basis cotangents go through
    it in a few stacked reverse passes — the work of O(P) Hessian-vector products, each O(L) in
    depth; P² memory.
    """
    model = check_module(model, "hessian")
    names = [n for n, _ in model.named_parameters()]
    params = [p.raw for p in model.parameters()]
    count = sum(int(np.prod(p.shape, dtype=np.int64)) for p in params)
    if not params:
        raise ValueError("inspect.hessian: the model has no parameters")
    if count > max_params:
        raise ValueError(f"inspect.hessian: the model has {count} parameters, more than "
                         f"max_params={max_params}; the Hessian would be a dense "
                         f"{count}×{count} matrix (raise max_params if that fits)")
    target = as_tensor(y)
    idx = tuple(range(len(params)))

    def loss(*arrays):
        return F.cross_entropy(functional_call(model, dict(zip(names, arrays)), x), target)

    def flat_grad(*arrays):
        gs = grad(loss, argnums=idx)(*arrays)
        return ops.concat([ops.reshape(g, (-1,)) for g in gs], 0)

    with untouched(model):
        blocks = jacobian(flat_grad, argnums=idx)(*params)
    h = np.concatenate([host(b).reshape(count, -1) for b in blocks], axis=1)
    return Hessian(h, names, [tuple(p.shape) for p in params])


__all__ = ["DENSE_LIMIT", "HESSIAN_LIMIT", "Hessian", "hessian", "singular_values"]
