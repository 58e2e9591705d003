"""The JAX twin: the post-order CIFAR ResNet and its cases in ``jax.numpy`` and
``jax.lax.conv_general_dilated``, on the CPU with float64 enabled.

Two comparison libraries come from this module: ``"jax"`` calls ``jax.value_and_grad`` and
``jax.jacrev`` eagerly (op by op), ``"jax-jit"`` calls the same functions under ``jax.jit``
(:data:`JIT`). The jitted twin compiles in its setup, by one call whose wall time is kept as
the timed function's ``compile_s`` attribute: compile time is reported apart and never enters
the timed medians. Every timed call blocks until its results are ready.

XLA sizes its CPU thread pool once, when its CPU client is created, from the ``PJRT_NPROC``
environment variable, else from the CPUs the process may use (``sched_getaffinity``).
:func:`import_jax` sets ``PJRT_NPROC`` to the benchmark's thread count and creates the client
at once; a client created earlier in the process keeps its own pool, and :func:`xla_threads`
reports it as not matched. The ``jax`` module is imported only by :func:`import_jax`, so this
module imports without JAX installed.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from types import SimpleNamespace
from typing import Any

import numpy as np

from miniresnet import nn
from miniresnet.bench.measure import Fn

POOL_VARIABLE = "PJRT_NPROC"  # read by XLA when it creates its CPU client, before NPROC
_pool: dict[str, int] = {}  # the pool size this module gave XLA's CPU client, once it did


def _client_started(jax: Any) -> bool:
    """Whether ``jax`` has created its backends (then its CPU pool is sized for good)."""
    bridge = getattr(getattr(jax, "_src", None), "xla_bridge", None)
    started = getattr(bridge, "backends_are_initialized", None)
    return True if started is None else bool(started())


def import_jax(threads: int) -> Any:
    """Import ``jax`` with float64 enabled and, unless its CPU client already exists, that
    client's thread pool sized to ``threads`` (``PJRT_NPROC``); raises ImportError without
    JAX."""
    before = sys.modules.get("jax")
    started = before is not None and _client_started(before)
    saved = os.environ.get(POOL_VARIABLE)
    if not started:
        os.environ[POOL_VARIABLE] = str(threads)
    try:
        jax = importlib.import_module("jax")
    except ImportError:
        if saved is None:
            os.environ.pop(POOL_VARIABLE, None)
        else:
            os.environ[POOL_VARIABLE] = saved
        raise
    jax.config.update("jax_enable_x64", True)
    if not started:
        jax.devices("cpu")  # creates the client now, while PJRT_NPROC holds this count
        _pool["threads"] = threads
    return jax


def xla_threads(threads: int) -> dict[str, Any]:
    """How XLA's CPU pool compares with the benchmark's ``threads``, for the report."""
    if "threads" in _pool:
        pool = _pool["threads"]
        how = (f"{POOL_VARIABLE}={pool} set before XLA's CPU client was created (XLA would "
               f"otherwise use every CPU the process may use)")
    else:  # someone else started the client: XLA's own rule, read now as best we can
        env = next((os.environ[v] for v in (POOL_VARIABLE, "NPROC") if v in os.environ), None)
        affinity = getattr(os, "sched_getaffinity", None)  # Linux only
        cpus = len(affinity(0)) if affinity else os.cpu_count() or 1
        pool = int(env) if env and env.isdigit() else cpus
        how = ("XLA's CPU client was created before the benchmark imported JAX, so its pool "
               "could not be sized (restart the process)")
    return {"xla_pool_threads": pool, "matched": pool == threads, "method": how}


# -- the network ----------------------------------------------------------------------------------
def conv2d(jax: Any, x: Any, w: Any, stride: int, padding: int) -> Any:
    """Cross-correlation of NCHW ``x`` with OIHW ``w`` (what ``nn.Conv2d`` computes)."""
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(stride, stride), padding=((padding, padding),) * 2,
        dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=jax.lax.Precision.HIGHEST)


def batch_norm(jnp: Any, x: Any, w: Any, b: Any, eps: float, stats: tuple | None = None) -> Any:
    """Batch norm over (N, H, W): batch statistics (biased variance), or eval mode given
    ``stats = (running_mean, running_var)``."""
    def per_channel(v: Any) -> Any:
        return jnp.reshape(v, (1, -1, 1, 1))

    if stats is None:
        centred = x - jnp.mean(x, axis=(0, 2, 3), keepdims=True)
        var = jnp.mean(centred * centred, axis=(0, 2, 3), keepdims=True)
    else:
        centred, var = x - per_channel(stats[0]), per_channel(stats[1])
    return centred / jnp.sqrt(var + eps) * per_channel(w) + per_channel(b)


def residual_block(jax: Any, b: Any, p: dict, q: str, h: Any, bufs: dict | None = None) -> Any:
    """One post-order block ``b`` (parameters ``p``, names prefixed ``q``) applied to ``h``;
    with ``bufs``, eval-mode batch norm with those running statistics."""
    jnp = jax.numpy

    def norm(v: Any, name: str, m: Any) -> Any:
        stats = None if bufs is None else (bufs[name + "running_mean"],
                                           bufs[name + "running_var"])
        return batch_norm(jnp, v, p[name + "weight"], p[name + "bias"], m.eps, stats)

    def conv(v: Any, name: str, m: Any) -> Any:
        return conv2d(jax, v, p[name + "weight"], m.stride, m.padding)

    f = jax.nn.relu(norm(conv(h, q + "layers.0.", b.layers[0]), q + "norms.0.", b.norms[0]))
    f = norm(conv(f, q + "layers.1.", b.layers[1]), q + "norms.1.", b.norms[1])
    if isinstance(b.shortcut, nn.Sequential):
        s = norm(conv(h, q + "shortcut.0.", b.shortcut[0]), q + "shortcut.1.", b.shortcut[1])
    else:
        s = h
    return jax.nn.relu(f + s)


def network_loss(jax: Any, model: Any, p: dict, x: Any, onehot: Any) -> Any:
    """Mean softmax cross-entropy of the post-order ``model`` (BN in training mode)."""
    jnp = jax.numpy
    stem = model.stem
    h = conv2d(jax, x, p["stem.0.weight"], stem[0].stride, stem[0].padding)
    h = jax.nn.relu(batch_norm(jnp, h, p["stem.1.weight"], p["stem.1.bias"], stem[1].eps))
    for i, b in enumerate(model.blocks):
        h = residual_block(jax, b, p, f"blocks.{i}.", h)
    logits = jnp.mean(h, axis=(2, 3)) @ p["head.1.weight"].T + p["head.1.bias"]
    logp = jax.nn.log_softmax(logits, axis=1)
    return -jnp.mean(jnp.sum(onehot * logp, axis=1))


def _compiled(jax: Any, fn: Any, args: tuple, jit: bool) -> tuple[Any, float | None]:
    """``fn`` under ``jax.jit`` and its compile time (the first call on ``args``, blocked), or
    ``fn`` as is. Every array is an argument: a closed-over array would become a constant of
    the compiled program, which XLA may fold at compile time."""
    if not jit:
        return fn, None
    compiled = jax.jit(fn)
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return compiled, time.perf_counter() - t0


# -- the cases (see miniresnet.bench.ours) --------------------------------------------------------
def train_step(jax: Any, model: Any, weights: dict[str, np.ndarray], x: np.ndarray,
               y: np.ndarray, *, jit: bool = False) -> Fn:
    """Loss and gradients of :func:`network_loss` at ``weights`` by ``jax.value_and_grad``
    (under ``jax.jit`` if ``jit``); the call returns the loss and the gradients in
    ``model.named_parameters()`` order."""
    jnp = jax.numpy
    names = [k for k, _ in model.named_parameters()]
    plist = [jnp.asarray(weights[k]) for k in names]
    tx, onehot = jnp.asarray(x), jnp.asarray(np.eye(10, dtype=x.dtype)[y])

    def loss_fn(ps: list, inputs: Any, targets: Any) -> Any:
        return network_loss(jax, model, dict(zip(names, ps)), inputs, targets)

    args = (plist, tx, onehot)
    fn, compile_s = _compiled(jax, jax.value_and_grad(loss_fn), args, jit)

    def step() -> list:
        loss, grads = jax.block_until_ready(fn(*args))
        return [loss, *grads]

    step.compile_s = compile_s  # type: ignore[attr-defined]
    return step


def block_jacobian(jax: Any, block: Any, weights: dict[str, np.ndarray],
                   buffers: dict[str, np.ndarray], x: np.ndarray, *, jit: bool = False) -> Fn:
    """The Jacobian of the eval-mode ``block`` (``weights``, running statistics ``buffers``)
    with respect to its input, at ``x``, by ``jax.jacrev`` (under ``jax.jit`` if ``jit``)."""
    jnp = jax.numpy
    p = {k: jnp.asarray(v) for k, v in weights.items()}
    bufs = {k: jnp.asarray(v) for k, v in buffers.items()}
    args = (jnp.asarray(x), p, bufs)
    jac = jax.jacrev(lambda v, params, stats: residual_block(jax, block, params, "", v, stats))
    fn, compile_s = _compiled(jax, jac, args, jit)

    def jacobian() -> list:
        return [jax.block_until_ready(fn(*args))]

    jacobian.compile_s = compile_s  # type: ignore[attr-defined]
    return jacobian


def to_host(result: list) -> list[np.ndarray]:
    """The NumPy arrays of one call's result (outside the timed call)."""
    return [np.asarray(r) for r in result]


# "jax-jit": this module's functions under jax.jit (the library is the same ``jax`` module)
JIT = SimpleNamespace(
    train_step=lambda *a, **kw: train_step(*a, **kw, jit=True),
    block_jacobian=lambda *a, **kw: block_jacobian(*a, **kw, jit=True),
    to_host=to_host)
