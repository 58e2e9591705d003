"""Where our time goes (``miniresnet.bench.split``): every primitive is classified on purpose,
the parts add up to the wall time, a nested impl is counted once, and the primitives' impls are
restored afterwards, whatever happens."""

import numpy as np
import pytest

import miniresnet as mr
from miniresnet import bench
from miniresnet.bench import ours, split


@pytest.fixture(autouse=True)
def numpy_only(backend):
    """The harness times the NumPy backend; run its tests once, under that backend."""
    if backend.name != "numpy":
        pytest.skip("the benchmark harness runs on the numpy backend only")


def _impls():
    return {name: p.impl for name, p in split.registered().items()}


def test_every_registered_primitive_is_classified_deliberately():
    names = set(split.registered())
    assert {"conv", "standardize_affine", "add", "matmul"} <= names  # the registries are read
    unlisted = sorted(names - set(split.KINDS))
    assert not unlisted, f"add these primitives to bench.split.KINDS: {unlisted}"
    assert set(split.KINDS.values()) <= set(split.PARTS) - {"engine"}
    assert split.kind_of("a primitive added later") == "other"


def test_split_of_a_training_step_sums_to_its_wall_time_and_restores_impls():
    before = _impls()
    case = bench.build_cases(quick=True)[0]
    with mr.use_backend("numpy"):
        model = case._model("float64")
        fn = ours.train_step(model, *case._data("float64"))
        fn()  # warm-up
        sp = split.time_split(fn, calls=3)
    assert _impls() == before and all(_impls()[k] is v for k, v in before.items())
    parts = sp["parts_s"]
    assert list(parts) == list(split.PARTS)
    assert sum(parts.values()) == pytest.approx(sp["wall_s"], rel=1e-12)
    assert sum(sp["fractions"].values()) == pytest.approx(1.0)
    assert all(v >= 0 for v in parts.values()), parts
    # a training step convolves and normalises: a wrapper that stopped being called (the
    # engine caching impls elsewhere, say) would leave these at zero
    assert parts["conv"] > 0 and parts["bn"] > 0 and parts["elementwise"] > 0
    assert sp["primitive_calls"] > 50
    assert 0 <= sp["timer_overhead_s"] < sp["wall_s"]


def test_impls_are_restored_when_the_call_fails():
    before = _impls()

    def boom():
        assert split.registered()["conv"].impl is not before["conv"]  # wrapped meanwhile
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        split.time_split(boom)
    assert all(_impls()[k] is v for k, v in before.items())


def test_an_impl_inside_another_is_counted_in_the_outer_one(monkeypatch):
    prims = split.registered()
    exp = prims["exp"]
    # reshape's impl, for this test, runs exp's impl (whatever it is at call time)
    monkeypatch.setattr(prims["reshape"], "impl", lambda xp, x, **kw: exp.impl(xp, x))
    totals, calls = dict.fromkeys(split.PARTS[:-1], 0.0), [0]
    with split.timed_impls(totals, calls):
        out = prims["reshape"].impl(np, np.zeros(3))
    np.testing.assert_array_equal(out, np.ones(3))
    assert calls == [1]
    assert totals["other"] > 0 and totals["elementwise"] == 0


def test_time_split_checks_calls():
    with pytest.raises(ValueError, match="time_split: calls must be an int >= 1, got 0"):
        split.time_split(lambda: None, calls=0)


def test_split_is_in_the_record_and_under_the_table():
    report = bench.run(bench.build_cases(quick=True)[:1], ["float64"], repeats=1,
                       libs=("ours",), echo=lambda _: None)
    (rec,) = report["results"]
    sp = rec["split"]
    assert sum(sp["parts_s"].values()) == pytest.approx(sp["wall_s"], rel=1e-12)
    text = bench.table(report)
    assert "where ours' time goes" in text
    line = next(ln for ln in text.splitlines() if ln.startswith(f"  {rec['case']} [float64]"))
    for part in split.PARTS:
        assert f"{part} " in line
