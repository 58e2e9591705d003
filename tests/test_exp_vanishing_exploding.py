"""Experiment 1 (vanishing_exploding): Yang et al.'s formula, its rate at small scale, the
contract (configs, claims, figures from JSON data)."""

import functools
import json
import math

import numpy as np
import pytest

from miniresnet.experiments import claims as cl
from miniresnet.experiments import vanishing_exploding as ve


def test_formula_reproduces_yang_table():
    for b, value in ve.YANG_TABLE_RELU.items():
        assert ve.yang_lambda(b) == pytest.approx(value, abs=0.006 if b == 4 else 0.0006)
    assert ve.yang_lambda(10**7) == pytest.approx(math.pi / (math.pi - 1), rel=1e-5)
    for b in (4, 8, 16, 32):
        assert ve.yang_lambda(b, "identity") == (b - 2) / (b - 3)
    with pytest.raises(ValueError, match="B >= 4"):
        ve.yang_lambda(3)
    with pytest.raises(ValueError, match="relu"):
        ve.yang_lambda(8, "tanh")


def _yang(activation, batch, width, reps=3):
    rows = [ve.run_trial({"kind": "yang", "activation": activation, "batch": batch,
                          "width": width, "depth": ve.YANG_DEPTH, "rep": r}, 100 + r)
            for r in range(reps)]
    return cl.mean_and_spread(r["lambda"] for r in rows)[0]


@pytest.mark.backends("numpy")
def test_yang_rate_within_its_rule_at_width_512():
    """The claims' rules at B = 8, width 512: ReLU within 3%, linear within 2%."""
    assert abs(_yang("relu", 8, 512) / ve.yang_lambda(8) - 1) <= 0.03
    assert abs(_yang("identity", 8, 512) / ve.yang_lambda(8, "identity") - 1) <= 0.02


def test_depth_trial_runs_on_every_backend():
    out = ve.run_trial({"kind": "depth", "residual": True, "norm": True, "activation": "tanh",
                        "depth": 3, "width": 8, "batch": 4, "rep": 0}, 1)
    assert len(out["grad_norm"]) == 4 and all(math.isfinite(g) and g > 0
                                              for g in out["grad_norm"])
    with pytest.raises(ValueError, match="unknown trial kind"):
        ve.run_trial({"kind": "nope"}, 1)


def test_trials_are_json_ready_and_distinct():
    for scale in cl.SCALES:
        configs = ve.trials(scale, 0)
        dumped = [json.dumps(c, sort_keys=True) for c in configs]
        assert len(set(dumped)) == len(dumped)
    assert max(c["depth"] for c in ve.trials("default", 0) if c["kind"] == "depth") >= 100
    with pytest.raises(ValueError, match="unknown scale"):
        ve.trials("huge", 0)


@functools.lru_cache(maxsize=1)
def _quick():
    results = [(c, ve.run_trial(c, 1000 + i)) for i, c in enumerate(ve.trials("quick", 0))]
    return json.loads(json.dumps(ve.summarise(results, "quick")))


@pytest.mark.backends("numpy")
def test_summarise_claims_and_plot(tmp_path):
    out = _quick()
    ids = {c["id"] for c in out["claims"]}
    assert ids == {"yang_lambda_relu_B8", "yang_lambda_relu_B16", "yang_lambda_relu_B32",
                   "yang_lambda_linear_B8", "he_healthy_norms_bn"}
    for c in out["claims"]:
        again = cl.claim(c["id"], source=c["source"], claim=c["claim"], measured=c["measured"],
                         rule=c["rule"], paper=c["paper"], paper_status=c["paper_status"],
                         n=c["n"], spread=c["spread"], holds_at=c["holds_at"])
        assert again == c and math.isfinite(c["measured"])
        assert cl.judge(c, "quick")["agrees"] is None  # all hold from the default scale
    names = ve.plot(out["data"], tmp_path)
    assert names and all((tmp_path / n).stat().st_size > 10_000 for n in names)


@pytest.mark.backends("numpy")
def test_plain_bn_conv_gradient_grows_towards_the_input_faster_than_residual():
    """Yang et al.'s explosion in He et al.'s plain BN conv net: per block, the plain net's
    gradient grows towards the input, and faster than the residual counterpart's."""
    out = _quick()["data"]["conv"]
    plain, res = (np.log(out[k]["grad_norm"]) for k in ("plain", "residual"))
    assert plain[0] > plain[-1] and plain[0] - plain[-1] > res[0] - res[-1]


@pytest.mark.backends("numpy")
def test_depth_curves_vanish_and_explode_as_expected():
    """Without BN the plain sigmoid net's gradient vanishes towards the input; with BN the plain
    ReLU net's explodes (at more than half Yang's exponent); the residual ReLU net with BN
    stays within a factor of 10."""
    depth = _quick()["data"]["depth"]
    curves = {(c["residual"], c["norm"], c["activation"]): np.asarray(c["grad_norm"])
              for c in depth["curves"]}
    g = curves[(False, False, "sigmoid")]
    assert g[0] < 1e-3 * g[-1]
    g = curves[(False, True, "relu")]
    assert math.log(g[0] / g[-1]) > 0.5 * depth["depth"] / 2 * math.log(depth["yang_lambda"])
    g = curves[(True, True, "relu")]
    assert 0.1 < g[0] / g[-1] < 10
