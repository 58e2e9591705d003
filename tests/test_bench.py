"""The benchmark harness (``python -m miniresnet.bench``) on tiny cases: it runs, it reports
missing libraries as skipped, its cross-library check catches different work, and it writes
JSON."""

import json
import sys

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
               "--repeats", "2", "--json", str(path)])
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
    assert not list(tmp_path.glob(".bench-*")), "temporary file left behind"


def test_missing_torch_is_skipped_with_message(monkeypatch):
    pytest.importorskip("autograd")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    messages = []
    report = bench.run([_tiny_step()], ["float64"], repeats=1, echo=messages.append)
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
