"""lesions at small scale: the contract (configs, claims, plot from JSON data), the claims'
direction (a residual net loses less than a plain one), and that the nets are degradation's,
trained once in the shared store."""

import json

import pytest

from miniresnet.experiments import claims, degradation, training
from miniresnet.experiments import lesions as exp

pytestmark = pytest.mark.backends("numpy")


def test_trials_are_json_ready_distinct_and_degradations_deepest_nets():
    for scale in ("quick", "default", "full"):
        configs = exp.trials(scale, 0)
        assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
        deepest = {(c["kind"], c["replicate"]): (c["train"], c["train_seed"])
                   for c in degradation.trials(scale, 0)
                   if c["n"] == max(d["n"] for d in degradation.trials(scale, 0))}
        assert {(c["kind"], c["replicate"]): (c["train"], c["train_seed"])
                for c in configs} == deepest
    with pytest.raises(ValueError, match="unknown scale"):
        exp.trials("huge", 0)


def test_quick_shared_nets_contract_direction_and_plot(tmp_path, fits):
    with training.store_at(tmp_path / "store"):
        for c in degradation.trials("quick", 0):
            degradation.run_trial(c, 0)
        trained = len(fits)
        results = json.loads(json.dumps(
            [(c, exp.run_trial(c, i)) for i, c in enumerate(exp.trials("quick", 0))]))
    assert trained == len(degradation.trials("quick", 0)) and len(fits) == trained  # no retraining
    by_kind = {c["kind"]: d for c, d in results}
    down = by_kind["resnet"]["downsampling"]
    n = results[0][0]["n"]
    assert [i + 1 for i, d in enumerate(down) if d] == [n + 1, 2 * n + 1]
    assert all((a is None) == d for a, d in zip(by_kind["plain"]["single"], down))
    assert all(a is not None for a in by_kind["resnet"]["single"])
    out = exp.summarise(results, "quick")
    by_id = {}
    for c in out["claims"]:
        claims.claim(c["id"], **{k: c[k] for k in ("source", "claim", "measured", "rule", "paper",
                                                    "paper_status", "n", "spread", "holds_at")})
        by_id[c["id"]] = claims.judge(c, "quick")
    assert set(by_id) == {"lesion_resnet_mean_drop", "lesion_plain_mean_drop"}
    assert all(c["agrees"] is None for c in by_id.values())  # pinned to default
    # the direction of the two claims: deleting a block hurts the residual net less
    assert by_id["lesion_resnet_mean_drop"]["measured"] < \
        by_id["lesion_plain_mean_drop"]["measured"]
    names = exp.plot(json.loads(json.dumps(out["data"])), tmp_path)
    assert names == ["lesions.png"] and (tmp_path / names[0]).stat().st_size > 0
