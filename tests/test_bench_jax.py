"""JAX in the benchmark (``miniresnet.bench.jax_twin``): eager and jitted twins pass the same
check as the other libraries, the compile time is reported apart, XLA's CPU pool gets the
benchmark's thread count, and without JAX both libraries are skipped with a message."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

import miniresnet
from miniresnet import bench

HAS_JAX = importlib.util.find_spec("jax") is not None
needs_jax = pytest.mark.skipif(not HAS_JAX, reason="jax not installed")


@pytest.fixture(autouse=True)
def numpy_only(backend):
    """The harness times the NumPy backend; run its tests once, under that backend."""
    if backend.name != "numpy":
        pytest.skip("the benchmark harness runs on the numpy backend only")


@pytest.fixture
def keep_pool_variable(monkeypatch):
    """Whatever a test does to PJRT_NPROC is undone after it."""
    old = os.environ.get("PJRT_NPROC")
    if old is None:
        monkeypatch.delenv("PJRT_NPROC", raising=False)
    else:
        monkeypatch.setenv("PJRT_NPROC", old)


def test_jax_libraries_and_their_module():
    assert bench.LIBS == ("ours", "torch", "autograd", "jax", "jax-jit")
    assert bench.MODULES["jax-jit"] == "jax"


def test_missing_jax_skips_both_jax_libraries(monkeypatch, keep_pool_variable):
    monkeypatch.setitem(sys.modules, "jax", None)  # `import jax` now raises ImportError
    before = os.environ.get("PJRT_NPROC")
    modules, missing = bench.import_libs(("ours", "jax", "jax-jit"))
    assert os.environ.get("PJRT_NPROC") == before  # a failed import leaves it as it was
    assert set(modules) == {"ours"}
    assert set(missing) == {"jax", "jax-jit"}
    assert all(m.startswith("jax not installed") and "miniresnet[bench]" in m
               for m in missing.values())


@needs_jax
def test_jax_twins_pass_the_check_on_the_quick_cases(keep_pool_variable):
    cases = [c for c in bench.build_cases(quick=True) if c.group in ("resnet20", "jacobian")]
    report = bench.run(cases, ["float64", "float32"], repeats=1, libs=("ours", "jax", "jax-jit"),
                       echo=lambda _: None)
    assert not report["skipped"]
    assert len(report["results"]) == 4
    for rec in report["results"]:
        errors = rec["check"]["max_rel_error"]
        assert rec["status"] == "ok", rec["check"]
        assert set(errors) == {"jax", "jax-jit"}
        assert max(errors.values()) <= bench.TOLERANCE[rec["dtype"]]
        assert set(rec["ratios"]) == {"ours/jax", "ours/jax-jit"}
        assert set(rec["compile_s"]) == {"jax-jit"} and rec["compile_s"]["jax-jit"] > 0
    env = report["environment"]
    assert env["jax"] and env["jaxlib"] and "PJRT_NPROC" in env["jax_threads"]["method"]
    json.dumps(report, default=float)
    text = bench.table(report)
    assert "jax-jit compile time (its first call, in setup; not in the medians)" in text
    assert "ours/jax-jit" in text


@needs_jax
def test_jitted_twin_compiles_in_setup_and_takes_arrays_as_arguments(keep_pool_variable):
    jax = bench.jax_twin.import_jax(bench.THREADS)
    case = bench.build_cases(quick=True)[1]  # the block Jacobian
    fns = case.setup("float64", {"jax": jax, "jax-jit": jax})
    assert fns["jax"].compile_s is None and fns["jax-jit"].compile_s > 0
    # a second call reuses the compiled program (same shapes, dtypes and structure)
    (j1,), (j2,) = fns["jax-jit"](), fns["jax-jit"]()
    assert (j1 == j2).all() and j1.shape == 2 * case._shape()


def _child(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_jax
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to see a difference")
def test_xla_pool_gets_the_thread_count():
    # one thread: a large jitted matmul uses one CPU-second per second, not all the CPUs (a
    # contended machine can only lower the ratio, so the bound holds there too)
    got = _child(
        "import json, time\n"
        "from miniresnet.bench import jax_twin\n"
        "jax = jax_twin.import_jax(1)\n"
        "f = jax.jit(lambda a: a @ a)\n"
        "a = jax.numpy.ones((1024, 1024))\n"
        "f(a).block_until_ready()\n"
        "c, t = time.process_time(), time.perf_counter()\n"
        "for _ in range(10): f(a).block_until_ready()\n"
        "ratio = (time.process_time() - c) / (time.perf_counter() - t)\n"
        "print(json.dumps({**jax_twin.xla_threads(1), 'cpu_per_wall': ratio}))\n")
    assert got["matched"] and got["xla_pool_threads"] == 1
    assert got["cpu_per_wall"] < 1.4, got


@needs_jax
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to see a difference")
def test_a_client_started_before_is_reported_unmatched():
    got = _child(
        "import json, jax\n"
        "from miniresnet.bench import jax_twin, report\n"
        "jax.devices('cpu')\n"  # XLA's CPU client exists before the benchmark imports JAX
        "jax_twin.import_jax(1)\n"
        "threads = jax_twin.xla_threads(1)\n"
        "env = {'threads': 1, 'jax_threads': threads}\n"
        "print(json.dumps({**threads, 'notes': report.thread_notes({'environment': env})}))\n")
    assert not got["matched"] and got["xla_pool_threads"] >= 2
    (note,) = got["notes"]
    assert note.startswith("! jax and jax-jit ran with") and "not comparable" in note


def test_deep_case_leaves_jax_jit_out_with_its_reason():
    (deep,) = [c for c in bench.build_cases(quick=True) if c.group == "deep"]
    deep.memory_depths = (1,)
    # jax-jit is left out before any setup, so a stand-in module will do
    rec = bench.run_case(deep, "float64", {"ours": miniresnet, "jax-jit": object()}, 1,
                         {"float64": 1.0})
    assert rec["status"] == "ok" and rec["libs"] == ["ours"]
    assert "XLA" in rec["not_run"]["jax-jit"]
    text = bench.table({"results": [rec]})
    assert "not run" in text.splitlines()[2]
    assert f"not run: jax-jit on {deep.name}: " in text
