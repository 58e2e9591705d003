"""degradation at small scale: the contract (configs, claims, plot from JSON data), the plain
claim's rule and the residual claim's direction, and that its nets are the shared, cached ones."""

import json

import numpy as np
import pytest
from experiment_checks import judged

from miniresnet.experiments import degradation as exp
from miniresnet.experiments import training

pytestmark = pytest.mark.backends("numpy")




def test_trials_are_json_ready_and_distinct(tmp_path):
    for scale in ("quick", "default", "full"):
        configs = exp.trials(scale, 0)
        texts = {json.dumps(c, sort_keys=True) for c in configs}
        assert len(texts) == len(configs)
        assert {c["kind"] for c in configs} == {"plain", "resnet"}
        assert all(c["train"]["epochs"] == configs[0]["train"]["epochs"] for c in configs)
    assert exp.trials("quick", 0)[0]["train_seed"] != exp.trials("quick", 1)[0]["train_seed"]
    path = tmp_path / "mine.npz"
    np.savez(path, x=np.zeros((4, 1, 8, 8)), y=np.arange(4))
    npz = exp.trials("quick", 0, data=str(path))
    assert all(c["train"]["data"] == str(path) and len(c["data_sha256"]) == 64 for c in npz)
    with pytest.raises(ValueError, match="unknown scale"):
        exp.trials("huge", 0)


def test_quick_contract_claims_and_plot_from_json(tmp_path):
    configs = exp.trials("quick", 0)
    results = json.loads(json.dumps([(c, exp.run_trial(c, 0)) for c in configs]))
    out = exp.summarise(results, "quick")
    by_id = judged(out, "quick")
    assert set(by_id) == {"degradation_plain_deeper_worse",
                          "degradation_resnet_deeper_not_worse"}
    assert all(c["agrees"] is None for c in by_id.values())  # they hold at default, not quick
    names = exp.plot(json.loads(json.dumps(out["data"])), tmp_path)
    assert names == ["degradation.png"] and (tmp_path / names[0]).stat().st_size > 0


def test_plain_rule_holds_and_residual_closes_the_gap_at_small_scale():
    """n = 1 against n = 4 at width 0.25, 3 epochs: the deep plain net is worse by more than
    the claim's margin; the deep residual net's gap is smaller than the plain one's."""
    seed = training.net_seed(0)
    configs = [{"kind": kind, "n": n, "replicate": 0, "train_seed": seed,
                "train": training.config(n, residual=kind == "resnet", width=0.25, epochs=3)}
               for n in (1, 4) for kind in exp.KINDS]
    out = exp.summarise([(c, exp.run_trial(c, 0)) for c in configs], "default")
    by_id = judged(out, "default")
    plain = by_id["degradation_plain_deeper_worse"]
    assert plain["agrees"], plain["measured"]
    assert by_id["degradation_resnet_deeper_not_worse"]["measured"] < plain["measured"]


def test_the_nets_come_from_the_shared_store(tmp_path, monkeypatch):
    calls = []
    real = training.fit
    monkeypatch.setattr(training, "fit", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = exp.trials("quick", 0)[0]
    with training.store_at(tmp_path):
        first = exp.run_trial(config, 1)
        again = exp.run_trial(config, 2)  # another trial seed: the same net
        shared = training.trained(config["train"], config["train_seed"])
    assert len(calls) == 1 and shared.cached
    assert first == again and first["train_loss"] == [r["train_loss"] for r in shared.history]
