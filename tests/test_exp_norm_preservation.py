"""norm_preservation at small scale: weight snapshots (training.snapshot) equal the weights the
run had at that epoch, also after a kill and resume; the contract (configs, claims, plot from
JSON data); the ratios from the profile; the claims' rule directions."""

import json

import numpy as np
import pytest
from experiment_checks import judged

from miniresnet.creation import to_numpy
from miniresnet.experiments import degradation, training
from miniresnet.experiments import norm_preservation as exp

pytestmark = pytest.mark.backends("numpy")
CFG = training.config(1, residual=True, width=0.25, epochs=4)



def _state(model):
    return {k: to_numpy(v) for k, v in model.state_dict().items()}


def _equal(a, b):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and np.array_equal(sa[k], sb[k]), k


class Kill(Exception):
    pass


def test_snapshots_equal_the_weights_of_a_killed_and_resumed_run(tmp_path, monkeypatch):
    with training.store_at(tmp_path):
        def kill(epoch):
            if epoch == 1:  # two epochs done, as a kill would leave it
                raise Kill
        with pytest.raises(Kill):
            training.trained(CFG, 3, after_epoch=kill)
        key = training.train_key(CFG, 3)
        at_kill = training._load(tmp_path / f"{key}.partial.safetensors", CFG, 3,
                                 training.load_data("digits", "float32"))[0]
        final = training.trained(CFG, 3).model  # resumes from epoch 2
        for e in training.SNAPSHOT_EPOCHS:
            assert (tmp_path / f"{key}.epoch{e}.safetensors").exists()
        calls = []
        monkeypatch.setattr(training, "fit", lambda *a, **k: calls.append(1))
        stored = {e: training.snapshot(CFG, 3, e) for e in (1, 3, 4)}
        assert calls == []  # loaded, not trained
    monkeypatch.undo()
    fresh = {e: training.snapshot(CFG, 3, e) for e in (0, 1, 2, 3)}  # no store: trained now
    _equal(stored[1], fresh[1])
    _equal(stored[3], fresh[3])
    _equal(at_kill, fresh[2])
    _equal(stored[4], final)
    assert not any(m.training for m in stored.values())
    with pytest.raises(ValueError, match="epoch"):
        training.snapshot(CFG, 3, 5)


def test_missing_snapshot_is_trained_and_stored(tmp_path):
    cfg = training.config(1, residual=False, width=0.25, epochs=3)
    with training.store_at(tmp_path):
        a = training.snapshot(cfg, 1, 2)  # 2 is not a kept epoch: trained up to it, stored
        key = training.train_key(cfg, 1)
        assert (tmp_path / f"{key}.epoch2.safetensors").exists()
        b = training.snapshot(cfg, 1, 2)
    _equal(a, b)



def test_trials_are_json_ready_distinct_and_share_degradations_nets():
    for scale in ("quick", "default", "full"):
        configs = exp.trials(scale, 0)
        assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
        nets = {json.dumps([c["train"], c["train_seed"]], sort_keys=True)
                for c in degradation.trials(scale, 0)}
        assert all(json.dumps([c["train"], c["train_seed"]], sort_keys=True) in nets
                   for c in configs)
        assert all(0 <= c["epoch"] <= c["train"]["epochs"] for c in configs)
        assert max(c["epoch"] for c in configs) == configs[0]["train"]["epochs"]


def test_quick_contract_ratios_claims_and_plot_from_json(tmp_path):
    with training.store_at(tmp_path / "store"):
        results = [(c, exp.run_trial(c, 0)) for c in exp.trials("quick", 0)]
    for _, d in results:
        g, r = np.asarray(d["grad_norm"]), np.asarray(d["ratio"])
        assert np.all(np.isfinite(r)) and np.all(r > 0)
        np.testing.assert_allclose(r, g[:-1] / g[1:], rtol=1e-12)
    out = json.loads(json.dumps(exp.summarise(results, "quick")))
    verdicts = judged(out, "quick")
    assert set(verdicts) == {"norm_preservation_resnet", "norm_preservation_plain_minus_resnet",
                             "norm_preservation_plain_minus_resnet_init"}
    assert verdicts["norm_preservation_resnet"]["agrees"] is None  # pinned to default
    assert verdicts["norm_preservation_plain_minus_resnet"]["agrees"] is None
    names = exp.plot(out["data"], tmp_path)
    assert names and all((tmp_path / n).stat().st_size > 0 for n in names)


def _fake(ratios):
    return [({"kind": k, "n": 1, "epoch": e}, {"ratio": r}) for (k, e), r in ratios.items()]


def test_claims_rule_directions():
    ok = exp.summarise(_fake({("plain", 0): [1.0] * 6, ("plain", 4): [3.0, 0.3] * 3,
                              ("resnet", 0): [1.0] * 6, ("resnet", 4): [1.1, 0.95] * 3}),
                       "default")
    j = judged(ok, "default")
    assert j["norm_preservation_resnet"]["agrees"]
    assert j["norm_preservation_plain_minus_resnet"]["agrees"]
    assert not j["norm_preservation_plain_minus_resnet_init"]["agrees"]  # equal at epoch 0
    assert j["norm_preservation_resnet"]["measured"] == pytest.approx(
        np.mean(np.abs(np.log([1.1, 0.95]))))
    bad = exp.summarise(_fake({("plain", 0): [1.0] * 6, ("resnet", 0): [0.5] * 6,
                               ("plain", 4): [1.0] * 6, ("resnet", 4): [2.0] * 6}), "default")
    j = judged(bad, "default")
    assert not j["norm_preservation_plain_minus_resnet_init"]["agrees"]
    assert not j["norm_preservation_resnet"]["agrees"]
    assert not j["norm_preservation_plain_minus_resnet"]["agrees"]
