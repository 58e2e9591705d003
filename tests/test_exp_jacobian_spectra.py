"""jacobian_spectra: the singularity and norm-preservation rules hold at small scale; the
module keeps the experiment contract (JSON-ready distinct trials, checked claims, figures from
JSON data)."""

import json

import numpy as np
import pytest
from experiment_checks import assert_well_formed

from miniresnet import nn
from miniresnet.experiments import jacobian_spectra as E

#: a small sweep: width 32 (default 64), 24 blocks, two nets per block type
SMALL = [{"variant": v, "net": i, "width": 32, "depth": 24, "samples": 2, "e2e": [1, 24]}
         for v in E.VARIANTS for i in range(2)]
EXPECTED = {"residual_block_norm_preservation", "residual_norm_preservation_with_depth",
            "preact_residual_zero_directions", "residual_end_to_end_zero_directions",
            "post_activation_zero_directions", "plain_end_to_end_zero_directions"}


@pytest.fixture(scope="module")
def small():
    results = [(c, json.loads(json.dumps(E.run_trial(c, 200 + i)))) for i, c in enumerate(SMALL)]
    return results, E.summarise(results, "full")  # "full": every rule is judged


@pytest.mark.backends("numpy")
def test_every_claim_rule_holds_at_small_scale(small):
    _, summary = small
    got = {c["id"]: c for c in summary["claims"]}
    assert set(got) == EXPECTED
    # residual blocks keep norms better than plain ones, better with depth, and lose no
    # direction; the post-activation block and the deep plain net lose some
    for c in got.values():
        assert c["agrees"] is True, c


@pytest.mark.backends("numpy")
def test_claims_are_checked_and_json_ready(small):
    assert_well_formed(small[1])


@pytest.mark.backends("numpy")
def test_plain_blocks_zero_the_inactive_units_directions(small):
    # a plain pre-activation block W2 D2 S2 W1 D1 S1 has rank at most its active units: about
    # half its singular values are zero; the residual block I + ... has none
    v = small[1]["data"]["variants"]
    assert all(0.3 < f < 0.7 for f in v["plain_preact"]["block_zero_fraction"])
    assert max(v["residual_preact"]["block_zero_fraction"]) == 0.0


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
    assert {c["variant"] for c in configs} == set(E.VARIANTS)
    assert all(max(c["e2e"]) == c["depth"] for c in configs)


@pytest.mark.backends("numpy")
def test_calibration_sets_the_batch_statistics_and_evaluation_mode():
    x = np.random.default_rng(0).standard_normal((64, 8))
    model = nn.mlp(2, 8, in_features=8, layers=2, order="full_preact")
    E.calibrate(model, x)
    assert not model.training
    bn = model.blocks[0].norms[0]
    stem = np.asarray(model.stem(x).numpy())  # what block 1's first BN sees
    assert np.allclose(np.asarray(bn.running_mean), stem.mean(axis=0))
    assert np.allclose(np.asarray(bn.running_var), stem.var(axis=0), rtol=0.05)
    assert bn.momentum == 0.1


def test_trial_runs_on_every_backend():
    out = E.run_trial({"variant": "residual_post", "net": 0, "width": 4, "depth": 2,
                       "samples": 2, "e2e": [1, 2]}, 0)
    assert len(out["blocks"]) == 2 and len(out["e2e"]) == 2
    assert all(len(b["spectrum"]) == 4 for b in out["blocks"])
    assert json.loads(json.dumps(out)) == out


@pytest.mark.backends("numpy")
def test_bad_configs_are_refused():
    good = {"variant": "plain_post", "net": 0, "width": 4, "depth": 2, "samples": 1,
            "e2e": [1, 2]}
    with pytest.raises(ValueError, match="unknown variant"):
        E.run_trial({**good, "variant": "nope"}, 0)
    with pytest.raises(ValueError, match="go past"):
        E.run_trial({**good, "e2e": [3]}, 0)
    with pytest.raises(ValueError, match="unknown scale"):
        E.trials("huge", 0)
