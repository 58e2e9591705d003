"""shattered_gradients: Balduzzi et al.'s rules hold at small scale; the module keeps the
experiment contract (JSON-ready distinct trials, checked claims, figures from JSON data)."""

import json

import numpy as np
import pytest
from experiment_checks import assert_well_formed

from miniresnet.experiments import shattered_gradients as E

#: a small sweep: every claim's trial at width 64 or 100 (the paper's is 200), a few nets each
SMALL = [
    {"variant": "feedforward_bn", "depth": 24, "width": 64, "nets": 3, "coactive": True},
    {"variant": "resnet_bn", "depth": 50, "width": 64, "nets": 4, "coactive": False},
    {"variant": "resnet_bn_beta0.1", "depth": 50, "width": 64, "nets": 3, "coactive": False},
    {"variant": "feedforward", "depth": 24, "width": 100, "nets": 4, "coactive": True},
    {"variant": "looks_linear", "depth": 50, "width": 64, "nets": 1, "coactive": False},
]
EXPECTED = {"shattered_acf1_ff_L24", "shattered_acf1_resnet_bn_L50",
            "shattered_acf1_resnet_bn_beta0.1_L50", "coactivation_bn", "coactivation_nobn_L20",
            "looks_linear_constant_gradient"}


@pytest.fixture(scope="module")
def small():
    results = [(c, json.loads(json.dumps(E.run_trial(c, 100 + i)))) for i, c in enumerate(SMALL)]
    return results, E.summarise(results, "full")  # "full": every rule is judged


@pytest.mark.backends("numpy")
def test_every_claim_rule_holds_at_small_scale(small):
    _, summary = small
    got = {c["id"]: c for c in summary["claims"]}
    assert set(got) == EXPECTED
    # the feedforward BN gradient is white noise by depth 24 while the beta = 0.1 resnet's
    # stays smooth at depth 50; co-activation is 1/4 with BN and climbs without; the
    # looks-linear net's gradient is constant
    for c in got.values():
        assert c["agrees"] is True, c


@pytest.mark.backends("numpy")
def test_claims_are_checked_and_json_ready(small):
    assert_well_formed(small[1])


@pytest.mark.backends("numpy")
def test_coactivation_is_a_quarter_with_bn_and_higher_without(small):
    coact = small[1]["data"]["coactive"]
    bn, plain = np.array(coact["feedforward_bn"]["mean"]), np.array(coact["feedforward"]["mean"])
    assert np.all(np.abs(bn - 0.25) < 0.03)
    assert plain[19] > plain[0] + 0.1


@pytest.mark.backends("numpy")
def test_plot_draws_from_json_data(small, tmp_path):
    data = json.loads(json.dumps(small[1]["data"]))
    names = E.plot(data, tmp_path)
    assert len(names) == 3 and all((tmp_path / n).stat().st_size > 10_000 for n in names)


@pytest.mark.backends("numpy")
@pytest.mark.parametrize("scale", ["quick", "default", "full"])
def test_trials_are_json_ready_and_distinct(scale):
    configs = E.trials(scale, 0)
    assert json.loads(json.dumps(configs)) == configs
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
    # every claim has its trial at every scale
    depths = {(c["variant"], c["depth"]) for c in configs}
    assert {("feedforward_bn", 24), ("resnet_bn", 50), ("resnet_bn_beta0.1", 50)} <= depths
    assert {c["variant"] for c in configs if c["coactive"]} == set(E.COACTIVATION)


def test_trial_runs_on_every_backend():
    out = E.run_trial({"variant": "feedforward_bn", "depth": 2, "width": 8, "nets": 1,
                       "coactive": True}, 0)
    assert len(out["acf1"]) == 1 and -1.0 <= out["acf1"][0] <= 1.0
    assert len(out["coactive"][0]) == 2
    ll = E.run_trial({"variant": "looks_linear", "depth": 3, "width": 8, "nets": 1,
                      "coactive": False}, 0)
    assert ll["acf1"] == [None] and ll["spread"][0] < 1e-10
    assert json.loads(json.dumps(out)) == out


@pytest.mark.backends("numpy")
def test_trials_are_pure_functions_of_config_and_seed():
    c = {"variant": "resnet_bn", "depth": 3, "width": 8, "nets": 2, "coactive": False}
    assert E.run_trial(c, 5) == E.run_trial(c, 5)
    assert E.run_trial(c, 5)["acf1"] != E.run_trial(c, 6)["acf1"]


@pytest.mark.backends("numpy")
def test_unknown_variant_and_scale_are_refused():
    with pytest.raises(ValueError, match="unknown variant"):
        E.run_trial({"variant": "nope", "depth": 2, "width": 8, "nets": 1, "coactive": False}, 0)
    with pytest.raises(ValueError, match="unknown scale"):
        E.trials("huge", 0)
