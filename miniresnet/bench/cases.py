"""The benchmark cases: one computation written for every library, the check that they agree,
and the FLOPs each timed call performs.

Each case builds our timed call with :mod:`.ours` and each comparison library's with its twin
module in :data:`TWINS`, from the same model, weights and inputs.
"""

from __future__ import annotations

import gc
import math
import tracemalloc
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

import miniresnet.functional as F
from miniresnet import nn
from miniresnet.bench import autograd_twin, jax_twin, ours, torch_twin
from miniresnet.bench.measure import Fn, traced_peak

# The comparison libraries and their twins: each twin has train_step, block_jacobian and
# to_host (see torch_twin.py). A library is imported as the module of its own name, or of the
# name in MODULES ("jax-jit" is the jax module, its twin the jitted jax_twin).
TWINS: dict[str, Any] = {"torch": torch_twin, "autograd": autograd_twin, "jax": jax_twin,
                         "jax-jit": jax_twin.JIT}
MODULES: dict[str, str] = {"jax-jit": "jax"}
LIBS: tuple[str, ...] = ("ours", *TWINS)
# the libraries whose memory tracemalloc sees (NumPy buffers); PyTorch's and XLA's allocators
# are not traced
TRACED_MEMORY: tuple[str, ...] = ("ours", "autograd")
# joint relative error (see joint_rel_error) allowed between libraries. float32: rounding
# through 20 batch norms alone separates the libraries on a ResNet-20 training step (the check
# column shows by how much); 1e-2 is above that and still rejects different work (a changed
# weight gives errors of order 1).
TOLERANCE: dict[str, float] = {"float64": 1e-10, "float32": 1e-2}
GROUPS: tuple[str, ...] = ("resnet20", "jacobian", "deep")  # the case groups of build_cases

Outputs = list[np.ndarray]


def joint_rel_error(outs: Outputs, ref: Outputs) -> float:
    """``‖a − ref‖ / ‖ref‖`` over all outputs (loss and every gradient) taken together as one
    vector: the relative error of the whole result, which does not blow up for an array whose
    entries are tiny because of cancellation (batch-norm gradients, far ends of deep nets)."""
    if len(outs) != len(ref) or any(np.shape(a) != np.shape(b) for a, b in zip(outs, ref)):
        return math.inf
    a = np.concatenate([np.ravel(np.asarray(o, dtype=np.float64)) for o in outs])
    b = np.concatenate([np.ravel(np.asarray(r, dtype=np.float64)) for r in ref])
    diff, scale = float(np.linalg.norm(a - b)), float(np.linalg.norm(b))
    if not math.isfinite(diff):
        return math.inf
    return diff / scale if scale > 0 else diff


@dataclass
class Case:
    """One benchmark: the same computation written for every library.

    Subclasses implement :meth:`setup` and :meth:`flops`; :meth:`check` compares every library's
    outputs with ours. ``weight_hook(lib, weights) -> weights`` (tests only) may alter the
    host copy of the weights handed to one library, to exercise a failing check. A library in
    :attr:`not_run` is left out of the case, with the reason reported.
    """

    not_run: ClassVar[dict[str, str]] = {}

    name: str
    group: str
    weight_hook: Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = field(
        default=None, repr=False, compare=False)

    def setup(self, dtype: str, libs: dict[str, Any]) -> dict[str, Fn]:
        """Build the models and inputs; return ``{lib: fn}`` with ``fn()`` the timed call."""
        raise NotImplementedError

    def outputs(self, lib: str, result: Any) -> Outputs:
        """The host arrays of one call's ``result`` that :meth:`check` compares."""
        return [np.asarray(r) for r in result]

    def check(self, results: dict[str, Outputs], dtype: str) -> tuple[bool, dict[str, float]]:
        """Compare every library's outputs with ours.

        Returns
        -------
        ok, errors : bool, dict
            Whether every relative error is within :data:`TOLERANCE` for ``dtype``, and the
            worst relative error of each library (over all its arrays).
        """
        ref = results["ours"]
        errors = {}
        for lib, outs in results.items():
            if lib == "ours":
                continue
            errors[lib] = joint_rel_error(outs, ref)
        ok = all(e <= TOLERANCE[dtype] for e in errors.values())
        return ok, errors

    def flops(self) -> float:
        """Floating-point operations of one timed call (matmul/convolution work only)."""
        raise NotImplementedError

    def extra(self, dtype: str, libs: dict[str, Any]) -> dict[str, Any]:
        """Further measurements reported with the case (memory, graph release), if any."""
        return {}

    def _weights(self, lib: str, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        copied = {k: np.array(v) for k, v in weights.items()}
        return self.weight_hook(lib, copied) if self.weight_hook else copied


def _host(lib: str, result: Any) -> Outputs:
    """The host arrays of one call's ``result`` from library ``lib``."""
    return TWINS[lib].to_host(result) if lib in TWINS else [np.asarray(r) for r in result]


def conv_net_flops(model: Any, shape: tuple[int, ...]) -> float:
    """Forward FLOPs (2 per multiply-add) of the convolutions and linear maps of a post-order
    ``resnet_cifar`` (or of one :class:`~miniresnet.nn.BasicBlock`) on input ``shape``."""
    n, _, h, w = shape
    total = 0.0

    def conv(m: Any, h: int, w: int) -> tuple[int, int]:
        nonlocal total
        k, s, p = m.kernel_size, m.stride, m.padding
        oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        total += 2.0 * n * m.out_channels * oh * ow * m.in_channels * k * k
        return oh, ow

    def block(b: Any, h: int, w: int) -> tuple[int, int]:
        bh, bw = h, w
        for layer in b.layers:
            bh, bw = conv(layer, bh, bw)
        if isinstance(b.shortcut, nn.Sequential):
            conv(b.shortcut[0], h, w)
        return bh, bw

    if isinstance(model, nn.BasicBlock):
        block(model, h, w)
        return total
    h, w = conv(model.stem[0], h, w)
    for b in model.blocks:
        h, w = block(b, h, w)
    lin = model.head[len(model.head) - 1]
    return total + 2.0 * n * lin.in_features * lin.out_features


def _check_supported(model: Any) -> None:
    """The twins mirror only the post-order projection ResNet."""
    cfg = model.config
    want = {"order": "post", "norm": True, "activation": "relu", "shortcut": "projection",
            "residual": True, "block": "basic", "beta": 1.0, "lam": 1.0, "skipinit": None}
    bad = {k: cfg[k] for k, v in want.items() if cfg[k] != v}
    if bad:
        raise ValueError(f"bench mirrors only the post-order projection ResNet, not {bad}")


class TrainStepCase(Case):
    """Forward, cross-entropy and backward of ``resnet_cifar(n, ...)`` (BN in training mode):
    outputs the loss and the gradients of all parameters. FLOPs: 3× the forward pass."""

    def __init__(self, name: str, group: str, n: int, batch: int, channels: int, size: int,
                 width: float = 1.0, seed: int = 0, **kw: Any) -> None:
        super().__init__(name, group, **kw)
        self.n, self.batch, self.channels, self.size = n, batch, channels, size
        self.width, self.seed = width, seed

    def _model(self, dtype: str) -> Any:
        model = nn.resnet_cifar(self.n, width=self.width, in_channels=self.channels,
                                dtype=dtype, seed=self.seed)
        _check_supported(model)
        return model

    def _data(self, dtype: str) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed + 1)
        x = rng.standard_normal((self.batch, self.channels, self.size, self.size)).astype(dtype)
        return x, rng.integers(0, 10, size=self.batch)

    def flops(self) -> float:
        return 3 * conv_net_flops(self._model("float64"),
                                  (self.batch, self.channels, self.size, self.size))

    def setup(self, dtype: str, libs: dict[str, Any]) -> dict[str, Fn]:
        model = self._model(dtype)
        x, y = self._data(dtype)
        host = {k: np.array(p.raw) for k, p in model.named_parameters()}
        fns: dict[str, Fn] = {"ours": ours.train_step(model, x, y)}
        for lib, twin in TWINS.items():
            if lib in libs:
                fns[lib] = twin.train_step(libs[lib], model, self._weights(lib, host), x, y)
        return fns

    def outputs(self, lib: str, result: Any) -> Outputs:
        return _host(lib, result)


class BlockJacobianCase(Case):
    """The exact dense Jacobian of one post-order residual block (eval-mode BN with non-trivial
    running statistics) with respect to its input. FLOPs: forward + one input-VJP per output,
    each costing as much as the forward pass."""

    def __init__(self, name: str, group: str, channels: int = 16, size: int = 8, seed: int = 0,
                 **kw: Any) -> None:
        super().__init__(name, group, **kw)
        self.channels, self.size, self.seed = channels, size, seed

    def _block(self, dtype: str) -> Any:
        block = nn.BasicBlock(self.channels, self.channels, dtype=dtype, rng=self.seed)
        rng = np.random.default_rng(self.seed + 2)
        for norm in block.norms:
            norm.running_mean = (0.1 * rng.standard_normal(self.channels)).astype(dtype)
            norm.running_var = rng.uniform(0.5, 2.0, self.channels).astype(dtype)
            norm.weight.data = rng.uniform(0.5, 1.5, self.channels).astype(dtype)
            norm.bias.data = (0.1 * rng.standard_normal(self.channels)).astype(dtype)
        return block.eval()

    def _shape(self) -> tuple[int, int, int, int]:
        return (1, self.channels, self.size, self.size)

    def flops(self) -> float:
        fwd = conv_net_flops(self._block("float64"), self._shape())
        return fwd * (1 + math.prod(self._shape()))

    def setup(self, dtype: str, libs: dict[str, Any]) -> dict[str, Fn]:
        block = self._block(dtype)
        x = np.random.default_rng(self.seed + 3).standard_normal(self._shape()).astype(dtype)
        host = {k: np.array(p.raw) for k, p in block.named_parameters()}
        bufs = {k: np.array(b.raw) for k, b in block.named_buffers()}
        fns: dict[str, Fn] = {"ours": ours.block_jacobian(block, host, x)}
        for lib, twin in TWINS.items():
            if lib in libs:
                fns[lib] = twin.block_jacobian(libs[lib], block, self._weights(lib, host),
                                               bufs, x)
        return fns

    def outputs(self, lib: str, result: Any) -> Outputs:
        (j,) = _host(lib, result)
        m = math.prod(self._shape())
        return [j.reshape(m, m)]


class DeepNetCase(TrainStepCase):
    """Forward+backward of a very deep ``resnet_cifar(n, width=0.25)`` (6n+2 layers), plus
    memory: the tracemalloc peak at several depths, and whether the graph is released."""

    not_run: ClassVar[dict[str, str]] = {
        "jax-jit": "jax.jit compiles the unrolled network as one program, which XLA had not "
                   "finished compiling after 13 minutes at 1,000 layers (2 CPUs)"}

    def __init__(self, name: str, group: str, n: int, batch: int = 8,
                 memory_depths: Sequence[int] = (41, 83, 166), **kw: Any) -> None:
        super().__init__(name, group, n=n, batch=batch, channels=1, size=8, width=0.25, **kw)
        self.memory_depths = tuple(memory_depths)

    def extra(self, dtype: str, libs: dict[str, Any]) -> dict[str, Any]:
        rows = []
        for n in self.memory_depths:
            sub = DeepNetCase(self.name, self.group, n=n, batch=self.batch, memory_depths=())
            row: dict[str, Any] = {"n": n, "layers": 6 * n + 2}
            fns = sub.setup(dtype, {k: v for k, v in libs.items() if k in TRACED_MEMORY})
            for lib, fn in fns.items():
                row[f"{lib}_peak_MB"] = traced_peak(fn) / 1e6
            rows.append(row)
        return {"memory": rows,
                "memory_method": "tracemalloc peak above the memory held before the call "
                                 "(NumPy buffers; PyTorch and JAX not seen)",
                "graph_release": graph_release(self._model(dtype), *self._data(dtype))}


def graph_release(model: Any, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Whether our eager tape frees the graph on ``backward()`` while the loss is still held.

    A weak reference to the buffer of an activation in the middle of the network must be dead
    after ``backward()``, and the traced memory still held (with ``loss`` alive) is compared
    with the parameters' gradients, which are all that should remain.
    """
    model.zero_grad()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        h = model.stem(x)
        mid = len(model.blocks) // 2
        for i, block in enumerate(model.blocks):
            h = block(h)
            if i == mid:
                probe = weakref.ref(h.raw)
        loss = F.cross_entropy(model.head(h), y)
        del h
        alive_before = probe() is not None
        loss.backward()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    grad_bytes = sum(p.grad.raw.nbytes for p in model.parameters())
    released = alive_before and probe() is None
    del loss
    return {"activation_freed": released, "held_after_backward_MB": held / 1e6,
            "gradient_MB": grad_bytes / 1e6}


def build_cases(quick: bool = False) -> list[Case]:
    """The benchmark cases; ``quick`` gives tiny versions of each (for tests)."""
    if quick:
        return [
            TrainStepCase("resnet8 b4x1x8x8 w0.25", "resnet20", n=1, batch=4, channels=1,
                          size=8, width=0.25),
            BlockJacobianCase("block jacobian 4ch 4x4", "jacobian", channels=4, size=4),
            DeepNetCase("resnet32 w0.25 b2", "deep", n=5, batch=2, memory_depths=(2, 5)),
        ]
    return [
        # a small batch: the engine's per-op overhead shows most here
        TrainStepCase("resnet20 b8x1x8x8", "resnet20", n=3, batch=8, channels=1, size=8),
        TrainStepCase("resnet20 b128x1x8x8", "resnet20", n=3, batch=128, channels=1, size=8),
        TrainStepCase("resnet20 b32x3x32x32", "resnet20", n=3, batch=32, channels=3, size=32),
        BlockJacobianCase("block jacobian 16ch 8x8", "jacobian", channels=16, size=8),
        DeepNetCase("resnet1000 w0.25 b8x1x8x8", "deep", n=166, batch=8),
    ]
