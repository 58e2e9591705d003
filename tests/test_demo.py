"""``python -m miniresnet.demo``: arguments checked before any work, results.json's schema,
resuming, failures recorded, --replot, Ctrl-C. Runs a fake experiment (this module) in place of
the real ones; the real ones are run end to end by ``.ci/run`` (``--quick``)."""

import json
import math
import sys

import numpy as np
import pytest

from miniresnet import demo, experiments
from miniresnet.experiments import claims, plots

pytestmark = pytest.mark.backends("numpy")

NAME, TITLE = "fake", "Does a fake experiment's norm exceed 1?"
SETUP = "A fake setup: random Gaussian matrices."
ESTIMATE = {"quick": 0.5, "default": 1, "full": 2}
FAIL: list = []  # configs that run_trial refuses (set by a test)
CALLS: list[dict] = []


def trials(scale, seed):
    n = {"quick": 3, "default": 4, "full": 5}[scale]
    return [{"width": 4, "rep": r} for r in range(n)] + [{"fail": f} for f in FAIL]


def run_trial(config, seed):
    CALLS.append(config)
    if "fail" in config:
        raise RuntimeError(f"refused {config['fail']}")
    a = np.random.default_rng(seed).standard_normal((config["width"],) * 2)
    return {"norm": np.linalg.norm(a), "curve": np.cumsum(a[0])}


def summarise(results, scale):
    m, s, n = claims.mean_and_spread([d["norm"] for _, d in results])
    return {"claims": [
        claims.claim("fake_norm", source="Fake et al. 2020", claim="the norm is about 4",
                     measured=m, spread=s, n=n, paper=4.0, rule={"op": "rel_err_le",
                                                                  "value": 0.5}),
        claims.claim("fake_big", source="Fake et al. 2020", claim="the norm exceeds 100",
                     measured=m, n=n, spread=s, rule={"op": "gt", "value": 100},
                     holds_at="full")],
        "data": {"curves": [d["curve"] for _, d in results]}}


def plot(data, out_dir):
    fig, axes = plots.figure()
    for c in data["curves"]:
        axes[0, 0].plot(c)
    return [plots.save(fig, out_dir, "fake_curves.png")]


@pytest.fixture(autouse=True)
def fake(monkeypatch):
    module = sys.modules[__name__]
    monkeypatch.setattr(experiments, "EXPERIMENTS", ("fake",))
    monkeypatch.setattr(experiments, "load", lambda name: module)
    CALLS.clear()
    FAIL.clear()
    return module


def _comparable(results):
    """results.json without timings and provenance (which may differ between runs)."""
    return {**{k: v for k, v in results.items() if k != "provenance"},
            "experiments": {n: {k: v for k, v in e.items() if k != "seconds"}
                            for n, e in results["experiments"].items()}}


def _read(out):
    return json.loads((out / "results.json").read_text())


def test_results_schema_and_report(tmp_path, capsys):
    out = tmp_path / "out"
    demo.main(["--quick", "--out", str(out), "--seed", "3"])
    results = _read(out)
    assert results["version"] == 1 and results["seed"] == 3 and results["scale"] == "quick"
    prov = results["provenance"]
    assert {"miniresnet", "git_commit", "numpy", "blas", "backend", "threads"} <= set(prov)
    assert prov["backend"] == "numpy" and prov["threads"] == 1
    exp = results["experiments"]["fake"]
    assert isinstance(exp["seconds"], float) and exp["failed"] == []
    assert exp["figures"] == ["fake_curves.png"] and (out / "fake_curves.png").stat().st_size
    assert len(exp["data"]["curves"]) == 3
    for c in exp["claims"]:
        assert set(c) == {"id", "source", "claim", "paper", "paper_status", "measured", "n",
                          "spread", "rule", "holds_at", "agrees"}
        assert c["paper_status"] in ("paper", "figure", "derived") and c["n"] == 3
        assert c["rule"]["op"] in ("rel_err_le", "abs_err_le", "lt", "gt", "between")
    norm, big = exp["claims"]
    assert norm["agrees"] is claims.satisfies(norm) and big["agrees"] is None  # holds at full
    report = (out / "REPORT.md").read_text()
    assert TITLE in report and SETUP in report and "![fake_curves.png](fake_curves.png)" in report
    assert f"{norm['measured']:.4g} ± {norm['spread']:.2g} (n = 3)" in report
    assert "not judged at the quick scale" in report
    printed = capsys.readouterr().out
    assert "fake_norm" in printed and "not judged" in printed
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".trials"]
    assert leftovers == []


def test_same_seed_same_results_and_cached(tmp_path):
    a = demo.main(["--quick", "--out", str(tmp_path / "a")])
    calls = len(CALLS)
    b = demo.main(["--quick", "--out", str(tmp_path / "b")])
    assert _comparable(a) == _comparable(b)
    again = demo.main(["--quick", "--out", str(tmp_path / "a")])
    assert len(CALLS) == 2 * calls and _comparable(again) == _comparable(a)  # all cached
    other = demo.main(["--quick", "--out", str(tmp_path / "c"), "--seed", "1"])
    assert other["experiments"]["fake"]["data"] != a["experiments"]["fake"]["data"]


def test_killed_after_n_trials_resumes_to_same_results(tmp_path):
    reference = demo.main(["--out", str(tmp_path / "ref")])
    CALLS.clear()

    class Killed(Exception):
        pass

    def kill(trial, record):
        if len(CALLS) == 2:
            raise Killed

    out = tmp_path / "run"
    with pytest.raises(Killed):
        demo.main(["--out", str(out)], after_trial=kill)
    assert not (out / "results.json").exists()
    first = list(CALLS)
    CALLS.clear()
    resumed = demo.main(["--out", str(out)])
    assert len(CALLS) == 2 and not any(c in CALLS for c in first)
    assert _comparable(resumed) == _comparable(reference) == _comparable(_read(out))


def test_failing_trial_recorded_not_fatal(tmp_path, capsys):
    FAIL.append("this one")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        demo.main(["--quick", "--out", str(out)])
    assert e.value.code == 1
    exp = _read(out)["experiments"]["fake"]
    assert exp["failed"] == [{"config": {"fail": "this one"}, "seed": exp["failed"][0]["seed"],
                              "error": {"type": "RuntimeError", "message": "refused this one"}}]
    assert exp["claims"][0]["n"] == 3  # the others were measured and summarised
    assert "RuntimeError: refused this one" in (out / "REPORT.md").read_text()
    assert "1 failed trial" in capsys.readouterr().err


def test_broken_summarise_recorded(tmp_path, monkeypatch, fake):
    monkeypatch.setattr(fake, "summarise", lambda results, scale: 1 / 0)
    with pytest.raises(SystemExit) as e:
        demo.main(["--quick", "--out", str(tmp_path)])
    assert e.value.code == 1
    assert _read(tmp_path)["experiments"]["fake"]["error"]["type"] == "ZeroDivisionError"
    assert "The experiment failed" in (tmp_path / "REPORT.md").read_text()


def test_replot_reproduces_report(tmp_path):
    demo.main(["--quick", "--out", str(tmp_path)])
    report = (tmp_path / "REPORT.md").read_text()
    before = _read(tmp_path)
    (tmp_path / "REPORT.md").unlink()
    (tmp_path / "fake_curves.png").unlink()
    calls = len(CALLS)
    demo.main(["--replot", "--out", str(tmp_path)])
    assert len(CALLS) == calls  # nothing measured
    assert (tmp_path / "REPORT.md").read_text() == report
    assert (tmp_path / "fake_curves.png").exists()
    assert _read(tmp_path) == before


def test_ctrl_c_one_line_exit_130_nothing_half_written(tmp_path, capsys):
    def interrupt(trial, record):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        demo.main(["--quick", "--out", str(tmp_path)], after_trial=interrupt)
    assert e.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted") and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".trials"]
    [cached] = (tmp_path / ".trials" / "fake").iterdir()  # the finished trial is kept
    assert cached.suffix == ".json" and json.loads(cached.read_text())["result"]


@pytest.mark.parametrize("argv", [
    ["--only", "nope"], ["--quick", "--full"], ["--seed", "-1"], ["--seed", "x"],
    ["--workers", "0"], ["--threads", "0"], ["--workers", "1", "--threads", "100000"],
    ["--backend", "nope"], ["--out", "{tmp}/missing/out"], ["--out", "{tmp}/file"],
    ["--replot"], ["--replot", "--quick"], ["--dask", "tcp://127.0.0.1:1", "--workers", "2"],
])
def test_bad_arguments_exit_2_before_any_work(argv, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2 and CALLS == []
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_dask_without_distributed_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(SystemExit) as e:
        demo.main(["--dask", "local", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and 'pip install "miniresnet[distributed]"' in capsys.readouterr().err


def test_help_and_list(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "python -m miniresnet.demo" in text and "default: results/" in text
    assert demo.main(["--list"]) is None
    listing = capsys.readouterr().out
    assert "fake" in listing and TITLE in listing and "0 s" in listing and "2 s" in listing


def test_report_numbers_come_from_results(tmp_path):
    """Every number REPORT.md shows for a claim is one of that claim's fields, formatted."""
    from miniresnet.experiments import report

    results = demo.main(["--quick", "--out", str(tmp_path)])
    for c in results["experiments"]["fake"]["claims"]:
        line = report.sentence(c, "quick")
        assert report.number(c["measured"]) in line and f"n = {c['n']}" in line
        if c["paper"] is not None:
            assert report.number(c["paper"]) in line
    assert report.number(math.nan) == "nan" and report.number(None) == "—"


@pytest.mark.backends("numpy")
def test_data_option_is_checked_and_reaches_the_training_experiments(tmp_path, capsys):
    """--data must be a loadable .npz (checked before any work); the experiments that train
    get it (its digest enters their configs), the others ignore it."""
    with pytest.raises(SystemExit) as stop:
        demo.main(["--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o")])
    assert stop.value.code == 2 and "--data" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    from miniresnet.data import load_digits

    digits = load_digits(dtype="float64")
    path = tmp_path / "mine.npz"
    np.savez(path, x=np.asarray(digits.x_train[:120]), y=np.asarray(digits.y_train[:120]))
    import importlib

    from miniresnet.experiments import runner

    degradation = importlib.import_module("miniresnet.experiments.degradation")
    with_data = runner.make_trials("degradation", degradation, "quick", 0, data=str(path))
    assert all("data_sha256" in t.config for t in with_data)
    assert all(t.config["train"]["data"] == str(path) for t in with_data)
    plain = runner.make_trials("degradation", degradation, "quick", 0)
    assert all("data_sha256" not in t.config for t in plain)
    other = importlib.import_module("miniresnet.experiments.shortcut_scaling")
    assert ([t.config for t in runner.make_trials("shortcut_scaling", other, "quick", 0,
                                                  data=str(path))]
            == [t.config for t in runner.make_trials("shortcut_scaling", other, "quick", 0)])
