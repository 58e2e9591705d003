"""paths_at_init at small scale: Σ_k g^(k) equals the gradient, the binomial fractions, the fit
helpers, and the contract (configs, claims, plots from JSON data)."""

import json
import math

import numpy as np
import pytest

from miniresnet.experiments import claims
from miniresnet.experiments import paths_at_init as exp

SMALL = {"n": 1, "width": 0.25, "batch": 4, "size": 4, "samples": 4, "net": 0}


def test_paths_sum_to_the_gradient():
    data = exp.run_trial(SMALL, 7)
    assert data["sum_rel_err"] < 1e-12
    assert data["blocks"] == 3 and len(data["norm"]) == 4


def test_binomial_fractions():
    assert exp.binomial_fraction(54, 0, 54) == 1.0
    assert 100 * exp.binomial_fraction(54, 5, 17) == pytest.approx(0.4537, abs=5e-5)
    assert 100 * exp.binomial_fraction(54, 19, 35) == pytest.approx(98.0, abs=0.05)


def test_log_linear_fit():
    slope, r2 = exp.log_linear_fit(range(6), [3 * 0.5 ** k for k in range(6)])
    assert slope == pytest.approx(math.log(0.5)) and r2 == pytest.approx(1.0)


@pytest.mark.backends("numpy")
def test_summarise_claims_and_plot_from_json(tmp_path):
    configs = exp.trials("quick", 0)
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
    results = [(c, exp.run_trial(c, 10 + i)) for i, c in enumerate(configs)]
    out = exp.summarise(json.loads(json.dumps(results)), "quick")
    by_id = {c["id"]: claims.judge(c, "quick") for c in out["claims"]}
    for c in by_id.values():
        claims.claim(c["id"], **{k: c[k] for k in ("source", "claim", "measured", "rule",
                                                    "paper", "paper_status", "n", "spread",
                                                    "holds_at")})
    assert by_id["paths_sum_exact"]["agrees"] and by_id["veit_binomial_5_17"]["agrees"]
    n = out["data"]["blocks"]
    assert by_id["veit_mean_length_at_init"]["rule"]["value"] == pytest.approx(
        n / 2 - math.sqrt(n))
    assert np.sum(out["data"]["share"]) == pytest.approx(1.0)
    names = exp.plot(json.loads(json.dumps(out["data"])), tmp_path)
    assert all((tmp_path / n).stat().st_size > 0 for n in names)
