"""paths_trained at small scale: the contract (configs, claim, plot from JSON data), that the
trained net is degradation's, trained once in the shared store, and that the init trial is the
same net before training."""

import json

import numpy as np
import pytest

from miniresnet.creation import to_numpy
from miniresnet.experiments import claims, degradation, training
from miniresnet.experiments import paths_trained as exp

pytestmark = pytest.mark.backends("numpy")


def test_trials_are_json_ready_distinct_and_degradations_deepest_resnet():
    for scale in ("quick", "default", "full"):
        configs = exp.trials(scale, 0)
        assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
        deg = degradation.trials(scale, 0)
        deepest = [(c["train"], c["train_seed"]) for c in deg
                   if c["kind"] == "resnet" and c["n"] == max(d["n"] for d in deg)]
        assert all((c["train"], c["train_seed"]) in deepest for c in configs)
        assert {c["state"] for c in configs} == {"trained", "init"}
    with pytest.raises(ValueError, match="unknown scale"):
        exp.trials("huge", 0)


def test_init_model_is_the_untrained_net():
    config = exp.trials("quick", 0)[0]
    ds = training.load_data(config["train"]["data"], "float64")
    built = exp._model({**config, "state": "init"}, ds)
    fresh = training._build(config["train"], config["train_seed"], ds)[0]
    for key, value in fresh.state_dict().items():
        np.testing.assert_array_equal(to_numpy(built.state_dict()[key]),
                                      to_numpy(value).astype(np.float64))


def test_quick_shared_net_contract_and_plot(tmp_path, fits):
    with training.store_at(tmp_path / "store"):
        for c in degradation.trials("quick", 0):
            degradation.run_trial(c, 0)
        trained = len(fits)
        results = json.loads(json.dumps(
            [(c, exp.run_trial(c, i)) for i, c in enumerate(exp.trials("quick", 0))]))
    assert len(fits) == trained  # the trained net came from the store
    for _, d in results:
        assert np.isclose(sum(d["share"]), 1.0)
        lo, hi = d["veit_range"]
        assert 0 <= lo <= hi <= d["blocks"]
    out = exp.summarise(results, "quick")
    (c,) = out["claims"]
    claims.claim(c["id"], **{k: c[k] for k in ("source", "claim", "measured", "rule", "paper",
                                                "paper_status", "n", "spread", "holds_at")})
    assert c["id"] == "paths_trained_90pct_max" and claims.judge(c, "quick")["agrees"] is None
    assert out["data"]["blocks"] == results[0][1]["blocks"] == c["rule"]["value"] * 2
    names = exp.plot(json.loads(json.dumps(out["data"])), tmp_path)
    assert names == ["paths_trained.png"] and (tmp_path / names[0]).stat().st_size > 0
