"""The benchmark harness (``python -m miniresnet.bench``) on tiny cases: it runs, it reports
missing libraries as skipped, its cross-library check catches different work, it marks times
taken on a contended machine, it checks its command line before any work, and it writes
JSON. Stand-ins are patched into the module that looks the name up (``bench.cli``,
``bench.runner``, ``bench.measure``)."""

import gc
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from miniresnet import bench


@pytest.fixture(autouse=True)
def numpy_only(backend):
    """The harness times the NumPy backend; run its tests once, under that backend."""
    if backend.name != "numpy":
        pytest.skip("the benchmark harness runs on the numpy backend only")


def _tiny_step(**kw) -> bench.TrainStepCase:
    return bench.TrainStepCase("tiny step", "resnet20", n=1, batch=4, channels=1, size=8,
                               width=0.25, **kw)


def test_quick_cli_runs_and_writes_json(tmp_path, capsys):
    pytest.importorskip("autograd")
    path = tmp_path / "report.json"
    bench.main(["--quick", "--cases", "resnet20,jacobian", "--dtypes", "float64",
               "--repeats", "2", "--libs", "ours,torch,autograd", "--json", str(path)])
    out = capsys.readouterr().out
    assert "ours/torch" in out and "GEMM" in out
    saved = json.loads(path.read_text())
    assert saved["environment"]["gemm_gflops"]["float64"] > 0
    assert saved["environment"]["blas"], "threadpoolctl found no BLAS"
    assert [r["group"] for r in saved["results"]] == ["resnet20", "jacobian"]
    for rec in saved["results"]:
        assert rec["status"] == "ok", rec["check"]
        assert len(rec["times_s"]["ours"]) == 2
        for lib, med in rec["median_s"].items():
            assert med == pytest.approx(float(np.median(rec["times_s"][lib])))
        if "torch" in rec["median_s"]:
            assert rec["ratios"]["ours/torch"] == pytest.approx(
                rec["median_s"]["ours"] / rec["median_s"]["torch"])
        assert set(rec["contention"]["contended"]) == set(rec["median_s"])
        assert set(rec["ratio_reliable"]) == set(rec["ratios"])
    assert "contended" in saved and "gemm_contended" in saved["environment"]
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"], "temporary file left behind"


def test_missing_torch_is_skipped_with_message(monkeypatch):
    pytest.importorskip("autograd")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    messages = []
    report = bench.run([_tiny_step()], ["float64"], repeats=1, libs=("ours", "torch", "autograd"),
                       echo=messages.append)
    assert "torch" in report["skipped"]
    assert any(m.startswith("skipped: torch not installed") for m in messages)
    (rec,) = report["results"]
    assert rec["status"] == "ok" and "torch" not in rec["median_s"]
    assert set(rec["ratios"]) == {"ours/autograd"}
    assert "skipped" in bench.table(report)


@pytest.mark.parametrize("victim", ["autograd", "torch"])
def test_check_fails_on_different_work_and_reports_no_ratio(victim):
    pytest.importorskip(victim)

    def perturb(lib, weights):
        if lib == victim:
            weights["stem.0.weight"] = weights["stem.0.weight"] * (1 + 1e-6)
        return weights

    report = bench.run([_tiny_step(weight_hook=perturb)], ["float64"], repeats=1,
                       libs=("ours", victim), echo=lambda _: None)
    (rec,) = report["results"]
    assert rec["status"] == "FAILED CHECK"
    assert rec["check"]["max_rel_error"][victim] > bench.TOLERANCE["float64"]
    assert "ratios" not in rec and "median_s" not in rec
    assert "FAILED CHECK" in bench.table(report)


def test_joint_rel_error():
    ref = [np.array([1.0, -2.0]), np.array([[2.0]])]
    assert bench.joint_rel_error(ref, ref) == 0
    off = [ref[0] + np.array([3e-3, 0.0]), ref[1]]
    assert bench.joint_rel_error(off, ref) == pytest.approx(1e-3)  # ‖(3e-3, 0, 0)‖ / 3
    assert bench.joint_rel_error([np.zeros(3)], [np.zeros(3)]) == 0
    assert bench.joint_rel_error([np.ones(2)], [np.ones(3)]) == np.inf
    assert bench.joint_rel_error([np.array([np.nan])], [np.array([1.0])]) == np.inf


def test_deep_case_memory_and_graph_release():
    case = bench.DeepNetCase("deep", "deep", n=2, batch=2, memory_depths=(1, 3))
    extra = case.extra("float64", {})
    assert [row["n"] for row in extra["memory"]] == [1, 3]
    assert 0 < extra["memory"][0]["ours_peak_MB"] < extra["memory"][1]["ours_peak_MB"]
    assert extra["graph_release"]["activation_freed"]


def test_flop_count_of_one_conv_block():
    from miniresnet import nn

    block = nn.BasicBlock(4, 8, stride=2)  # two 3×3 convs and a 1×1 projection, 4×4 output
    expected = 2 * (8 * 16 * 4 * 9 + 8 * 16 * 8 * 9 + 8 * 16 * 4)
    assert bench.conv_net_flops(block, (1, 4, 8, 8)) == expected


def test_atomic_json_write(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    bench.write_json({"a": np.float64(1.5)}, path)
    assert json.loads(path.read_text()) == {"a": 1.5}
    with pytest.raises(TypeError):
        bench.write_json({"a": object()}, path)
    assert json.loads(path.read_text()) == {"a": 1.5}  # untouched by the failed write
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# -- contention ------------------------------------------------------------------------------------
def test_contended_verdict_on_measured_numbers():
    limit = bench.WAIT_LIMIT
    assert bench.contended(1.0, 0.5) is True  # threads waited half the time for a CPU
    assert bench.contended(2.0, 1.5) is True  # 2 threads, each descheduled 3/8 of the time
    assert bench.contended(1.0, 0.01) is False  # wake-up latencies of an idle machine
    assert bench.contended(0.5, 0.0) is False
    assert bench.contended(1.0, limit) is False and bench.contended(1.0, 1.01 * limit) is True
    assert bench.contended(3.0, 2.0 * limit) is False  # the limit is per second of wall time
    assert bench.contended(1.0, 0.5, limit=0.6) is False
    assert bench.contended(1.0, None) is None  # not measurable on this platform


def test_waited_sums_per_thread_deltas():
    before = {"10": 1_000, "11": 5_000, "12": 7_000}
    after = {"10": 2_001_000, "11": 5_000, "13": 500_000_000}  # 12 ended, 13 started
    assert bench.waited(before, after) == pytest.approx(0.002 + 0.5)
    assert bench.waited(None, after) is None and bench.waited(before, None) is None


class _SleepCase(bench.Case):
    """Every library sleeps ``seconds`` (or runs ``work``) and returns the same output."""

    def __init__(self, seconds=0.002, work=None):
        super().__init__("sleep", "sleep")
        self.work = work or (lambda: time.sleep(seconds))

    def setup(self, dtype, libs):
        def fn():
            self.work()
            return [np.zeros(1)]
        return {lib: fn for lib in libs}

    def flops(self):
        return 1.0


def _fake_waits(step_ns):
    """A thread_waits whose threads wait ``step_ns`` more between any two samples."""
    count = itertools.count()
    return lambda: {"1": next(count) * step_ns}


def _run_sleep_case(repeats=3, **kw):
    libs = {"ours": None, "autograd": None}
    rec = bench.run_case(_SleepCase(**kw), "float64", libs, repeats, {"float64": 1.0})
    return rec, bench.table({"results": [rec]})


@pytest.mark.parametrize("step_ns, verdict", [(10**8, True), (20_000, False), (None, None)])
def test_contention_is_recorded_and_marked(monkeypatch, step_ns, verdict):
    # each 2 ms call meets 100 ms of waiting (contended), 0.02 ms (idle) or no measurement
    monkeypatch.setattr(bench.measure, "thread_waits",
                        (lambda: None) if step_ns is None else _fake_waits(step_ns))
    rec, text = _run_sleep_case()
    c = rec["contention"]
    assert c["contended"] == {"ours": verdict, "autograd": verdict}
    assert rec["ratio_reliable"] == {"ours/autograd": None if verdict is None else not verdict}
    json.dumps(rec)  # the verdicts go into the JSON report
    if verdict is None:
        assert c["wait_per_wall"] == {"ours": None, "autograd": None}
    else:
        for lib, t in rec["times_s"].items():
            assert c["wait_per_wall"][lib] == pytest.approx(3 * step_ns / 1e9 / sum(t))
    assert set(c["cpu_per_wall"]) == {"ours", "autograd"}
    row = next(line for line in text.splitlines() if line.startswith("sleep"))
    assert ("?" in row) is bool(verdict)
    assert ("UNRELIABLE" in text) is bool(verdict)
    assert ("contention not measured" in text) is (verdict is None)


def _busy(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_real_busy_competitors_are_detected():
    if not (sys.platform.startswith("linux") and os.path.exists("/proc/self/task")):
        pytest.skip("needs Linux schedstat and CPU affinity")
    # Pin this thread and three busy-looping processes to one CPU, whatever the core count: the
    # scheduler then gives each about a quarter of it, and our thread waits ~3/4 of the time.
    cpu = min(os.sched_getaffinity(0))
    saved = os.sched_getaffinity(0)
    spin = f"import os; os.sched_setaffinity(0, {{{cpu}}}); print(flush=True)\nwhile True: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE)
             for _ in range(3)]
    try:
        for p in procs:  # every competitor is pinned and running
            assert p.stdout.readline() == b"\n"
        os.sched_setaffinity(0, {cpu})
        gc.freeze()  # the harness's gc.collect() need not walk the test session's heap
        rec, text = _run_sleep_case(repeats=20, work=lambda: _busy(0.01))
    finally:
        gc.unfreeze()
        os.sched_setaffinity(0, saved)
        for p in procs:
            p.kill()
            p.wait()
    assert rec["contention"]["contended"] == {"ours": True, "autograd": True}, rec["contention"]
    assert rec["ratio_reliable"] == {"ours/autograd": False}
    assert "?" in text and "UNRELIABLE" in text


# -- the command line ------------------------------------------------------------------------------
def test_case_groups():
    for quick in (False, True):
        assert sorted({c.group for c in bench.build_cases(quick)}) == sorted(bench.GROUPS)


def test_small_batch_resnet20_case_is_in_the_default_set():
    (small,) = [c for c in bench.build_cases() if c.name == "resnet20 b8x1x8x8"]
    assert small.group == "resnet20" and isinstance(small, bench.TrainStepCase)
    assert (small.n, small.batch, small.channels, small.size, small.width) == (3, 8, 1, 8, 1.0)


def _no_work(*args, **kwargs):
    raise AssertionError("work started before the arguments were checked")


@pytest.mark.parametrize("argv, words", [
    (["--threads", "0"], ["--threads", "at least 1", "0"]),
    (["--threads", "-2"], ["--threads", "-2"]),
    (["--threads", "two"], ["--threads", "'two'"]),
    (["--quick", "--repeats", "0"], ["--repeats", "at least 1", "0"]),
    (["--repeats", "3"], ["--repeats", "at least 5", "--quick", "3"]),
    (["--cases", "resnet20,bogus"], ["--cases", "'bogus'", "resnet20, jacobian, deep"]),
    (["--cases", " , "], ["--cases", "empty"]),
    (["--dtypes", "float16"], ["--dtypes", "'float16'", "float64, float32"]),
    (["--libs", "torch"], ["--libs", "must include ours", "torch"]),
    (["--libs", "ours,mxnet"], ["--libs", "'mxnet'", "ours, torch, autograd, jax, jax-jit"]),
    (["--json", "{tmp}/missing/r.json"], ["--json", "{tmp}/missing", "is not an existing folder"]),
    (["--json", "{tmp}/file/r.json"], ["--json", "{tmp}/file'", "is not an existing folder"]),
    (["--json", "{tmp}"], ["--json", "{tmp}", "folder"]),
])
def test_cli_rejects_bad_arguments_before_any_work(monkeypatch, capsys, tmp_path, argv, words):
    monkeypatch.setattr(bench.cli, "run", _no_work)
    monkeypatch.setattr(bench.cli, "build_cases", _no_work)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exc:
        bench.main([a.format(tmp=tmp_path) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m miniresnet.bench" in err
    for word in words:
        assert word.format(tmp=tmp_path) in err, err


def test_cli_rejects_an_unwritable_json_folder(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench.cli, "run", _no_work)
    if os.geteuid() == 0:  # root writes through permissions; /proc/self takes no new file
        folder = "/proc/self"
        if not os.path.isdir(folder):
            pytest.skip("no folder here that root cannot write in")
    else:
        folder = str(tmp_path / "ro")
        os.mkdir(folder, 0o555)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--json", os.path.join(folder, "r.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --json" in err and f"cannot create a file in the folder '{folder}'" in err


def test_help_shows_program_defaults_and_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m miniresnet.bench ")
    flat = " ".join(out.split())
    for text in ("among resnet20, jacobian, deep (default: resnet20,jacobian,deep)",
                 "among float64, float32 (default: float64,float32)",
                 "must include ours (default: ours,torch,autograd,jax,jax-jit)",
                 f"(default: {bench.THREADS})", "(default: 5, or 2 with --quick)", "'?'", "130"):
        assert text in flat, text
    # JAX and how it gets the thread count (compared without spaces: argparse may wrap a line
    # at the hyphen of jax-jit)
    bare = "".join(out.split())
    for text in ("among ours, torch, autograd, jax, jax-jit", "JAX (eager, and jax-jit",
                 "JAX gets --threads through PJRT_NPROC, set before XLA creates its CPU client",
                 "XLA's CPU pool"):
        assert "".join(text.split()) in bare, text
    for markup in ("``", ":data:", ":func:", ":class:", "%("):
        assert markup not in out


def test_ctrl_c_prints_one_line_and_exits_130(monkeypatch, capsys, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.cli, "run", interrupted)
    try:
        bench.main(["--quick", "--json", str(tmp_path / "r.json")])
    except KeyboardInterrupt:  # caught here: it would stop pytest itself
        pytest.fail("Ctrl-C escaped main (a traceback instead of one line)")
    except SystemExit as exc:
        assert exc.code == 130
    else:
        pytest.fail("main returned after Ctrl-C")
    captured = capsys.readouterr()
    assert captured.err == "python -m miniresnet.bench: interrupted (Ctrl-C); no report saved\n"
    assert list(tmp_path.iterdir()) == []


def _default_sigint():
    """In the child before exec: Ctrl-C's default disposition, so that Python installs its
    handler even when this test runs where SIGINT is ignored (a background job)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_real_sigint_exits_130(tmp_path):
    # the child signals it is inside the run (its start-up GEMM timing), then waits to be stopped
    child = ("import sys, time\nfrom miniresnet import bench\n"
             "def slow(dtype):\n    print('timing', flush=True)\n    time.sleep(60)\n"
             "bench.runner.gemm_rate = slow\n"
             "bench.main(['--quick', '--libs', 'ours', '--json', sys.argv[1]])\n")
    proc = subprocess.Popen([sys.executable, "-c", child, str(tmp_path / "r.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    try:
        assert proc.stdout.readline() == "timing\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err == "python -m miniresnet.bench: interrupted (Ctrl-C); no report saved\n"
    assert list(tmp_path.iterdir()) == []


def test_run_limits_our_compiled_kernels_to_the_thread_count():
    numba = pytest.importorskip("numba")
    before = numba.get_num_threads()
    seen = []
    case = _SleepCase(work=lambda: seen.append(numba.get_num_threads()))
    report = bench.run([case], ["float64"], repeats=1, libs=("ours",), threads=1,
                       echo=lambda _: None)
    assert set(seen) == {1}
    assert report["environment"]["compiled_kernel_threads"] == 1
    assert numba.get_num_threads() == before  # restored after the run


def test_run_checks_its_arguments_before_any_work(monkeypatch):
    monkeypatch.setattr(bench.runner, "import_libs", _no_work)
    cases = [_tiny_step()]
    for kwargs, words in [({"repeats": 0}, "repeats must be an int >= 1, got 0"),
                          ({"threads": 0}, "threads must be an int >= 1, got 0"),
                          ({"threads": 1.5}, "threads must be an int >= 1, got 1.5"),
                          ({"dtypes": ["float16"]}, "dtypes must be among"),
                          ({"libs": ("torch",)}, "libs must include 'ours'")]:
        args = {"dtypes": ["float64"], "repeats": 1, **kwargs}
        with pytest.raises(ValueError, match=re.escape(f"run: {words}")):
            bench.run(cases, **args)
