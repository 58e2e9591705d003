"""orderings at small scale: the contract (configs, claims, plot from JSON data), the claims'
computation and the direction of the all-train rule, the shared 'post' net, and the float64
gradient profile after training."""

import json

import numpy as np
import pytest
from experiment_checks import judged

from miniresnet import nn
from miniresnet.experiments import degradation, training
from miniresnet.experiments import orderings as exp

pytestmark = pytest.mark.backends("numpy")




def test_trials_are_json_ready_distinct_and_share_the_post_net(tmp_path):
    for scale in ("quick", "default", "full"):
        configs = exp.trials(scale, 0)
        assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
        assert {c["order"] for c in configs} == set(nn.ORDERS)
        budget = {k: v for k, v in configs[0]["train"].items() if k != "model"}
        assert all({k: v for k, v in c["train"].items() if k != "model"} == budget
                   for c in configs)
    post = next(c for c in exp.trials("default", 0) if c["order"] == "post")
    assert post["train"] == degradation.net_config("default", 3, True)
    assert post["train_seed"] == degradation.trials("default", 0)[0]["train_seed"]
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
    assert set(by_id) == {"orderings_all_train", "orderings_full_preact_vs_post"}
    assert all(c["agrees"] is None for c in by_id.values())  # pinned to default
    final = {c["order"]: d["test_acc"][-1] for c, d in results}
    assert by_id["orderings_all_train"]["measured"] == min(final.values())
    assert by_id["orderings_full_preact_vs_post"]["measured"] == pytest.approx(
        100 * (final["full_preact"] - final["post"]))
    names = exp.plot(json.loads(json.dumps(out["data"])), tmp_path)
    assert names == ["orderings.png"] and (tmp_path / names[0]).stat().st_size > 0


def test_every_ordering_learns_at_small_scale():
    """n = 1, width 0.25, 5 epochs: every ordering ends far above chance (the direction of
    orderings_all_train, whose 0.9 threshold is pinned to the default budget) and its training
    loss falls."""
    seed = training.net_seed(0)
    configs = [{"order": o, "replicate": 0, "train_seed": seed,
                "train": training.config(1, width=0.25, epochs=5,
                                         **({} if o == "post" else {"order": o}))}
               for o in nn.ORDERS]
    results = [(c, exp.run_trial(c, 0)) for c in configs]
    out = exp.summarise(results, "default")
    assert judged(out, "default")["orderings_all_train"]["measured"] > 0.5
    for _, d in results:
        assert d["train_loss"][-1] < d["train_loss"][0]
        g = np.asarray(d["grad_norm"])
        assert g.shape == (3 * 1 + 1,) and np.all(np.isfinite(g)) and np.all(g > 0)


def test_gradient_profile_is_float64_and_matches_the_test_loss():
    cfg = training.config(1, width=0.25, epochs=1)
    net = training.trained(cfg, 3)
    out = exp.gradient_through_depth(net.model, "digits")
    assert all(str(p.raw.dtype) == "float64" for p in net.model.parameters())
    assert out["test_loss_f64"] == pytest.approx(net.history[-1]["test_loss"], rel=1e-4)
