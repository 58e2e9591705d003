"""The demo's runner: seeds from configs, a per-trial cache, failures as data, and the same
numbers in-process, in a process pool and on a dask LocalCluster.

This module is itself the fake experiment the tests run (``trials``, ``run_trial``, ...), so
worker processes can import it by name.
"""

import json

import numpy as np
import pytest

from miniresnet.experiments import claims, runner

pytestmark = pytest.mark.backends("numpy")

NAME, TITLE, SETUP = "fake", "Does the fake experiment run?", "A fake setup."
ESTIMATE = {"quick": 0.1, "default": 0.2, "full": 0.3}
CALLS: list[dict] = []  # run_trial's calls in this process


def trials(scale, seed):
    return [{"width": w, "kind": k} for w in (4, 8) for k in ("a", "b")] + [{"fail": "boom"}]


def run_trial(config, seed):
    from threadpoolctl import threadpool_info

    CALLS.append(config)
    if "fail" in config:
        raise ValueError(f"trial asked to fail: {config['fail']}")
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((config["width"], config["width"]))
    return {"norm": np.linalg.norm(a @ a.T), "row": a[0], "seed": seed,
            "blas_threads": max([d["num_threads"] for d in threadpool_info()] or [1])}


def summarise(results, scale):
    m, s, n = claims.mean_and_spread([d["norm"] for _, d in results])
    return {"claims": [claims.claim("fake_norm", source="Nobody 2024", claim="a norm",
                                    measured=m, spread=s, n=n, rule={"op": "gt", "value": 0})],
            "data": {"norms": [d["norm"] for _, d in results]}}


def plot(data, out_dir):
    return []


@pytest.fixture
def module():
    import sys

    CALLS.clear()
    return sys.modules[__name__]


def test_trial_seed_from_config_not_hash(module):
    a = runner.trial_seed(0, "fake", {"width": 4, "kind": "a"})
    assert a == runner.trial_seed(0, "fake", {"kind": "a", "width": 4})  # key order irrelevant
    others = {runner.trial_seed(1, "fake", {"width": 4, "kind": "a"}),
              runner.trial_seed(0, "other", {"width": 4, "kind": "a"}),
              runner.trial_seed(0, "fake", {"width": 8, "kind": "a"})}
    assert a not in others and len(others) == 3 and 0 <= a < 2**32
    ts = runner.make_trials("fake", module, "quick", 0)
    assert [t.config for t in ts] == trials("quick", 0)
    assert len({t.seed for t in ts}) == len(ts)


def test_trial_key_changes_with_seed_scale_version(module):
    t = runner.make_trials("fake", module, "quick", 0)[0]
    key = runner.trial_key(t, "v1")
    assert len({key, runner.trial_key(t, "v2"),
                runner.trial_key(runner.Trial("fake", t.config, t.seed + 1, "quick"), "v1"),
                runner.trial_key(runner.Trial("fake", t.config, t.seed, "full"), "v1")}) == 4


def test_make_trials_rejects_duplicate_and_non_json_configs(monkeypatch, module):
    monkeypatch.setattr(module, "trials", lambda scale, seed: [{"a": 1}, {"a": 1}])
    with pytest.raises(ValueError, match="twice"):
        runner.make_trials("fake", module, "quick", 0)
    monkeypatch.setattr(module, "trials", lambda scale, seed: [{"a": object()}])
    with pytest.raises(TypeError, match="JSON"):
        runner.make_trials("fake", module, "quick", 0)


def test_to_json_converts_numpy():
    out = runner.to_json({"a": np.arange(3.0), "b": np.float64(1.5), "c": (np.int64(2),),
                          1: [np.bool_(True)]})
    assert out == {"a": [0.0, 1.0, 2.0], "b": 1.5, "c": [2], "1": [True]}
    assert type(out["b"]) is float and type(out["c"][0]) is int
    with pytest.raises(TypeError, match="not JSON-ready"):
        runner.to_json({"x": object()})


def _sweep(module, out, ex=None, **kw):
    ts = runner.make_trials("fake", module, "quick", 7)
    return runner.run_experiment("fake", module, ts, out, ex, progress=False, **kw)


def test_failing_trial_recorded_and_not_cached(module, tmp_path):
    outcome = _sweep(module, tmp_path)
    assert len(outcome.results) == 4 and outcome.computed == 5 and outcome.cached == 0
    [failed] = outcome.failed
    assert failed["config"] == {"fail": "boom"}
    assert failed["error"] == {"type": "ValueError", "message": "trial asked to fail: boom"}
    assert all(d["blas_threads"] == 1 for _, d in outcome.results)
    files = list((tmp_path / ".trials" / "fake").iterdir())
    assert len(files) == 4 and all(f.suffix == ".json" for f in files)  # no temporaries
    CALLS.clear()
    again = _sweep(module, tmp_path)  # the failure is retried, the rest loaded
    assert CALLS == [{"fail": "boom"}] and again.cached == 4
    assert again.results == outcome.results and again.failed == outcome.failed


def test_stopped_after_n_trials_resumes_without_recomputing(module, tmp_path):
    fresh = _sweep(module, tmp_path / "fresh")

    class Killed(Exception):
        pass

    def kill_after_two(trial, record):
        if len(CALLS) == 2:
            raise Killed

    CALLS.clear()
    with pytest.raises(Killed):
        _sweep(module, tmp_path / "run", after_trial=kill_after_two)
    first_two = list(CALLS)
    CALLS.clear()
    resumed = _sweep(module, tmp_path / "run")
    assert resumed.cached == 2 and not any(c in CALLS for c in first_two)
    assert len(CALLS) == 3
    assert resumed.results == fresh.results and resumed.failed == fresh.failed


def test_corrupt_cache_entry_is_recomputed(module, tmp_path):
    first = _sweep(module, tmp_path)
    victim = sorted((tmp_path / ".trials" / "fake").iterdir())[0]
    victim.write_text("{not json")
    CALLS.clear()
    again = _sweep(module, tmp_path)
    assert again.cached == 3 and len(CALLS) == 2 and again.results == first.results


def test_same_numbers_in_process_pool_and_dask(module, tmp_path):
    pytest.importorskip("distributed")
    reference = _sweep(module, tmp_path / "inproc")
    with runner.executor(workers=2) as ex:
        assert ex.kind == "processes"
        pool = _sweep(module, tmp_path / "pool", ex)
    with runner.executor(workers=1, dask="local") as ex:
        assert ex.kind == "dask"
        dask = _sweep(module, tmp_path / "dask", ex)
    for other in (pool, dask):
        assert other.results == reference.results
        assert other.failed == reference.failed
        assert summarise(other.results, "quick") == summarise(reference.results, "quick")
    assert json.dumps(pool.results) == json.dumps(reference.results)


def test_dask_missing_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r'pip install "miniresnet\[distributed\]"'):
        runner.Dask("local")


def test_write_atomic_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    runner.write_atomic(target, "old")

    def broken(*a):
        raise OSError("disk full")

    monkeypatch.setattr(runner.os, "replace", broken)
    with pytest.raises(OSError):
        runner.write_atomic(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]
