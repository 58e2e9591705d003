"""The tracing core: :class:`Tensor`, trace levels, primitive binding and the reverse pass.

How it works
------------
Every differentiation opens a new *trace level* (an integer that only grows). A Tensor at level
``L > 0`` wraps a Tensor of a lower level (its ``_value``) and carries either a reverse-mode
:class:`Node` (its place on the tape) or a forward-mode tangent. A Tensor at level 0 wraps a raw
backend array. Binding a primitive peels off the highest level among its arguments, binds the
primitive again on the unwrapped values (which records it at the lower levels, if any), and wraps
the result at the highest level. Derivative rules are written with the same primitives, so when
they run during a backward pass on traced values they are themselves recorded: that is how higher
order derivatives come for free. Nesting uses levels, so derivatives never get confused with each
other; the eager tape of ``Tensor(..., requires_grad=True)`` is level 1, transforms use 2, 3, ...

Nothing here recurses over the graph: the reverse pass uses an iterative topological sort.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

from miniresnet.backend_choice import as_backend_array, creation_backend
from miniresnet.backends import PYTHON_SCALARS, backend_of

EAGER_LEVEL = 1
# next_level: the level the next transform gets; floor: levels below it record nothing (no_grad)
_state = {"next_level": EAGER_LEVEL + 1, "floor": 0, "anomaly": False, "backward_op": None}


def new_level() -> int:
    """Return a fresh trace level, higher than every level handed out before."""
    level = _state["next_level"]
    _state["next_level"] = level + 1
    return level


class Primitive:
    """An operation with a forward implementation and derivative rules.

    Parameters
    ----------
    name : str
        Name used in error messages and reprs.
    impl : callable
        ``impl(xp, *raw_args, **params)`` computing the result from raw backend arrays with the
        array-API namespace ``xp``.
    vjp : sequence of callables or None
        One rule per positional argument, ``rule(g, ans, *args, **params) -> cotangent``, or
        ``None`` for an argument that is not differentiable. A rule receives ``g`` with the shape
        ``batch + ans.shape`` (any number of leading batch axes) and must return
        ``batch + arg.shape``: this is what lets one reverse pass carry a stack of cotangents.
        A single callable ``rule(argnum)`` returning rules is accepted for variadic primitives.
    jvp : sequence of callables, ``"linear"`` or None
        ``rule(t, ans, *args, **params) -> tangent contribution`` per argument (or a callable
        ``rule(argnum)`` returning them). A rule receives ``t`` with the shape
        ``batch + arg.shape`` (any number of leading batch axes) and must return
        ``batch + ans.shape``: this is what lets one forward pass carry a stack of tangents.
        ``"linear"`` means the primitive is linear in each differentiable argument separately
        and its forward accepts extra leading axes in each, so the contribution of argument
        ``i`` is the primitive itself applied with ``t`` in place of argument ``i``.
    saves : bool
        Whether the forward keeps values for its own derivative rules (conv's patches, batch
        norm's statistics). Then ``impl`` returns ``(out, saved)``; :func:`bind` keeps
        ``saved`` on the :class:`Node` at every traced level (``node.saved``, released with
        the graph) and calls each rule with it as the keyword ``saved=`` (``None`` when the
        forward kept nothing). ``saved`` holds raw backend arrays: constants, never
        differentiated. A rule may hand it back to a primitive it binds through
        ``bind(..., reuse=saved)``, which only spares that primitive's forward work: rules
        still compute with their (traced) arguments, so derivatives of any order flow through
        them.
    reuses : bool
        Whether ``impl`` accepts the keyword ``reuse`` (what :func:`bind` got as ``reuse=``,
        or ``None``): values some forward saved that it may use instead of recomputing them
        (the result must not depend on whether it does). ``reuse`` is no parameter of the
        primitive: it is never recorded.

    Parameters of a primitive (``params``) are static: ints, floats, tuples, dtypes; a test
    checks that every recorded node's parameters are hashable.
    """

    __slots__ = ("name", "impl", "_vjp", "_jvp", "saves", "reuses")

    def __init__(self, name: str, impl: Callable, vjp=None, jvp=None, *, saves: bool = False,
                 reuses: bool = False):
        self.name, self.impl, self._vjp, self._jvp = name, impl, vjp, jvp
        self.saves, self.reuses = saves, reuses

    def vjp_rule(self, argnum: int) -> Callable | None:
        rules = self._vjp
        if rules is None:
            return None
        return rules(argnum) if callable(rules) else rules[argnum]

    def jvp_contribution(self, argnum: int, t, ans, args, params, saved=None):
        """The tangent of the output due to argument ``argnum``'s tangent ``t`` (shape
        ``batch + arg.shape``), of shape ``batch + ans.shape``; ``saved`` is what the forward
        kept (for a primitive that ``saves``)."""
        if self.saves:
            params = dict(params, saved=saved)
        if self._jvp == "linear":
            out = bind(self, *args[:argnum], t, *args[argnum + 1 :], **params)
        else:
            rules = self._jvp
            if rules is None:
                raise TypeError(f"{self.name}: no JVP rules, so no forward-mode derivative")
            rule = rules(argnum) if callable(rules) else rules[argnum]
            if rule is None:
                raise TypeError(f"{self.name}: argument {argnum} is not differentiable")
            out = rule(t, ans, *args, **params)
        want = t.shape[: t.ndim - args[argnum].ndim] + ans.shape
        if out.shape != want:  # a rule that drops or mangles the tangents' batch axes
            raise ValueError(
                f"{self.name}: the JVP rule of argument {argnum} returned shape {out.shape} for "
                f"a tangent of shape {t.shape}; expected {want} (the batch axes of the tangent, "
                f"then the output's shape {ans.shape})"
            )
        return out

    def __repr__(self) -> str:
        return f"<primitive {self.name}>"


class Node:
    """A reverse-mode record: the primitive, its unwrapped inputs and output, its static
    parameters, what its forward saved for the rules, and the parents.

    ``parents`` is a tuple of ``(argnum, Node)`` for the arguments traced at the node's level.
    ``saved`` is the second result of the ``impl`` of a primitive that ``saves`` (else
    ``None``), the same object at every level the primitive was recorded on. A leaf (an input
    of a differentiation) has ``prim=None``; leaves of the eager tape also accumulate ``grad``.
    """

    __slots__ = ("prim", "args", "params", "out", "parents", "saved", "grad", "__weakref__")

    def __init__(self, prim, args, params, out, parents, saved=None):
        self.prim, self.args, self.params, self.out, self.parents = prim, args, params, out, parents
        self.saved, self.grad = saved, None


def leaf_node() -> Node:
    return Node(None, (), {}, None, ())


#: The operations behind Tensor's operators and methods, by name. They bind primitives, which
#: sit above this module, so :mod:`miniresnet.ops` registers its checked operations here when it
#: is imported; Tensor's class body below names every operator and method it has.
OPERATIONS: dict[str, Callable] = {}
OPERATION_NAMES: set[str] = set()  # the names Tensor's methods look up (a test checks them)


def _operation(name: str, reflected: bool = False) -> Callable:
    """A Tensor method calling ``OPERATIONS[name]`` with the tensor first (second if
    ``reflected``, for ``other + tensor`` and the like)."""
    OPERATION_NAMES.add(name)
    if reflected:
        def method(self, other):
            return OPERATIONS[name](other, self)
    else:
        def method(self, *args, **kwargs):
            return OPERATIONS[name](self, *args, **kwargs)
    method.__doc__ = f"``miniresnet.ops.{name}`` with this tensor as its " + (
        "second operand" if reflected else "first argument")
    return method


class Tensor:
    """An n-d array that records the operations applied to it.

    Create one with :func:`miniresnet.tensor` or ``Tensor(data, requires_grad=True)``. Tensors
    support the usual operators and methods (``+ - * / ** @``, ``sum``, ``mean``, ``reshape``...),
    ``backward()`` on the eager tape, ``detach()`` and ``numpy()``.
    """

    __slots__ = ("_value", "_level", "_node", "_tangent", "shape", "dtype", "__weakref__")
    __array_ufunc__ = None  # make NumPy defer to our reflected operators
    __array_priority__ = 1000

    def __init__(self, data: Any, requires_grad: bool = False, *, dtype=None):
        if isinstance(data, Tensor):
            raw = as_backend_array(data.raw, dtype)
        else:
            raw = as_backend_array(data, dtype, creation_backend(data))
        self._value, self._level, self._node, self._tangent = raw, 0, None, None
        self.shape, self.dtype = tuple(raw.shape), raw.dtype
        if requires_grad:
            inner = wrap(raw)
            self._value, self._level, self._node = inner, EAGER_LEVEL, leaf_node()

    # -- basic attributes -------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def raw(self):
        """The backend array underneath every trace level (no copy)."""
        t = self
        while t._level:
            t = t._value
        return t._value

    @property
    def backend(self):
        """The :class:`~miniresnet.backends.Backend` holding this tensor's data."""
        return backend_of(self.raw)

    @property
    def requires_grad(self) -> bool:
        return self._node is not None

    @property
    def grad(self) -> Tensor | None:
        """Gradient accumulated by :meth:`backward` for a leaf with ``requires_grad=True``."""
        node = self._node
        return None if node is None else node.grad

    @grad.setter
    def grad(self, value) -> None:
        if self._node is None or self._node.prim is not None:
            raise AttributeError("only leaf tensors created with requires_grad=True hold .grad")
        if value is not None:
            value = value.detach() if isinstance(value, Tensor) else wrap(value)
            if value.shape != self.shape or value.dtype != self.dtype:
                raise ValueError(f"grad: shape {value.shape} and dtype {value.dtype} do not "
                                 f"match the tensor's {self.shape} and {self.dtype}")
        self._node.grad = value

    @property
    def is_leaf(self) -> bool:
        return self._node is None or self._node.prim is None

    @property
    def data(self) -> Tensor:
        """The data as a constant tensor; assigning replaces the data of a leaf in place
        (same shape and dtype), which is how optimisers update parameters."""
        return self.detach()

    @data.setter
    def data(self, value) -> None:
        if not self.is_leaf:
            raise RuntimeError("data: only a leaf tensor's data can be replaced")
        raw = value.raw if isinstance(value, Tensor) else value
        if tuple(raw.shape) != self.shape or raw.dtype != self.dtype:
            raise ValueError(
                f"data: new data {tuple(raw.shape)} {dtype_name(raw.dtype)} does not match "
                f"{self.shape} {dtype_name(self.dtype)}"
            )
        if self._level:
            self._value = wrap(raw)
        else:
            self._value = raw

    def detach(self) -> Tensor:
        """A tensor with the same data that no derivative flows through."""
        return wrap(self.raw)

    def numpy(self):
        """A host NumPy copy of the data (a NumPy array, whatever the backend)."""
        return backend_of(self.raw).to_numpy(self.raw)

    def __array__(self, dtype=None, copy=None):
        if self._level:
            raise TypeError(
                "a traced Tensor cannot become a NumPy array: NumPy functions do not record "
                "derivatives. Use miniresnet's ops (mr.zeros_like, mr.exp, ...) inside "
                "differentiated code, or .detach().numpy() for a host copy"
            )
        out = self.numpy()
        return out if dtype is None else out.astype(dtype)

    def item(self) -> float:
        if self.size != 1:
            raise ValueError(f"item(): tensor of shape {self.shape} has {self.size} elements")
        return self.numpy().reshape(()).item()

    def __float__(self) -> float:
        return float(self.item())

    def __bool__(self) -> bool:
        return bool(self.item())

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self) -> str:
        mode = ""
        if self._level:
            eager = self._level == EAGER_LEVEL
            mode = ", requires_grad=True" if eager else f", level={self._level}"
        name = backend_of(self.raw).name
        return f"Tensor(shape={self.shape}, dtype={dtype_name(self.dtype)}, backend={name}{mode})"

    # -- operators and methods: the checked operations of miniresnet.ops -----------------------
    __add__, __radd__ = _operation("add"), _operation("add", reflected=True)
    __sub__, __rsub__ = _operation("sub"), _operation("sub", reflected=True)
    __mul__, __rmul__ = _operation("mul"), _operation("mul", reflected=True)
    __truediv__, __rtruediv__ = _operation("div"), _operation("div", reflected=True)
    __matmul__, __rmatmul__ = _operation("matmul"), _operation("matmul", reflected=True)
    __neg__ = _operation("neg")
    __pow__ = _operation("power")  # x ** p with a Python scalar p
    __getitem__ = _operation("getitem")
    __gt__, __ge__ = _operation("greater"), _operation("greater_equal")
    __lt__, __le__ = _operation("less"), _operation("less_equal")
    __eq__ = _operation("equal")
    __hash__ = object.__hash__  # (defining __eq__ would otherwise remove it)
    sum, mean, var, max = (_operation(n) for n in ("sum", "mean", "var", "max"))
    logsumexp, exp, log, sqrt = (_operation(n) for n in ("logsumexp", "exp", "log", "sqrt"))
    tanh, sigmoid, relu, astype = (_operation(n) for n in ("tanh", "sigmoid", "relu", "astype"))

    def __rpow__(self, other):
        raise TypeError("pow: only a Python scalar exponent is supported (x ** p)")

    def __pos__(self) -> Tensor:
        return self

    def reshape(self, *shape) -> Tensor:
        """``x.reshape(2, 3)`` or ``x.reshape((2, 3))``."""
        one = len(shape) == 1 and not isinstance(shape[0], int)
        return OPERATIONS["reshape"](self, shape[0] if one else shape)

    def transpose(self, *axes) -> Tensor:
        """``x.transpose()`` (axes reversed), ``x.transpose(1, 0)`` or ``x.transpose((1, 0))``."""
        one = len(axes) == 1 and not isinstance(axes[0], int)
        return OPERATIONS["transpose"](self, (axes[0] if one else axes) or None)

    @property
    def T(self) -> Tensor:
        return OPERATIONS["transpose"](self)

    @property
    def mT(self) -> Tensor:
        return OPERATIONS["matrix_transpose"](self)

    # -- eager reverse mode -----------------------------------------------------------------
    def backward(self, gradient=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into ``.grad`` of every leaf with ``requires_grad=True``.

        Parameters
        ----------
        gradient : array or Tensor, optional
            Cotangent of the same shape as ``self``; defaults to 1 for a one-element tensor.
        retain_graph : bool
            Keep the recorded graph so that ``backward`` can be called again.
        """
        if self._node is None:
            raise RuntimeError(
                "backward(): this tensor does not require grad (no input was created with "
                "requires_grad=True, or it was computed under no_grad())"
            )
        if gradient is None:
            if self.size != 1:
                raise RuntimeError(
                    f"backward(): pass gradient= for a non-scalar output (shape {self.shape})"
                )
            raw = self.raw
            g = wrap(backend_of(raw).xp.ones_like(raw))
        else:
            g = as_tensor(gradient)
            if g.shape != self.shape:
                raise ValueError(f"backward(): gradient shape {g.shape} != shape {self.shape}")
        for leaf, ct in backward_pass(self._node, g, free=not retain_graph).items():
            leaf.grad = ct if leaf.grad is None else leaf.grad + ct


OPERATION_NAMES.update(("reshape", "transpose", "matrix_transpose"))  # used by methods above


def dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1].replace("dtype(", "").strip("')")


def wrap(value, level: int = 0, node: Node | None = None, tangent=None) -> Tensor:
    """The Tensor around ``value`` (a backend array, or a Tensor of a lower level) at trace
    ``level``, with its reverse-mode ``node`` or forward-mode ``tangent``: the engine's fast
    constructor (no conversion, no checks)."""
    t = object.__new__(Tensor)
    t._value, t._level, t._node, t._tangent = value, level, node, tangent
    t.shape, t.dtype = tuple(value.shape), value.dtype
    return t


def as_tensor(x) -> Tensor:
    """``x`` itself if it is a Tensor, else a level-0 Tensor over the backend array ``x``."""
    if isinstance(x, Tensor):
        return x
    return wrap(as_backend_array(x))


def finalize(x):
    """Output convention of the transforms: a raw backend array when nothing traces ``x`` any
    more, else the Tensor itself (so an enclosing transform can differentiate it)."""
    if isinstance(x, Tensor):
        return x._value if x._level == 0 else x
    return x


# -- binding primitives -----------------------------------------------------------------------
def is_recorded(x) -> bool:
    """Whether operations on ``x`` are being recorded for some derivative (a traced Tensor at
    a level that :func:`no_grad` does not switch off)."""
    return type(x) is Tensor and x._level > 0 and x._level >= _state["floor"]


def bind(prim: Primitive, *args, reuse=None, **params) -> Tensor:
    """Apply ``prim`` to ``args`` (Tensors, raw arrays or Python scalars), recording it on every
    trace level its arguments belong to. ``params`` are the primitive's static parameters;
    ``reuse`` (for a primitive that ``reuses``) is handed to its ``impl`` and recorded nowhere."""
    return bind_saving(prim, args, params, reuse)[0]


def bind_saving(prim: Primitive, args, params, reuse=None) -> tuple[Tensor, Any]:
    """:func:`bind`, returning also what the forward saved (``None`` unless ``prim`` saves):
    for callers that want the forward's by-products, such as batch norm's statistics."""
    level = 0
    for a in args:
        if type(a) is Tensor and a._level > level:
            level = a._level
    if level < _state["floor"] or level == 0:
        return _evaluate(prim, args, params, reuse)
    inner = [a._value if type(a) is Tensor and a._level == level else a for a in args]
    out, saved = bind_saving(prim, inner, params, reuse)
    active = [i for i, a in enumerate(args) if type(a) is Tensor and a._level == level]
    first = args[active[0]]
    if first._node is not None or first._tangent is None:  # reverse mode
        parents = tuple((i, args[i]._node) for i in active)
        return wrap(out, level, Node(prim, inner, params, out, parents, saved)), saved
    tangent = None
    for i in active:
        contribution = prim.jvp_contribution(i, args[i]._tangent, out, inner, params, saved)
        tangent = contribution if tangent is None else bind(add, tangent, contribution)
    return wrap(out, level, None, tangent), saved


def _evaluate(prim: Primitive, args, params, reuse=None) -> tuple[Tensor, Any]:
    raws, first, array_type = [], None, None
    for a in args:
        r = a
        while type(r) is Tensor:  # Tensor.raw, inlined: this loop runs for every op
            r = r._value
        if type(r) not in PYTHON_SCALARS:
            if array_type is None:
                first, array_type = r, type(r)
            elif type(r) is not array_type:
                raise_mixed_backends(prim, args)
        raws.append(r)
    if array_type is None:
        raise TypeError(f"{prim.name}: needs at least one array argument, got {args!r}")
    be = backend_of(first)
    xp = be.xp
    anomaly = _state["anomaly"]
    if anomaly:
        # every op's result is checked, so a non-finite argument came in from outside
        for i, r in enumerate(raws):
            check_input_finite(repr(prim.name), r, f"argument {i} {_describe(r)}",
                               "; no op under detect_anomaly produced it, so it is an input, "
                               "a parameter or a constant")
    if prim.reuses:
        out = prim.impl(xp, *raws, reuse=reuse, **params)
    else:
        out = prim.impl(xp, *raws, **params)
    saved = None
    if prim.saves:
        out, saved = out
    out = be.as_array(out)
    if anomaly:
        _check_finite(prim, xp, out, raws)
    return wrap(out), saved


def raise_mixed_backends(prim: Primitive, args) -> None:
    seen = []
    for a in args:
        r = a.raw if type(a) is Tensor else a
        if type(r) not in PYTHON_SCALARS:
            try:
                name = backend_of(r).name
            except TypeError:
                name = type(r).__module__ + "." + type(r).__qualname__
            seen.append(f"{name} {tuple(r.shape)}")
    raise TypeError(
        f"{getattr(prim, 'name', prim)}: arrays from different backends in one op: "
        f"{', '.join(seen)}. "
        "Move them to one backend first (miniresnet.to_backend(x, name))."
    )


def _nonfinite(x) -> str | None:
    """``"nan"`` or ``"inf"`` if the raw array or Python scalar ``x`` holds one, else None."""
    if type(x) in PYTHON_SCALARS:
        return None if math.isfinite(x) else ("nan" if math.isnan(x) else "inf")
    be = backend_of(x)
    xp = be.xp
    if not xp.isdtype(x.dtype, "real floating"):
        return None
    # one explicit device-to-host transfer for both answers
    finite, nan = be.to_numpy(xp.stack((xp.all(xp.isfinite(x)), xp.any(xp.isnan(x))))).tolist()
    return None if finite else "nan" if nan else "inf"


def _describe(x) -> str:
    return str(tuple(x.shape)) if hasattr(x, "shape") else repr(x)


def check_input_finite(where: str, x, what: str, why: str = "") -> None:
    """Under :func:`detect_anomaly`, raise ``FloatingPointError`` if the input ``x`` (a Tensor,
    raw array or Python scalar) holds NaN or inf, naming ``where`` and ``what``."""
    if not _state["anomaly"]:
        return
    raw = x.raw if type(x) is Tensor else x
    try:
        kind = _nonfinite(raw)
    except TypeError:  # not an array: nothing to check
        return
    if kind is not None:
        raise FloatingPointError(f"anomaly: {where}: {what} holds {kind}{why}")


def _check_finite(prim, xp, out, raws) -> None:
    kind = _nonfinite(out)
    if kind is None:
        return
    shapes = ", ".join(_describe(r) for r in raws)
    where = _state["backward_op"]
    phase = f"backward pass (derivative rule of '{where}')" if where else "forward pass"
    raise FloatingPointError(
        f"anomaly: '{prim.name}' produced {kind} in the {phase}; inputs: {shapes}"
    )


# -- the reverse pass -------------------------------------------------------------------------
def toposort(root: Node) -> list[Node]:
    """Nodes reachable from ``root``, each before all of its parents (iterative Kahn sort)."""
    pending = {root: 0}
    stack = [root]
    while stack:
        node = stack.pop()
        for _, parent in node.parents:
            if parent in pending:
                pending[parent] += 1
            else:
                pending[parent] = 1
                stack.append(parent)
    order, ready = [], [root]
    while ready:
        node = ready.pop()
        order.append(node)
        for _, parent in node.parents:
            pending[parent] -= 1
            if pending[parent] == 0:
                ready.append(parent)
    return order


def backward_pass(root: Node, g: Tensor, order: list[Node] | None = None, free: bool = False):
    """Propagate cotangent ``g`` of ``root`` back to the leaves; return ``{leaf: cotangent}``.

    ``g`` may carry leading batch axes (a stack of cotangents). With ``free=True`` each node's
    saved values are released as soon as its rules have run.
    """
    if order is None:
        order = toposort(root)
    cts: dict[Node, Tensor] = {root: g}
    leaves = {}
    previous = _state["backward_op"]
    try:
        for node in order:
            ct = cts.pop(node, None)
            if node.prim is None:
                if ct is not None:
                    leaves[node] = ct
                continue
            if node.args is None:
                raise RuntimeError(
                    "backward through a graph that was already freed; pass retain_graph=True "
                    "to the first backward() to call it twice"
                )
            if ct is None:
                continue
            _state["backward_op"] = node.prim.name
            params = dict(node.params, saved=node.saved) if node.prim.saves else node.params
            for argnum, parent in node.parents:
                rule = node.prim.vjp_rule(argnum)
                contribution = rule(ct, node.out, *node.args, **params)
                old = cts.get(parent)
                cts[parent] = contribution if old is None else bind(add, old, contribution)
            if free:
                node.args = node.out = node.params = node.saved = None
                node.parents = ()
    finally:
        _state["backward_op"] = previous
    return leaves


# The one primitive the tracing core needs itself: derivatives arriving at one value along
# several paths are summed (a stack of cotangents or tangents has the same shape on every
# path). It is the table's ``add`` (miniresnet.primitives lists it with the others).
add = Primitive("add", lambda xp, x, y: x + y,
                vjp=(lambda g, ans, x, y: g, lambda g, ans, x, y: g),
                jvp=(lambda t, ans, x, y: t, lambda t, ans, x, y: t))


# -- global switches --------------------------------------------------------------------------
@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Inside this context nothing is recorded for the eager tape or for any transform already
    running: results are constants for those derivatives. Transforms started inside the
    context still work (as in torch.func)."""
    old = _state["floor"]
    _state["floor"] = _state["next_level"]
    try:
        yield
    finally:
        _state["floor"] = old


@contextlib.contextmanager
def eager_tape_off() -> Iterator[None]:
    """Inside this context the eager tape records nothing; transforms (levels above it) still
    do. Transforms run their function under it unless an argument is on the eager tape."""
    old = _state["floor"]
    _state["floor"] = max(old, EAGER_LEVEL + 1)
    try:
        yield
    finally:
        _state["floor"] = old


def is_on_eager_tape(x) -> bool:
    """Whether ``x`` is a Tensor recorded on the eager tape (at any depth of nesting)."""
    while type(x) is Tensor and x._level:
        if x._level == EAGER_LEVEL:
            return x._level >= _state["floor"]
        x = x._value
    return False


def is_grad_enabled() -> bool:
    """Whether the eager tape records (False inside :func:`no_grad`)."""
    return _state["floor"] <= EAGER_LEVEL


@contextlib.contextmanager
def detect_anomaly() -> Iterator[None]:
    """Raise ``FloatingPointError`` naming where a NaN or inf first appears: the transform
    argument, cotangent or op argument that brought it in from outside, or else the first op
    that produced it, forward or backward (opt-in: it costs device-to-host checks per op)."""
    old = _state["anomaly"]
    _state["anomaly"] = True
    try:
        yield
    finally:
        _state["anomaly"] = old
