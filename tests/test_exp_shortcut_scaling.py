"""shortcut_scaling at small scale: λ^L exact, batch norm after the addition cancels λ, the
live-branch rates' rules, and the contract (configs, claims, plots from JSON data)."""

import json

import pytest

from miniresnet.experiments import claims
from miniresnet.experiments import shortcut_scaling as exp


def _results(scale="quick"):
    return [(c, exp.run_trial(c, 100 + i)) for i, c in enumerate(exp.trials(scale, 0))]


def test_lambda_power_exact_with_zero_branches():
    for order in exp.EXACT_ORDERS:
        data = exp.run_trial({"kind": "zero", "order": order, "depth": 6}, 3)
        assert exp.lambda_error(data) < 1e-12


def test_post_order_is_a_constant_times_lambda_power():
    data = exp.run_trial({"kind": "zero", "order": "post", "depth": 5}, 3)
    assert exp.lambda_error(data) > 1e-3  # the ReLU after the addition breaks λ^L ...
    factors = [r[0] / float(lam) ** 5 for lam, r in data.items()]
    assert max(factors) - min(factors) < 1e-12 * max(factors)  # ... by a factor free of λ


def test_bn_after_add_cancels_lambda():
    data = exp.run_trial({"kind": "zero", "order": "bn_after_add", "depth": 6}, 3)
    assert exp.surviving_fraction(data) < 0.01
    identity = exp.run_trial({"kind": "zero", "order": "full_preact", "depth": 6}, 3)
    assert exp.surviving_fraction(identity) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.backends("numpy")
def test_summarise_claims_and_plot_from_json(tmp_path):
    configs = exp.trials("quick", 0)
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
    out = exp.summarise(json.loads(json.dumps(_results())), "quick")
    by_id = {c["id"]: claims.judge(c, "quick") for c in out["claims"]}
    for c in by_id.values():
        claims.claim(c["id"], **{k: c[k] for k in ("source", "claim", "measured", "rule",
                                                    "paper", "paper_status", "n", "spread",
                                                    "holds_at")})
    assert by_id["shortcut_lambda_exact"]["agrees"]
    assert by_id["bn_after_add_cancels_lambda"]["agrees"]
    assert by_id["shortcut_live_rate_lam1.1"]["agrees"]  # λ > 1: exponentially large
    names = exp.plot(json.loads(json.dumps(out["data"])), tmp_path)
    assert all((tmp_path / n).stat().st_size > 0 for n in names)
