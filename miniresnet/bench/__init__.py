"""Side-by-side benchmarks of miniresnet against PyTorch, HIPS autograd and JAX.

Run ``python -m miniresnet.bench --help``. Every case runs in one process with the same inputs
and weights for every library, 2 threads each (threadpoolctl for BLAS, Numba's thread count for
our compiled kernels, ``torch.set_num_threads``, and ``PJRT_NPROC`` for XLA's CPU pool, set
before JAX creates its CPU client: see :mod:`.jax_twin`). JAX runs twice: ``jax`` eagerly and
``jax-jit`` compiled by ``jax.jit``, whose compile time (its first call) is measured in setup
and reported apart from the timed medians; the deep case leaves ``jax-jit`` out (XLA takes too
long to compile the unrolled network).

Before timing, each case checks that all libraries computed the same thing: loss and gradients,
or the Jacobian, agree within :data:`TOLERANCE` (``1e-10`` in float64, ``1e-2`` in float32) as
the relative L2 error of all outputs taken together (:func:`joint_rel_error`). A case whose
check fails is reported as ``FAILED CHECK`` with the errors found and is not timed, so no ratio
is ever reported for different work. (In float32 the 1,000-layer case can fail it: rounding
differences grow through the depth until the same computation, rounded differently, is as far
apart as different work would be.) A library that is not installed
(``pip install miniresnet[bench]``) is skipped with a message.

Times are the median of ``repeats`` calls after one warm-up call (the check's call is a second
one). Achieved GFLOP/s count the multiply-adds of the convolutions and linear maps only (2 per
multiply-add), with the conventions of each case's ``flops`` (a training step is 3× its forward
pass), and are shown as a fraction of this machine's GEMM rate, measured at start-up with a
large NumPy matmul under the same thread limit. Times taken while the machine was contended
are marked ``?`` (:mod:`.measure`).

Where our time goes: after the timed calls, separate calls of ours run with every primitive's
forward ``impl`` timed (:mod:`.split`), and the table is followed by one line per case and dtype
splitting the wall time into convolution, batch norm, elementwise and other primitives, and the
engine (the rest: tracing, tape, checks, Python).

Memory (the deep case) is the ``tracemalloc`` peak of one forward+backward above the memory
held before it. It sees every NumPy array buffer (so ours and autograd), but not PyTorch's or
XLA's allocators, so no PyTorch or JAX memory is reported.

Modules, bottom up: :mod:`.measure` (clocks, CPU contention, memory), :mod:`.split` (where our
time goes), :mod:`.ours` (our side of each case), one module per comparison library
(:mod:`.torch_twin`, :mod:`.autograd_twin`, :mod:`.jax_twin`), :mod:`.cases` (the cases, their
check and their FLOPs), :mod:`.runner` (check, then time), :mod:`.report` (table, JSON) and
:mod:`.cli`. New cases subclass :class:`Case` and are added to :func:`build_cases`. A new
comparison library is a ``<lib>_twin.py`` beside the others, with the same three functions
(``train_step``, ``block_jacobian``, ``to_host``), listed in
:data:`~miniresnet.bench.cases.TWINS`.
"""

from miniresnet.bench.cases import (
    GROUPS,
    LIBS,
    MODULES,
    TOLERANCE,
    TWINS,
    BlockJacobianCase,
    Case,
    DeepNetCase,
    TrainStepCase,
    build_cases,
    conv_net_flops,
    graph_release,
    joint_rel_error,
)
from miniresnet.bench.cli import main
from miniresnet.bench.measure import (
    WAIT_LIMIT,
    contended,
    contention_record,
    gemm_rate,
    thread_waits,
    time_fns,
    traced_peak,
    waited,
)
from miniresnet.bench.report import (
    compile_notes,
    contention_notes,
    header,
    split_lines,
    table,
    thread_notes,
    write_json,
)
from miniresnet.bench.runner import THREADS, environment, import_libs, run, run_case
from miniresnet.bench.split import KINDS, PARTS, kind_of, time_split, timed_impls

__all__ = [
    "GROUPS", "KINDS", "LIBS", "MODULES", "PARTS", "THREADS", "TOLERANCE", "TWINS", "WAIT_LIMIT",
    "BlockJacobianCase", "Case", "DeepNetCase", "TrainStepCase", "build_cases", "compile_notes",
    "contended", "contention_notes", "contention_record", "conv_net_flops", "environment",
    "gemm_rate", "graph_release", "header", "import_libs", "joint_rel_error", "kind_of", "main",
    "run", "run_case", "split_lines", "table", "thread_notes", "thread_waits", "time_fns",
    "time_split", "timed_impls", "traced_peak", "waited", "write_json",
]
