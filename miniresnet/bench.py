"""Side-by-side benchmarks of miniresnet against PyTorch and HIPS autograd.

Run ``python -m miniresnet.bench --help``. Every case runs in one process with the same inputs
and weights for every library, 2 threads each (threadpoolctl for BLAS, ``torch.set_num_threads``).
Before timing, each case checks that all libraries computed the same thing: loss and gradients,
or the Jacobian, agree within :data:`TOLERANCE` (``1e-10`` in float64, ``1e-2`` in float32) as
the relative L2 error of all outputs taken together (:func:`joint_rel_error`). A case whose
check fails is reported as ``FAILED CHECK`` and is not timed, so no ratio is ever reported
for different work. (The 1,000-layer case fails it in float32: rounding differences grow
through the depth until the libraries' gradients differ by ~1e-1, the same computation rounded
differently, which the check cannot tell from different work, so it is reported and not timed.)
A library that is not installed (``pip install miniresnet[bench]``) is skipped with a message.

Times are the median of ``repeats`` calls after one warm-up call (the check's call is a second
one). Achieved GFLOP/s count the multiply-adds of the convolutions and linear maps only (2 per
multiply-add), with the conventions of each case's ``flops`` (a training step is 3× its forward
pass), and are shown as a fraction of this machine's GEMM rate, measured at start-up with a
large NumPy matmul under the same thread limit.

While timing, each library's calls record how long this process's threads were ready to run
but waiting for a CPU (Linux ``/proc/self/task/*/schedstat``). Above :data:`WAIT_LIMIT` seconds
per second of wall time the machine was contended (other processes running, or more busy
threads than cores) and the times measure the scheduler, not the library: such times and the
ratios built on them are marked ``?`` and reported as unreliable (:func:`contended`).

Memory (the deep case) is the ``tracemalloc`` peak of one forward+backward above the memory
held before it. It sees every NumPy array buffer (so ours and autograd), but not PyTorch's
allocator, so no PyTorch memory is reported.

New cases subclass :class:`Case` and are added to :func:`build_cases`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from miniresnet._cli import whole_number

LIBS: tuple[str, ...] = ("ours", "torch", "autograd")
# joint relative error (see joint_rel_error) allowed between libraries. float32: PyTorch and
# autograd themselves differ by ~4e-3 on a ResNet-20 training step (rounding through 20 batch
# norms); 1e-2 still rejects different work (a changed weight gives O(1) errors).
TOLERANCE: dict[str, float] = {"float64": 1e-10, "float32": 1e-2}
THREADS = 2  # the default thread count of every library (BLAS pools, PyTorch intra-op)
GROUPS: tuple[str, ...] = ("resnet20", "jacobian", "deep")  # the case groups of build_cases
# Seconds this process's threads may wait for a CPU per second of timed wall time. Measured on
# an idle 2-core VM: mostly under 0.05, at most 0.15 (thread wake-ups); with two busy-looping
# processes beside it, 0.33-1.5 (PyTorch's tiny steps then take 60x longer).
WAIT_LIMIT = 0.2

Outputs = list[np.ndarray]
Fn = Callable[[], Any]


# -- libraries ------------------------------------------------------------------------------------
def import_libs(wanted: Sequence[str] = LIBS, threads: int = THREADS
                ) -> tuple[dict[str, Any], dict[str, str]]:
    """Import the comparison libraries that are installed.

    Returns
    -------
    modules, missing : dict, dict
        ``{lib: module}`` for the libraries found (``"ours"`` maps to ``miniresnet``) and
        ``{lib: reason}`` for those skipped.
    """
    import miniresnet

    modules: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for lib in wanted:
        if lib == "ours":
            modules[lib] = miniresnet
            continue
        try:
            modules[lib] = importlib.import_module(lib)
        except ImportError as exc:
            missing[lib] = f"{lib} not installed ({exc}); pip install 'miniresnet[bench]'"
    if "torch" in modules:
        modules["torch"].set_num_threads(threads)
    return modules, missing


def gemm_rate(dtype: str, n: int = 2048, repeats: int = 3) -> float:
    """This machine's GEMM rate in GFLOP/s: the best of ``repeats`` ``n×n`` NumPy matmuls."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(dtype) for _ in range(2))
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


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


# -- contention -----------------------------------------------------------------------------------
def thread_waits() -> dict[str, int] | None:
    """Nanoseconds each thread of this process has spent ready to run but waiting for a CPU
    (Linux ``/proc/self/task/<tid>/schedstat``); None where the kernel does not report it."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    waits = {}
    for tid in tids:
        with contextlib.suppress(OSError, IndexError, ValueError):  # the thread has just ended
            with open(f"/proc/self/task/{tid}/schedstat", "rb") as fh:
                waits[tid] = int(fh.read().split()[1])
    return waits or None


def waited(before: dict[str, int] | None, after: dict[str, int] | None) -> float | None:
    """Seconds of CPU wait between two :func:`thread_waits` samples (a thread started in between
    counts from zero); None if either sample is."""
    if before is None or after is None:
        return None
    return sum(max(w - before.get(tid, 0), 0) for tid, w in after.items()) / 1e9


def contended(wall_s: float, wait_s: float | None, limit: float = WAIT_LIMIT) -> bool | None:
    """Whether a timed stretch of ``wall_s`` seconds, during which this process's threads waited
    ``wait_s`` seconds in all for a CPU, was contended: more than ``limit`` seconds of waiting per
    second. None when the wait was not measured.

    The wait, not the CPU time, is the evidence: a single-threaded stretch uses one core on an
    idle machine too, and spinning thread pools burn CPU while they wait for a descheduled peer.
    """
    if wait_s is None:
        return None
    return wait_s > limit * wall_s


# -- cases ----------------------------------------------------------------------------------------
@dataclass
class Case:
    """One benchmark: the same computation written for every library.

    Subclasses implement :meth:`setup` and :meth:`flops`; :meth:`check` compares every library's
    outputs with ours. ``weight_hook(lib, weights) -> weights`` (tests only) may alter the
    host copy of the weights handed to one library, to exercise a failing check.
    """

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


def conv_net_flops(model: Any, shape: tuple[int, ...]) -> float:
    """Forward FLOPs (2 per multiply-add) of the convolutions and linear maps of a post-order
    ``resnet_cifar`` (or of one :class:`~miniresnet.nn.BasicBlock`) on input ``shape``."""
    from miniresnet import nn

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


# -- the post-order CIFAR ResNet in PyTorch and in autograd.numpy ----------------------------------
def _check_supported(model: Any) -> None:
    cfg = model.config
    want = {"order": "post", "norm": True, "activation": "relu", "shortcut": "projection",
            "residual": True, "block": "basic", "beta": 1.0, "lam": 1.0, "skipinit": None}
    bad = {k: cfg[k] for k, v in want.items() if cfg[k] != v}
    if bad:
        raise ValueError(f"bench mirrors only the post-order projection ResNet, not {bad}")


def torch_resnet(torch: Any, model: Any) -> Any:
    """A PyTorch module computing exactly ``model`` (post-order ``resnet_cifar``), with the same
    parameter names and order; weights are not copied (see :func:`load_torch`)."""
    from miniresnet import nn

    tnn = torch.nn
    ours_dtype = np.dtype(next(iter(model.parameters())).raw.dtype).name
    dtype = {"float64": torch.float64, "float32": torch.float32}[ours_dtype]

    def conv(m: Any) -> Any:
        return tnn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                          bias=m.bias is not None, dtype=dtype)

    def bn(m: Any) -> Any:
        return tnn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum, dtype=dtype)

    class Block(tnn.Module):
        def __init__(self, b: Any) -> None:
            super().__init__()
            self.layers = tnn.ModuleList([conv(m) for m in b.layers])
            self.norms = tnn.ModuleList([bn(m) for m in b.norms])
            self.shortcut = (tnn.Sequential(conv(b.shortcut[0]), bn(b.shortcut[1]))
                             if isinstance(b.shortcut, nn.Sequential) else tnn.Identity())

        def forward(self, x: Any) -> Any:
            f = torch.relu(self.norms[0](self.layers[0](x)))
            f = self.norms[1](self.layers[1](f))
            return torch.relu(f + self.shortcut(x))

    if isinstance(model, nn.BasicBlock):
        return Block(model)

    class Pool(tnn.Module):
        def forward(self, x: Any) -> Any:
            return x.mean(dim=(2, 3))

    class Net(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = tnn.Sequential(conv(model.stem[0]), bn(model.stem[1]), tnn.ReLU())
            self.blocks = tnn.Sequential(*(Block(b) for b in model.blocks))
            lin = model.head[1]
            self.head = tnn.Sequential(Pool(), tnn.Linear(lin.in_features, lin.out_features,
                                                          dtype=dtype))

        def forward(self, x: Any) -> Any:
            return self.head(self.blocks(self.stem(x)))

    return Net()


def load_torch(torch: Any, tmodel: Any, weights: dict[str, np.ndarray],
               buffers: dict[str, np.ndarray] | None = None) -> list[Any]:
    """Copy ``weights`` (our names) into ``tmodel``; return its parameters in our order."""
    params = dict(tmodel.named_parameters())
    if set(params) != set(weights):
        raise ValueError(f"parameter names differ: {sorted(set(params) ^ set(weights))}")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(torch.from_numpy(np.ascontiguousarray(v)))
        own = dict(tmodel.named_buffers())
        for k, v in (buffers or {}).items():
            own[k].copy_(torch.from_numpy(np.ascontiguousarray(v)))
    return [params[k] for k in weights]


def _ag_conv(anp: Any, x: Any, w: Any, stride: int, padding: int) -> Any:
    """Convolution as im2col by strided slices and one matmul (what autograd differentiates)."""
    n, c, h, wd = x.shape
    f, _, k, _ = w.shape
    oh, ow = (h + 2 * padding - k) // stride + 1, (wd + 2 * padding - k) // stride + 1
    if padding:
        x = anp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), "constant")
    eh, ew = stride * (oh - 1) + 1, stride * (ow - 1) + 1
    cols = anp.stack([x[:, :, i:i + eh:stride, j:j + ew:stride]
                      for i in range(k) for j in range(k)], axis=2)  # (N, C, k*k, oh, ow)
    cols = anp.reshape(cols, (n, c * k * k, oh * ow))
    out = anp.matmul(anp.reshape(w, (f, c * k * k)), cols)  # (N, F, oh*ow)
    return anp.reshape(out, (n, f, oh, ow))


def _ag_bn(anp: Any, x: Any, w: Any, b: Any, eps: float, stats: tuple | None = None) -> Any:
    if stats is None:
        mean = anp.mean(x, axis=(0, 2, 3), keepdims=True)
        centred = x - mean
        var = anp.mean(centred * centred, axis=(0, 2, 3), keepdims=True)
    else:
        centred = x - anp.reshape(stats[0], (1, -1, 1, 1))
        var = anp.reshape(stats[1], (1, -1, 1, 1))
    out = centred / anp.sqrt(var + eps)
    return out * anp.reshape(w, (1, -1, 1, 1)) + anp.reshape(b, (1, -1, 1, 1))


def autograd_block(anp: Any, b: Any, p: dict, q: str, h: Any, bufs: dict | None = None) -> Any:
    """One post-order block (prefix ``q``) in autograd.numpy; ``bufs`` given: eval-mode BN."""
    from miniresnet import nn

    def norm(x: Any, name: str, m: Any) -> Any:
        stats = None if bufs is None else (bufs[name + "running_mean"],
                                           bufs[name + "running_var"])
        return _ag_bn(anp, x, p[name + "weight"], p[name + "bias"], m.eps, stats)

    l1, l2 = b.layers
    f = _ag_conv(anp, h, p[q + "layers.0.weight"], l1.stride, l1.padding)
    f = anp.maximum(norm(f, q + "norms.0.", b.norms[0]), 0.0)
    f = norm(_ag_conv(anp, f, p[q + "layers.1.weight"], l2.stride, l2.padding), q + "norms.1.",
             b.norms[1])
    if isinstance(b.shortcut, nn.Sequential):
        sc = b.shortcut[0]
        s = norm(_ag_conv(anp, h, p[q + "shortcut.0.weight"], sc.stride, sc.padding),
                 q + "shortcut.1.", b.shortcut[1])
    else:
        s = h
    return anp.maximum(f + s, 0.0)


def autograd_loss(anp: Any, model: Any, p: dict, x: np.ndarray, onehot: np.ndarray) -> Any:
    """Mean softmax cross-entropy of the post-order ``model`` (BN in training mode)."""
    stem = model.stem
    h = _ag_conv(anp, x, p["stem.0.weight"], stem[0].stride, stem[0].padding)
    h = anp.maximum(_ag_bn(anp, h, p["stem.1.weight"], p["stem.1.bias"], stem[1].eps), 0.0)
    for i, b in enumerate(model.blocks):
        h = autograd_block(anp, b, p, f"blocks.{i}.", h)
    logits = anp.dot(anp.mean(h, axis=(2, 3)), anp.transpose(p["head.1.weight"]))
    logits = logits + p["head.1.bias"]
    z = logits - anp.max(logits, axis=1, keepdims=True)
    logp = z - anp.log(anp.sum(anp.exp(z), axis=1, keepdims=True))
    return -anp.mean(anp.sum(onehot * logp, axis=1))


class TrainStepCase(Case):
    """Forward, cross-entropy and backward of ``resnet_cifar(n, ...)`` (BN in training mode):
    outputs the loss and the gradients of all parameters. FLOPs: 3× the forward pass."""

    def __init__(self, name: str, group: str, n: int, batch: int, channels: int, size: int,
                 width: float = 1.0, seed: int = 0, **kw: Any) -> None:
        super().__init__(name, group, **kw)
        self.n, self.batch, self.channels, self.size = n, batch, channels, size
        self.width, self.seed = width, seed

    def _model(self, dtype: str) -> Any:
        from miniresnet import nn

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
        import miniresnet.functional as F

        model = self._model(dtype)
        x, y = self._data(dtype)
        names = [k for k, _ in model.named_parameters()]
        params = list(model.parameters())
        host = {k: np.array(p.raw) for k, p in zip(names, params)}
        fns: dict[str, Fn] = {}

        def ours() -> list:
            model.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return [loss.raw] + [p.grad.raw for p in params]

        fns["ours"] = ours
        if "torch" in libs:
            torch = libs["torch"]
            tmodel = torch_resnet(torch, model)
            tparams = load_torch(torch, tmodel, self._weights("torch", host))
            tx, ty = torch.from_numpy(x), torch.from_numpy(y)
            cross_entropy = torch.nn.functional.cross_entropy

            def torch_step() -> list:
                tmodel.zero_grad(set_to_none=True)
                loss = cross_entropy(tmodel(tx), ty)
                loss.backward()
                return [loss.detach()] + [p.grad for p in tparams]

            fns["torch"] = torch_step
        if "autograd" in libs:
            ag = libs["autograd"]
            anp = importlib.import_module("autograd.numpy")
            agp = self._weights("autograd", host)
            plist = [agp[k] for k in names]
            onehot = np.eye(10, dtype=dtype)[y]

            def loss_fn(ps: list) -> Any:
                return autograd_loss(anp, model, dict(zip(names, ps)), x, onehot)

            vg = ag.value_and_grad(loss_fn)

            def autograd_step() -> list:
                loss, grads = vg(plist)
                return [loss] + list(grads)

            fns["autograd"] = autograd_step
        return fns

    def outputs(self, lib: str, result: Any) -> Outputs:
        if lib == "torch":
            return [r.detach().numpy() for r in result]
        return [np.asarray(r) for r in result]


class BlockJacobianCase(Case):
    """The exact dense Jacobian of one post-order residual block (eval-mode BN with non-trivial
    running statistics) with respect to its input. FLOPs: forward + one input-VJP per output,
    each costing as much as the forward pass."""

    def __init__(self, name: str, group: str, channels: int = 16, size: int = 8, seed: int = 0,
                 **kw: Any) -> None:
        super().__init__(name, group, **kw)
        self.channels, self.size, self.seed = channels, size, seed

    def _block(self, dtype: str) -> Any:
        from miniresnet import nn

        block = nn.BasicBlock(self.channels, self.channels, dtype=dtype, rng=self.seed)
        rng = np.random.default_rng(self.seed + 2)
        for norm in block.norms:
            norm.running_mean = (0.1 * rng.standard_normal(self.channels)).astype(dtype)
            norm.running_var = rng.uniform(0.5, 2.0, self.channels).astype(dtype)
            norm.weight.data = rng.uniform(0.5, 1.5, self.channels).astype(dtype)
            norm.bias.data = (0.1 * rng.standard_normal(self.channels)).astype(dtype)
        return block.eval()

    def flops(self) -> float:
        shape = (1, self.channels, self.size, self.size)
        fwd = conv_net_flops(self._block("float64"), shape)
        return fwd * (1 + math.prod(shape))

    def setup(self, dtype: str, libs: dict[str, Any]) -> dict[str, Fn]:
        import miniresnet as mr
        from miniresnet import nn

        block = self._block(dtype)
        shape = (1, self.channels, self.size, self.size)
        m = math.prod(shape)
        x = np.random.default_rng(self.seed + 3).standard_normal(shape).astype(dtype)
        names = [k for k, _ in block.named_parameters()]
        host = {k: np.array(p.raw) for k, p in zip(names, block.parameters())}
        bufs = {k: np.array(b.raw) for k, b in block.named_buffers()}
        plain = {k: np.array(v) for k, v in host.items()}  # constants: no tape for the weights
        jac = mr.jacobian(lambda v: nn.functional_call(block, plain, v))

        def ours_jac() -> list:
            return [jac(x)]

        fns: dict[str, Fn] = {"ours": ours_jac}
        if "torch" in libs:
            torch = libs["torch"]
            tblock = torch_resnet(torch, block)
            load_torch(torch, tblock, self._weights("torch", host), bufs)
            tblock.eval()
            tx = torch.from_numpy(x)
            tjac = torch.func.jacrev(tblock)

            def torch_jac() -> list:
                with torch.no_grad():
                    return [tjac(tx)]

            fns["torch"] = torch_jac
        if "autograd" in libs:
            ag = libs["autograd"]
            anp = importlib.import_module("autograd.numpy")
            agp = self._weights("autograd", host)
            ajac = ag.jacobian(lambda v: autograd_block(anp, block, agp, "", v, bufs))
            fns["autograd"] = lambda: [ajac(x)]
        self._m = m
        return fns

    def outputs(self, lib: str, result: Any) -> Outputs:
        (j,) = result
        j = j.detach().numpy() if lib == "torch" else np.asarray(j)
        return [j.reshape(self._m, self._m)]


class DeepNetCase(TrainStepCase):
    """Forward+backward of a very deep ``resnet_cifar(n, width=0.25)`` (6n+2 layers), plus
    memory: the tracemalloc peak at several depths, and whether the graph is released."""

    def __init__(self, name: str, group: str, n: int, batch: int = 8,
                 memory_depths: Sequence[int] = (41, 83, 166), **kw: Any) -> None:
        super().__init__(name, group, n=n, batch=batch, channels=1, size=8, width=0.25, **kw)
        self.memory_depths = tuple(memory_depths)

    def extra(self, dtype: str, libs: dict[str, Any]) -> dict[str, Any]:
        rows = []
        for n in self.memory_depths:
            sub = DeepNetCase(self.name, self.group, n=n, batch=self.batch, memory_depths=())
            row: dict[str, Any] = {"n": n, "layers": 6 * n + 2}
            fns = sub.setup(dtype, {k: v for k, v in libs.items() if k != "torch"})
            for lib, fn in fns.items():
                row[f"{lib}_peak_MB"] = traced_peak(fn) / 1e6
            rows.append(row)
        return {"memory": rows, "memory_method": "tracemalloc peak above the memory held before "
                                                 "the call (NumPy buffers; PyTorch not seen)",
                "graph_release": graph_release(self._model(dtype), *self._data(dtype))}


def traced_peak(fn: Fn) -> int:
    """The tracemalloc peak (bytes) of one call of ``fn`` above what was held before it."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del result
    return peak - base


def graph_release(model: Any, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Whether our eager tape frees the graph on ``backward()`` while the loss is still held.

    A weak reference to the buffer of an activation in the middle of the network must be dead
    after ``backward()``, and the traced memory still held (with ``loss`` alive) is compared
    with the parameters' gradients, which are all that should remain.
    """
    import miniresnet.functional as F

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


# -- registry -------------------------------------------------------------------------------------
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
        TrainStepCase("resnet20 b128x1x8x8", "resnet20", n=3, batch=128, channels=1, size=8),
        TrainStepCase("resnet20 b32x3x32x32", "resnet20", n=3, batch=32, channels=3, size=32),
        BlockJacobianCase("block jacobian 16ch 8x8", "jacobian", channels=16, size=8),
        DeepNetCase("resnet1000 w0.25 b8x1x8x8", "deep", n=166, batch=8),
    ]


# -- running --------------------------------------------------------------------------------------
def time_fns(fns: dict[str, Fn], repeats: int, warmup: int = 1
             ) -> tuple[dict[str, list[float]], dict[str, dict[str, float | None]]]:
    """Wall times (s) of ``repeats`` calls of each function, interleaved across libraries, and
    per library the process CPU time and the threads' CPU wait (:func:`thread_waits`; None
    where not measurable) over those calls, as ``{lib: {"cpu_s": ..., "wait_s": ...}}``."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {lib: [] for lib in fns}
    usage: dict[str, dict[str, float | None]] = {lib: {"cpu_s": 0.0, "wait_s": 0.0}
                                                 for lib in fns}
    for _ in range(repeats):
        for lib, fn in fns.items():
            gc.collect()
            w0, c0 = thread_waits(), time.process_time()
            t0 = time.perf_counter()
            fn()
            times[lib].append(time.perf_counter() - t0)
            c1, w = time.process_time(), waited(w0, thread_waits())
            u = usage[lib]
            u["cpu_s"] += c1 - c0
            u["wait_s"] = None if w is None or u["wait_s"] is None else u["wait_s"] + w
    return times, usage


def contention_record(times: dict[str, list[float]],
                      usage: dict[str, dict[str, float | None]]) -> dict[str, Any]:
    """Per library: CPU time and CPU wait per second of wall time, and the :func:`contended`
    verdict, for the JSON report."""
    rec: dict[str, Any] = {"wait_limit": WAIT_LIMIT, "contended": {}, "wait_per_wall": {},
                           "cpu_per_wall": {}}
    for lib, t in times.items():
        wall, wait = sum(t), usage[lib]["wait_s"]
        rec["contended"][lib] = contended(wall, wait)
        rec["wait_per_wall"][lib] = None if wait is None else wait / wall
        rec["cpu_per_wall"][lib] = usage[lib]["cpu_s"] / wall
    return rec


def run_case(case: Case, dtype: str, libs: dict[str, Any], repeats: int,
             gemm: dict[str, float]) -> dict[str, Any]:
    """Set up, check and (if the check passes) time one case; returns its JSON record."""
    rec: dict[str, Any] = {"case": case.name, "group": case.group, "dtype": dtype,
                           "libs": sorted(libs, key=LIBS.index), "tolerance": TOLERANCE[dtype]}
    fns = case.setup(dtype, libs)
    results = {lib: case.outputs(lib, fn()) for lib, fn in fns.items()}
    ok, errors = case.check(results, dtype)
    del results
    rec["check"] = {"ok": ok, "max_rel_error": errors}
    if not ok:  # not timed; measurements of ours alone (memory) are still reported
        rec["status"] = "FAILED CHECK"
        del fns
        rec.update(case.extra(dtype, libs))
        return rec
    rec["status"] = "ok"
    times, usage = time_fns(fns, repeats)
    flops = case.flops()
    rec["flops"] = flops
    rec["times_s"] = times
    rec["median_s"] = {lib: statistics.median(t) for lib, t in times.items()}
    rec["gflops"] = {lib: flops / t / 1e9 for lib, t in rec["median_s"].items()}
    rec["fraction_of_gemm"] = {lib: g / gemm[dtype] for lib, g in rec["gflops"].items()}
    med = rec["median_s"]
    rec["ratios"] = {f"ours/{lib}": med["ours"] / med[lib] for lib in med if lib != "ours"}
    rec["contention"] = contention_record(times, usage)
    verdict = rec["contention"]["contended"]
    # a ratio is reliable when neither of its two libraries' times was contended
    rec["ratio_reliable"] = {
        f"ours/{lib}": None if None in (verdict["ours"], verdict[lib])
        else not (verdict["ours"] or verdict[lib]) for lib in med if lib != "ours"}
    del fns
    rec.update(case.extra(dtype, libs))
    return rec


def environment(gemm: dict[str, float], threads: int) -> dict[str, Any]:
    """Machine, versions, BLAS and thread settings, and the measured GEMM rates."""
    from threadpoolctl import threadpool_info

    info = {"python": sys.version.split()[0], "platform": platform.platform(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "numpy": np.__version__, "threads": threads,
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "blas": [{k: d.get(k) for k in ("internal_api", "version", "architecture",
                                             "num_threads", "threading_layer", "filepath")}
                     for d in threadpool_info()],
            "gemm_gflops": gemm}
    for mod in ("torch", "autograd"):
        m = sys.modules.get(mod)
        if m is not None:
            info[mod] = getattr(m, "__version__", "?")
    return info


def run(cases: Sequence[Case], dtypes: Sequence[str], repeats: int,
        libs: Sequence[str] = LIBS, echo: Callable[[str], None] = print,
        threads: int = THREADS) -> dict[str, Any]:
    """Run ``cases`` for each dtype under a ``threads`` limit; return the full report."""
    from threadpoolctl import threadpool_limits

    import miniresnet as mr

    for name, value in (("repeats", repeats), ("threads", threads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"run: {name} must be an int >= 1, got {value!r}")
    if not dtypes or set(dtypes) - set(TOLERANCE):
        raise ValueError(f"run: dtypes must be among {sorted(TOLERANCE)}, got {list(dtypes)}")
    if "ours" not in libs or set(libs) - set(LIBS):
        raise ValueError(f"run: libs must include 'ours' and be among {LIBS}, got {list(libs)}")
    modules, missing = import_libs(libs, threads)
    for msg in missing.values():
        echo(f"skipped: {msg}")
    with threadpool_limits(limits=threads), mr.use_backend("numpy"):
        w0, t0 = thread_waits(), time.perf_counter()
        gemm = {dt: gemm_rate(dt) for dt in dtypes}
        gemm_contended = contended(time.perf_counter() - t0, waited(w0, thread_waits()))
        env = {**environment(gemm, threads), "gemm_contended": gemm_contended}
        report: dict[str, Any] = {"environment": env, "skipped": missing, "results": []}
        echo(header(report))
        for case in cases:
            for dt in dtypes:
                echo(f"running {case.name} [{dt}] ...")
                rec = run_case(case, dt, modules, repeats, gemm)
                report["results"].append(rec)
    verdicts = [v for r in report["results"] if "contention" in r
                for v in r["contention"]["contended"].values()]
    # True: some timing was contended; None: contention could not be measured here
    report["contended"] = True if True in verdicts else None if None in verdicts else False
    return report


# -- output ---------------------------------------------------------------------------------------
def header(report: dict[str, Any]) -> str:
    env = report["environment"]
    blas = "; ".join(f"{b['internal_api']} {b['version']} {b['architecture']} "
                     f"threads={b['num_threads']}" for b in env["blas"])
    gemm = ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in env["gemm_gflops"].items())
    return (f"miniresnet bench | {env['platform']} | {env['cpu_count']} CPUs | numpy "
            f"{env['numpy']} | threads {env['threads']} | OPENBLAS_CORETYPE="
            f"{env['OPENBLAS_CORETYPE']} | load average {env['load_average_at_start']}\n"
            f"BLAS: {blas}\nGEMM (2048² matmul): {gemm}"
            + (" (contended: unreliable)" if env.get("gemm_contended") else ""))


def table(report: dict[str, Any]) -> str:
    """The results as a plain-text table (one row per case and dtype)."""
    cols = ["case", "dtype", "check (max rel err)", "ours ms", "torch ms", "autograd ms",
            "ours/torch", "ours/autograd", "GFLOP/s ours|torch|autograd (% GEMM)"]
    rows = []
    for r in report["results"]:
        errs = ", ".join(f"{k} {v:.1e}" for k, v in r["check"]["max_rel_error"].items())
        status = r["status"] if r["status"] != "ok" else "ok"
        row = [r["case"], r["dtype"], f"{status} ({errs or 'ours only'})"]
        if r["status"] != "ok":
            rows.append(row + ["—"] * 6)
            continue
        med, verdict = r["median_s"], r["contention"]["contended"]
        row += [f"{med[lib] * 1e3:.1f}{'?' * bool(verdict[lib])}" if lib in med else "skipped"
                for lib in LIBS]
        row += [f"{r['ratios'][k]:.2f}{'?' * (r['ratio_reliable'][k] is False)}"
                if k in r["ratios"] else "—" for k in ("ours/torch", "ours/autograd")]
        row.append(" | ".join(
            f"{r['gflops'][lib]:.2f} ({100 * r['fraction_of_gemm'][lib]:.1f}%)"
            if lib in med else "—" for lib in LIBS))
        rows.append(row)
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c)
              for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    lines += contention_notes(report)
    for r in report["results"]:
        if "memory" in r:
            lines.append(f"\nmemory, {r['case']} [{r['dtype']}] ({r['memory_method']}):")
            for m in r["memory"]:
                vals = ", ".join(f"{k[:-8]} {v:.1f} MB" for k, v in m.items()
                                 if k.endswith("_peak_MB"))
                lines.append(f"  n={m['n']:>4} ({m['layers']} layers): {vals}")
            g = r["graph_release"]
            lines.append(f"  graph released after backward: {g['activation_freed']} (held with "
                         f"loss alive {g['held_after_backward_MB']:.2f} MB; gradients "
                         f"{g['gradient_MB']:.2f} MB)")
    return "\n".join(lines)


def contention_notes(report: dict[str, Any]) -> list[str]:
    """The lines under the table that say whether its times were measured on a contended
    machine."""
    timed = [r["contention"] for r in report["results"] if "contention" in r]
    waits = [w for c in timed for lib, w in c["wait_per_wall"].items() if c["contended"][lib]]
    if waits:
        return [f"? contended: threads of this process waited for a CPU up to {max(waits):.2f} s "
                f"per second (limit {WAIT_LIMIT}) while timing the marked libraries: other "
                f"processes were running or more threads were busy than there are cores.",
                "  Those times and the ratios built on them are UNRELIABLE; rerun on an idle "
                "machine (or with fewer --threads)."]
    if any(None in c["contended"].values() for c in timed):
        return ["contention not measured (no /proc/self/task/*/schedstat here): the times "
                "assume an otherwise idle machine."]
    return []


def write_json(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``report`` to ``path`` atomically (a temporary file, then ``os.replace``)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".bench-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(report, fh, indent=1, default=float)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _names(valid: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a non-empty comma-separated list of names among ``valid``."""
    def parse(text: str) -> list[str]:
        names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
        bad = [n for n in names if n not in valid]
        if bad or not names:
            what = f"unknown {', '.join(map(repr, bad))}" if bad else "empty list"
            raise argparse.ArgumentTypeError(f"{what} (choose from {', '.join(valid)})")
        return names
    return parse


def _json_target(text: str) -> str:
    """An argparse type: a file path whose folder exists and takes a new file (tried now, so
    that a long run does not end unable to save)."""
    if not text or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder or empty; name a file")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder {folder!r} of {text!r} is not an "
                                         f"existing folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"cannot create a file in the folder {folder!r} ({exc.strerror})") from None
    return text


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command line: see ``python -m miniresnet.bench --help``. Ctrl-C stops it with exit
    status 130 after one line (the report is written only at the end)."""
    prog = "python -m miniresnet.bench"
    p = argparse.ArgumentParser(
        prog=prog, description="Time miniresnet side by side with PyTorch and HIPS autograd, "
        "in one process, after checking that every library computes the same numbers.",
        epilog="Times and ratios marked '?' were measured while this process's threads waited "
               "for a CPU (a contended machine) and are unreliable. Ctrl-C stops it (exit "
               "status 130); nothing is written.")
    p.add_argument("--cases", type=_names(GROUPS), default=",".join(GROUPS),
                   help=f"comma-separated case groups among {', '.join(GROUPS)} "
                        f"(default: %(default)s)")
    p.add_argument("--repeats", type=whole_number(1), default=None,
                   help="timed calls per library, at least 5 unless --quick (default: 5, or 2 "
                        "with --quick)")
    p.add_argument("--dtypes", type=_names(tuple(TOLERANCE)), default=",".join(TOLERANCE),
                   help=f"comma-separated, among {', '.join(TOLERANCE)} (default: "
                        f"%(default)s)")
    p.add_argument("--libs", type=_names(LIBS), default=",".join(LIBS),
                   help=f"comma-separated, among {', '.join(LIBS)}; must include ours "
                        f"(default: %(default)s)")
    p.add_argument("--threads", type=whole_number(1), default=THREADS,
                   help="threads of every library (BLAS pools, PyTorch) (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", type=_json_target, default=None,
                   help="save the full report here as JSON (its folder must exist)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats (for tests)")
    a = p.parse_args(argv)
    repeats = a.repeats if a.repeats is not None else (2 if a.quick else 5)
    if repeats < 5 and not a.quick:
        p.error(f"argument --repeats: must be at least 5 without --quick, got {repeats}")
    if "ours" not in a.libs:
        p.error(f"argument --libs: must include ours, got {','.join(a.libs)}")
    cases = [c for c in build_cases(a.quick) if c.group in a.cases]
    try:
        report = run(cases, a.dtypes, repeats, a.libs, threads=a.threads)
        report["repeats"] = repeats
        print(table(report))
        if a.json:
            write_json(report, a.json)
            print(f"saved {a.json}")
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C)" + ("; no report saved" if a.json else ""),
              file=sys.stderr)
        raise SystemExit(130) from None
    return report


if __name__ == "__main__":
    main()
