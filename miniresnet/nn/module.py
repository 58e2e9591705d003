"""``Module``: parameters, buffers, submodules, train/eval, state dicts; ``Sequential``."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Mapping

import numpy as np

from miniresnet.backend_choice import as_backend_array
from miniresnet.tracing import Tensor, as_tensor


def parameter(data, dtype=None) -> Tensor:
    """A trainable tensor: a leaf with ``requires_grad=True`` on the eager tape."""
    return Tensor(data, requires_grad=True, dtype=dtype)


class Module:
    """Base class of layers, blocks and networks.

    Assigning a Tensor with ``requires_grad=True`` to an attribute registers a parameter,
    assigning a Module registers a submodule, and :meth:`register_buffer` registers state that
    is saved but not trained (batch-norm running statistics). Subclasses implement ``forward``.
    """

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_forward_hooks", {})

    # -- registration -----------------------------------------------------------------------
    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, Module):
            table = self._modules
        elif name in self._buffers:
            table, value = self._buffers, None if value is None else as_tensor(value)
        elif isinstance(value, Tensor) and value.requires_grad and value.is_leaf:
            table = self._parameters
        elif value is None and name in self._parameters:
            table = self._parameters
        else:
            self._discard(name)
            object.__setattr__(self, name, value)
            return
        if name not in table:  # a new name goes last; a re-assigned one keeps its place
            self._discard(name)
            self.__dict__.pop(name, None)  # a plain attribute would shadow the registration
        table[name] = value

    def _discard(self, name: str) -> None:
        for table in (self._parameters, self._buffers, self._modules):
            table.pop(name, None)

    def __getattr__(self, name: str):
        for table in ("_parameters", "_buffers", "_modules"):
            entries = self.__dict__.get(table)
            if entries is not None and name in entries:
                return entries[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        for table in (self._parameters, self._buffers, self._modules):
            if name in table:
                del table[name]
                return
        object.__delattr__(self, name)

    def register_buffer(self, name: str, value) -> None:
        """Register non-trainable state (saved in the state dict), e.g. running statistics."""
        self._buffers[name] = None if value is None else as_tensor(value).detach()

    # -- traversal (iterative: deep networks have long module lists, not deep nesting) -------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """This module and all submodules, depth first, with dotted names."""
        stack = [(prefix, self)]
        while stack:
            name, module = stack.pop()
            yield name, module
            children = list(module._modules.items())
            for child_name, child in reversed(children):
                stack.append((f"{name}.{child_name}" if name else child_name, child))

    def modules(self) -> Iterator[Module]:
        return (m for _, m in self.named_modules())

    def children(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        """All parameters with dotted names, in registration order."""
        for prefix, module in self.named_modules():
            for name, p in module._parameters.items():
                if p is not None:
                    yield (f"{prefix}.{name}" if prefix else name), p

    def parameters(self) -> Iterator[Tensor]:
        return (p for _, p in self.named_parameters())

    def named_buffers(self) -> Iterator[tuple[str, Tensor]]:
        for prefix, module in self.named_modules():
            for name, b in module._buffers.items():
                if b is not None:
                    yield (f"{prefix}.{name}" if prefix else name), b

    def buffers(self) -> Iterator[Tensor]:
        return (b for _, b in self.named_buffers())

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    # -- modes ----------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        """Training mode (batch norm uses batch statistics); returns self."""
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> Module:
        """Evaluation mode (batch norm uses running statistics); returns self."""
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Parameters and buffers by dotted name, as backend arrays (no copies)."""
        state = {name: p.raw for name, p in self.named_parameters()}
        state.update({name: b.raw for name, b in self.named_buffers()})
        return state

    def load_state_dict(self, state: Mapping, strict: bool = True) -> None:
        """Copy arrays (any backend, or NumPy) into the parameters and buffers.

        With ``strict`` (default) the keys must match exactly; every missing, unexpected or
        mis-shaped key is named in one ``KeyError``/``ValueError``. Values are moved to each
        tensor's backend; their dtype must match.
        """
        own = dict(self.named_parameters())
        own.update(self.named_buffers())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shaped = [f"{k}: expected {own[k].shape}, got {tuple(np.shape(v))}"
                  for k, v in state.items() if k in own and tuple(v.shape) != own[k].shape]
        problems = []
        if strict and missing:
            problems.append(f"missing keys {missing}")
        if strict and unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if shaped:
            problems.append("mis-shaped keys [" + "; ".join(shaped) + "]")
        if problems:
            raise KeyError(f"load_state_dict ({type(self).__name__}): " + ", ".join(problems))
        converted = {}
        for key, value in state.items():
            if key in own:
                target = own[key]
                raw = as_backend_array(value.raw if isinstance(value, Tensor) else value,
                                       backend=target.backend)
                if raw.dtype != target.dtype:
                    raise ValueError(f"load_state_dict: {key} has dtype {raw.dtype}, the model "
                                     f"has {target.dtype}")
                converted[key] = raw
        for key, raw in converted.items():  # all checked first: a failed load changes nothing
            own[key].data = raw

    def to(self, dtype=None, backend: str | None = None) -> Module:
        """Move every parameter and buffer to ``backend`` and/or convert floats to ``dtype``."""
        from miniresnet.backends import get_backend

        be = None if backend is None else get_backend(backend)
        for m in self.modules():
            for table in (m._parameters, m._buffers):
                for name, t in table.items():
                    if t is None:
                        continue
                    raw = t.raw if be is None else as_backend_array(t.raw, backend=be)
                    xp = (be or t.backend).xp
                    if dtype is not None and xp.isdtype(raw.dtype, "real floating"):
                        raw = as_backend_array(raw, dtype)
                    table[name] = Tensor(raw, requires_grad=table is m._parameters)
        return self

    # -- calling --------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")

    def __call__(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        for hook in tuple(self._forward_hooks.values()):
            hook(self, args, out)
        return out

    def register_forward_hook(self, hook) -> RemovableHandle:
        """Call ``hook(module, inputs, output)`` after every forward pass of this module (to
        observe, not to change: its return value is ignored); ``handle.remove()`` detaches it.
        """
        handle = RemovableHandle(self._forward_hooks)
        self._forward_hooks[handle.id] = hook
        return handle

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        if self._modules:
            for name, child in self._modules.items():
                body = repr(child).replace("\n", "\n  ")
                lines.append(f"  ({name}): {body}")
            lines.append(")")
            return "\n".join(lines)
        return lines[0] + ")"


class RemovableHandle:
    """Returned by :meth:`Module.register_forward_hook`; ``remove()`` detaches the hook (also as
    a context manager, on exit)."""

    _next_id = 0

    def __init__(self, hooks: dict) -> None:
        self._hooks, self.id = hooks, RemovableHandle._next_id
        RemovableHandle._next_id += 1

    def remove(self) -> None:
        self._hooks.pop(self.id, None)

    def __enter__(self) -> RemovableHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@contextlib.contextmanager
def frozen_stats(model: Module) -> Iterator[Module]:
    """Within this context the batch norms of ``model`` that are in training mode still
    normalise with the statistics of the batch they see, but update no running statistics, so
    a measurement leaves the model as it was. Yields ``model``."""
    norms = [m for m in model.modules() if hasattr(m, "track_running_stats")]
    previous = [m.track_running_stats for m in norms]
    for m in norms:
        object.__setattr__(m, "track_running_stats", False)
    try:
        yield model
    finally:
        for m, value in zip(norms, previous):
            object.__setattr__(m, "track_running_stats", value)


class Sequential(Module):
    """Modules applied in order, named ``"0"``, ``"1"``, ...; indexable, sliceable, iterable.

    ``seq[i] = m`` replaces the module at position ``i`` (negative indices count from the end)
    and keeps its name and place. ``seq[i:j]`` is a new ``Sequential`` of the *same* module
    objects (shared, not copied: a change to one is a change to the other), renamed ``"0"``,
    ``"1"``, ... so that its state dict matches ``Sequential(*modules)``.
    """

    def __init__(self, *modules: Module) -> None:
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def _key(self, index) -> str:
        """The name of the module at ``index`` (an integer, negative counting from the end)."""
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(f"Sequential indices must be integers or slices, got "
                            f"{type(index).__name__} {index!r}") from None
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"Sequential index {i} is out of range for length {n}")
        return list(self._modules)[i]

    def __getitem__(self, index: int | slice) -> Module:
        if isinstance(index, slice):
            part = Sequential(*list(self._modules.values())[index])
            object.__setattr__(part, "training", self.training)
            return part
        return self._modules[self._key(index)]

    def __setitem__(self, index: int, module: Module) -> None:
        if isinstance(index, slice):
            raise TypeError("Sequential takes one module at a time (seq[i] = module), not a "
                            "slice")
        if not isinstance(module, Module):
            raise TypeError(f"Sequential items must be Modules, got {type(module).__name__}")
        self._modules[self._key(index)] = module

    def append(self, module: Module) -> Sequential:
        if not isinstance(module, Module):
            raise TypeError(f"Sequential items must be Modules, got {type(module).__name__}")
        i = len(self)
        while str(i) in self._modules:  # after a deletion the names need not be 0 .. n-1
            i += 1
        self._modules[str(i)] = module
        return self

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x


@contextlib.contextmanager
def substituted(module: Module, values: Mapping) -> Iterator[None]:
    """Temporarily use ``values`` (name -> array or Tensor) for parameters/buffers."""
    owners = {}
    for prefix, m in module.named_modules():
        for table in (m._parameters, m._buffers):
            for name in table:
                owners[f"{prefix}.{name}" if prefix else name] = (table, name)
    unknown = [k for k in values if k not in owners]
    if unknown:
        raise KeyError(f"functional_call: unknown parameter or buffer names {unknown}")
    saved = {k: owners[k][0][owners[k][1]] for k in values}
    try:
        for k, v in values.items():
            table, name = owners[k]
            table[name] = as_tensor(v)
        yield
    finally:
        for k, v in saved.items():
            table, name = owners[k]
            table[name] = v


def functional_call(module: Module, values: Mapping, *args: object, **kwargs: object):
    """Call ``module`` with some parameters or buffers replaced by ``values`` (name -> array).

    This is how transforms differentiate with respect to parameters::

        names = [n for n, _ in model.named_parameters()]
        def loss(*arrays):
            return F.cross_entropy(functional_call(model, dict(zip(names, arrays)), x), y)
        grads = mr.grad(loss, argnums=tuple(range(len(names))))(
            *(p.raw for p in model.parameters()))
    """
    with substituted(module, values):
        return module(*args, **kwargs)

