"""loss_landscape at small scale: the trials share degradation's nets where the configs
coincide; a trial's top eigenvalue is the exact Hessian's on a tiny net and hessian_top's on the
same minibatch and batch-norm mode; a diverging net is data, not a crash; the quick contract end
to end; the claims' rule directions and the answer's words follow the numbers."""

import json
import math
import warnings

import numpy as np
import pytest
from experiment_checks import assert_well_formed, judged

from miniresnet import inspect
from miniresnet.experiments import degradation, training
from miniresnet.experiments import loss_landscape as exp
from miniresnet.experiments.no_batch_norm import CLIP

pytestmark = pytest.mark.backends("numpy")

IDS = {"hessian_top_bn_n3", "hessian_top_nobn_n3", "hessian_top_bn_n9", "hessian_top_nobn_n9",
       "hessian_top_plain_n9"}


def _key(c):
    return json.dumps([c["train"], c["train_seed"]], sort_keys=True)


@pytest.mark.parametrize("scale", ["quick", "default", "full"])
def test_trials_are_distinct_and_share_degradations_nets(scale):
    configs = exp.trials(scale, 5)
    assert json.loads(json.dumps(configs)) == configs
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
    depths = exp._SCALES[scale]["depths"]
    assert len(configs) == len(depths) * len(exp.VARIANTS) * len(exp.STATES)
    shared = {_key(c): c["n"] for c in degradation.trials(scale, 5) if c["replicate"] == 0}
    for c in configs:
        base = degradation.net_config(scale, c["n"], exp.VARIANTS[c["variant"]][1])
        bn = exp.VARIANTS[c["variant"]][2]
        if bn:  # degradation's own net wherever degradation trains that depth
            assert c["train"] == base
            assert (_key(c) in shared) == (c["n"] in {n for n in shared.values()})
        else:
            assert c["train"]["model"] == {**base["model"], "norm": False}
            assert c["train"]["clip_norm"] == CLIP and _key(c) not in shared
            assert {k: v for k, v in c["train"].items() if k not in ("model", "clip_norm")} \
                == {k: v for k, v in base.items() if k not in ("model", "clip_norm")}
    # one minibatch, one probe seed, one training seed for every trial
    assert len({(c["batch"], c["batch_seed"], c["train_seed"]) for c in configs}) == 1
    if scale == "default":
        assert {c["n"] for c in configs if _key(c) in shared} == {3}  # ResNet-20's BN nets
        assert configs[0]["batch"] == 32 and configs[0]["steps"] == 40
    with pytest.raises(ValueError, match="unknown scale"):
        exp.trials("huge", 0)


def _trial(variant, state, n=1, width=0.25, epochs=2, steps=10, runs=1, seed=0):
    cfg = exp.net_config("quick", n, variant)
    cfg = {**cfg, "epochs": epochs, "model": {**cfg["model"], "width": width}}
    return {"variant": variant, "n": n, "state": state, "train_seed": 7, "train": cfg,
            "batch": 32, "batch_seed": seed, "steps": steps, "runs": runs}


def test_top_eigenvalues_are_the_exact_hessians_on_a_tiny_net(tmp_path):
    """A net of ~400 parameters: the trial's top 3 equal the eigenvalues of inspect.hessian
    (evaluation mode for the trained net, as the trial says), and so do the SLQ extremes."""
    with training.store_at(tmp_path):
        for variant, state in (("bn", "trained"), ("nobn", "init")):
            c = _trial(variant, state, width=0.0625, epochs=1, steps=40, runs=2)
            d = exp.run_trial(c, 0)
            assert d["bn_mode"] == exp.BN_MODE[state]
            model = (training.trained(c["train"], 7).model if state == "trained"
                     else training.snapshot(c["train"], 7, 0)).to("float64").eval()
            x, y = exp.minibatch("digits", 32, 0)
            exact = np.linalg.eigvalsh(inspect.hessian(model, x, y).matrix)[::-1]
            assert d["params"] == len(exact) < 500
            np.testing.assert_allclose(d["top"], exact[:3], rtol=1e-8)
            for nodes in d["nodes"]:
                np.testing.assert_allclose([min(nodes), max(nodes)], [exact[-1], exact[0]],
                                           rtol=1e-6, atol=1e-9 * exact[0])
            assert d["trace_stderr"] is not None and len(d["weights"]) == 2


def test_top_eigenvalue_is_hessian_tops_on_the_same_minibatch_and_mode(tmp_path):
    """At initialisation (batch statistics frozen) and trained (evaluation mode): the trial's
    top eigenvalue is inspect.hessian_top's on the fixed minibatch, and not the other mode's
    nor another minibatch's (so a wrong mode or batch would show)."""
    with training.store_at(tmp_path):
        for state, other in (("init", "eval"), ("trained", "frozen")):
            c = _trial("bn", state)
            d = exp.run_trial(c, 0)
            model = (training.trained(c["train"], 7).model if state == "trained"
                     else training.snapshot(c["train"], 7, 0)).to("float64")
            x, y = exp.minibatch("digits", 32, 0)
            top = inspect.hessian_top(model, x, y, k=1, steps=10, seed=0,
                                      bn=exp.BN_MODE[state]).values[0]
            assert d["top"][0] == pytest.approx(top, rel=1e-9)
            assert d["top"] == sorted(d["top"], reverse=True) and len(d["top"]) == 3
            wrong = inspect.hessian_top(model, x, y, k=1, steps=10, seed=0, bn=other)
            assert abs(wrong.values[0] / top - 1) > 1e-3
            xb, yb = exp.minibatch("digits", 32, 1)
            assert abs(inspect.hessian_top(model, xb, yb, k=1, steps=10, seed=0,
                                           bn=exp.BN_MODE[state]).values[0] / top - 1) > 1e-3
            assert not model.training  # the trial's net left in evaluation mode


def test_a_diverging_net_is_recorded_not_crashed(tmp_path):
    c = _trial("nobn", "trained")
    c["train"] = {**c["train"], "lr": 1e4, "schedule": "constant", "clip_norm": None}
    with training.store_at(tmp_path):
        with warnings.catch_warnings():  # NumPy may warn of overflow on the way (compiled
            warnings.simplefilter("ignore", RuntimeWarning)  # kernels do not)
            d = exp.run_trial(c, 0)
    assert d["diverged"] is not None and "top" not in d
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    results = _fake({("bn", 3): 80.0, ("nobn", 3): 100.0, ("bn", 9): 100.0,
                     ("plain_bn", 9): 500.0, ("plain_nobn", 9): 300.0})
    results.append(({**results[1][0], "variant": "nobn", "n": 9}, d))  # a trained one
    out = exp.summarise(results, "default")
    j = judged(out, "default")
    assert math.isnan(j["hessian_top_nobn_n9"]["measured"])
    assert not j["hessian_top_nobn_n9"]["agrees"] and not j["hessian_top_bn_n9"]["agrees"]
    assert out["data"]["diverged"]["nobn"]["9"] == d["diverged"]
    text = exp.answer(out["data"], [c for c in j.values()])
    assert text.startswith("Undecided") and "80/100 at 20 layers" in text
    assert "100/diverged at 56" in text
    assert exp.plot(json.loads(json.dumps(out["data"])), tmp_path)


def test_quick_contract_end_to_end(tmp_path):
    with training.store_at(tmp_path / "store"):
        results = [(c, exp.run_trial(c, 0)) for c in exp.trials("quick", 0)]
    for c, d in results:
        assert d["diverged"] is None and d["bn_mode"] == exp.BN_MODE[c["state"]]
        assert len(d["nodes"]) == len(d["weights"]) == c["runs"]
        assert all(math.isclose(sum(w), 1.0, rel_tol=1e-9) for w in d["weights"])
        assert max(d["nodes"][0]) == pytest.approx(d["top"][0], rel=1e-12)
        assert (d["final_test_acc"] is None) == (c["state"] == "init")
    out = json.loads(json.dumps(exp.summarise(results, "quick"), allow_nan=False))
    assert_well_formed(out)
    verdicts = judged(out, "quick")
    assert set(verdicts) == IDS
    assert all(v["agrees"] is None for v in verdicts.values())  # all pinned to default
    data = out["data"]
    assert data["claim_depths"] == [1, 2] and set(data["variants"]) == set(exp.VARIANTS)
    assert verdicts["hessian_top_bn_n9"]["measured"] == data["top"]["bn"]["2"]["trained"]
    assert verdicts["hessian_top_bn_n9"]["rule"]["value"] == data["top"]["nobn"]["2"]["trained"]
    names = exp.plot(data, tmp_path)
    assert names == ["loss_landscape.png", "loss_landscape_density.png"]
    assert all((tmp_path / n).stat().st_size > 0 for n in names)
    _check_sentence(exp.answer(data, list(verdicts.values())))


def _fake(tops):
    """Results of the trained trials with these top eigenvalues (and init ones at half)."""
    results = []
    for (v, n), top in tops.items():
        for state, value in (("init", top / 2), ("trained", top)):
            c = {"variant": v, "n": n, "state": state, "train_seed": 0, "batch": 32,
                 "batch_seed": 0, "steps": 3, "runs": 1,
                 "train": exp.net_config("default", n, v)}
            results.append((c, {"top": [value, value / 2], "residuals": [0.0, 0.0],
                                "trace": 3 * value, "trace_stderr": None,
                                "nodes": [[-1.0, value / 2, value]],
                                "weights": [[0.2, 0.5, 0.3]], "params": 10,
                                "bn_mode": exp.BN_MODE[state], "diverged": None,
                                "final_test_acc": None if state == "init" else 0.9,
                                "final_train_loss": None if state == "init" else 0.1}))
    return results


GOOD = {("bn", 3): 80.0, ("nobn", 3): 100.0, ("plain_bn", 3): 90.0, ("plain_nobn", 3): 95.0,
        ("bn", 9): 100.0, ("nobn", 9): 1000.0, ("plain_bn", 9): 500.0, ("plain_nobn", 9): 800.0}
BAD = {**GOOD, ("bn", 3): 10.0, ("nobn", 9): 50.0, ("bn", 9): 200.0, ("plain_bn", 9): 100.0}


def test_claims_rule_directions():
    ok = judged(exp.summarise(_fake(GOOD), "default"), "default")
    assert set(ok) == IDS and all(v["agrees"] for v in ok.values()), ok
    assert ok["hessian_top_bn_n3"]["rule"]["value"] == pytest.approx(50.0)
    assert ok["hessian_top_nobn_n9"]["rule"]["value"] == pytest.approx(125.0)  # 100 · 100/80
    no = judged(exp.summarise(_fake(BAD), "default"), "default")
    assert not any(v["agrees"] for v in no.values()), no
    # each rule alone: nudging one number across its threshold flips that claim only
    for key, value, cid in ((("bn", 3), 40.0, "hessian_top_bn_n3"),
                            (("plain_bn", 9), 99.0, "hessian_top_plain_n9")):
        j = judged(exp.summarise(_fake({**GOOD, key: value}), "default"), "default")
        assert [k for k, v in j.items() if not v["agrees"]] == [cid]


def _check_sentence(text):
    assert text.strip() == text and "\n" not in text and text.endswith(".")
    assert text[0].isupper() and len(text.split()) <= 60, text


def test_answer_follows_the_numbers():
    out = exp.summarise(_fake(GOOD), "default")
    text = exp.answer(out["data"], out["claims"])
    _check_sentence(text)
    assert text.startswith("Yes:") and "80/100 at 20 layers (×0.8)" in text
    assert "100/1e3 at 56 (×0.1)" in text and "500, above the ResNet's" in text
    out = exp.summarise(_fake({**GOOD, ("bn", 3): 20.0}), "default")
    assert exp.answer(out["data"], out["claims"]).startswith(
        "No, batch norm already smooths the shallow net:")
    out = exp.summarise(_fake(BAD), "default")
    j = list(judged(out, "default").values())
    text = exp.answer(out["data"], j)
    _check_sentence(text)
    assert text.startswith("No, batch norm does not smooth the deep net:")
    assert "100, not above the ResNet's" in text and "do not reproduce" in text
    for data in ({}, {"top": {}}, {k: v for k, v in out["data"].items() if k != "top"}):
        _check_sentence(exp.answer(data, []))
