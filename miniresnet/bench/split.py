"""Where our time goes: one call's wall time split into the time spent inside the forward
implementations of each kind of primitive and the rest, the engine.

For the length of :func:`time_split`, every registered primitive's ``impl`` is wrapped with a
``perf_counter`` timer (the originals are restored in a ``finally``). A primitive whose
``impl`` runs inside another's is counted in the outer one only. The engine's part is the wall
time left over: tracing, the tape and the reverse pass, argument checks, Python between ops,
and the timers' own cost (``timer_overhead_s`` estimates it). These calls are made apart from
the timed ones, so the timed medians never carry the timers.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from miniresnet import normalization, primitives
from miniresnet.bench.measure import Fn

# the primitive tables whose impls are timed
REGISTRIES: tuple[dict[str, Any], ...] = (primitives.PRIMITIVES, normalization.PRIMITIVES)

# what each primitive counts as; a name missing here counts as "other" (a test checks that every
# registered primitive is listed, so that a new one is classified deliberately)
KINDS: dict[str, str] = {
    **dict.fromkeys(("conv", "conv_transpose", "conv_weight_grad", "im2col", "col2im"), "conv"),
    **dict.fromkeys(("standardize", "inv_std", "standardize_affine", "standardize_affine_grad"),
                    "bn"),
    **dict.fromkeys(("add", "sub", "mul", "div", "neg", "pow", "exp", "log", "sqrt", "tanh",
                     "sigmoid", "relu", "where", "astype"), "elementwise"),
    # reductions, shape and indexing, linear algebra
    **dict.fromkeys(("sum", "max", "logsumexp", "reshape", "transpose", "broadcast_to",
                     "getitem", "untake", "pad", "concat", "matmul", "tensordot"), "other"),
}
PARTS: tuple[str, ...] = ("conv", "bn", "elementwise", "other", "engine")


def kind_of(name: str) -> str:
    """The part of the split that primitive ``name`` counts in."""
    return KINDS.get(name, "other")


def registered() -> dict[str, Any]:
    """Every primitive in :data:`REGISTRIES`, by name."""
    return {name: p for reg in REGISTRIES for name, p in reg.items()}


def _timer(impl: Any, kind: str, totals: dict[str, float], calls: list[int],
           depth: list[int]) -> Any:
    """``impl`` adding its wall time to ``totals[kind]`` and counting itself in ``calls[0]``,
    unless it runs inside another timed impl (``depth``, shared by all timers of one split)."""
    clock = time.perf_counter

    def timed(*args: Any, **kwargs: Any) -> Any:
        if depth[0]:
            return impl(*args, **kwargs)
        depth[0] = 1
        t0 = clock()
        try:
            return impl(*args, **kwargs)
        finally:
            totals[kind] += clock() - t0
            calls[0] += 1
            depth[0] = 0

    return timed


@contextmanager
def timed_impls(totals: dict[str, float], calls: list[int]) -> Iterator[None]:
    """Within the block, each registered primitive's ``impl`` adds its wall time to
    ``totals[kind]`` (see :func:`kind_of`; the outermost impl only) and counts itself in
    ``calls[0]``; the original impls are restored after it, whatever happens."""
    prims = registered()
    originals = {name: p.impl for name, p in prims.items()}
    depth = [0]
    try:
        for name, p in prims.items():
            p.impl = _timer(originals[name], kind_of(name), totals, calls, depth)
        yield
    finally:
        for name, p in prims.items():
            p.impl = originals[name]


def _timer_cost(samples: int = 2000) -> float:
    """Seconds one timer adds to a call outside the time it measures (best of 3)."""
    def impl() -> None:
        return None

    timed = _timer(impl, "other", {"other": 0.0}, [0], [0])

    def loop(f: Any) -> float:
        t0 = time.perf_counter()
        for _ in range(samples):
            f()
        return time.perf_counter() - t0

    return max(min(loop(timed) - loop(impl) for _ in range(3)), 0.0) / samples


def time_split(fn: Fn, calls: int = 3) -> dict[str, Any]:
    """Wall time of ``calls`` calls of ``fn`` split into :data:`PARTS`; the call with the median
    wall time is reported (its parts sum to its wall time).

    Returns
    -------
    dict
        ``wall_s``, ``parts_s`` (``{part: seconds}``), ``fractions``, ``primitive_calls``
        (impl calls in that call) and ``timer_overhead_s`` (an estimate of what the timers added
        to it, included in the engine's part).
    """
    if not isinstance(calls, int) or calls < 1:
        raise ValueError(f"time_split: calls must be an int >= 1, got {calls!r}")
    records = []
    for _ in range(calls):
        totals = dict.fromkeys(PARTS[:-1], 0.0)
        count = [0]
        gc.collect()
        with timed_impls(totals, count):
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
        records.append((wall, totals, count[0]))
    walls = [r[0] for r in records]
    wall, totals, count = records[walls.index(statistics.median_low(walls))]
    parts = {**totals, "engine": wall - sum(totals.values())}
    return {"wall_s": wall, "parts_s": parts,
            "fractions": {k: v / wall for k, v in parts.items()},
            "primitive_calls": count, "timer_overhead_s": count * _timer_cost()}
