"""highway_vs_residual at small scale: the contract (configs, claims, plot from JSON data), the
gate measurement against a direct computation, the carry rule and the accuracy gap's
computation, and the shared residual net."""

import json

import numpy as np
import pytest
from experiment_checks import judged

from miniresnet import nn
from miniresnet.creation import to_numpy
from miniresnet.experiments import claims, degradation, training
from miniresnet.experiments import highway_vs_residual as exp
from miniresnet.tracing import no_grad


def test_gate_openings_equal_a_direct_computation(backend):
    """Hooks on the gates give, per block, mean(sigmoid(block.gate(h_{l-1}))) computed by
    running the stem and the blocks by hand; with zero gate weights, exactly sigmoid(b_T)."""
    model = nn.resnet_cifar(1, width=0.25, in_channels=1, block="highway", seed=0).eval()
    x = backend.asarray(np.random.default_rng(1).standard_normal((5, 1, 8, 8)), "float64")
    got = exp.gate_openings(model, x)
    want = []
    with no_grad():
        h = model.stem(x)
        for block in model.blocks:
            z = to_numpy(block.gate(h))
            want.append(np.mean(1 / (1 + np.exp(-z))))
            h = block(h)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for block in model.blocks:
        w = block.gate.weight
        block.gate.weight.data = backend.xp.zeros(w.shape, dtype=w.raw.dtype,
                                                  device=backend.device)
    np.testing.assert_allclose(exp.gate_openings(model, x), 1 / (1 + np.exp(2.0)), rtol=1e-12)
    with pytest.raises(ValueError, match="no highway blocks"):
        exp.gate_openings(nn.resnet_cifar(1, width=0.25, in_channels=1, seed=0), x)


@pytest.mark.backends("numpy")
def test_trials_are_json_ready_distinct_and_share_the_residual_net(tmp_path):
    for scale in ("quick", "default", "full"):
        configs = exp.trials(scale, 0)
        assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
        assert {c["kind"] for c in configs} == set(exp.KINDS)
    res = [c for c in exp.trials("default", 0) if c["kind"] == "resnet"]
    shared = [c for c in degradation.trials("default", 0) if c["kind"] == "resnet"
              and c["n"] == 3]
    assert res[0]["train"] == shared[0]["train"]
    assert res[0]["train_seed"] == shared[0]["train_seed"]
    path = tmp_path / "mine.npz"
    np.savez(path, x=np.zeros((4, 1, 8, 8)), y=np.arange(4))
    npz = exp.trials("quick", 0, data=str(path))
    assert all(c["train"]["data"] == str(path) and len(c["data_sha256"]) == 64 for c in npz)
    with pytest.raises(ValueError, match="unknown scale"):
        exp.trials("huge", 0)


@pytest.mark.backends("numpy")
def test_quick_contract_claims_and_plot_from_json(tmp_path):
    configs = exp.trials("quick", 0)
    results = json.loads(json.dumps([(c, exp.run_trial(c, 0)) for c in configs]))
    out = exp.summarise(results, "quick")
    by_id = judged(out, "quick")
    assert set(by_id) == {"highway_gates_mostly_carry", "highway_accuracy_vs_residual"}
    assert all(c["agrees"] is None for c in by_id.values())  # pinned to default
    final = {c["kind"]: d["test_acc"][-1] for c, d in results}
    assert by_id["highway_accuracy_vs_residual"]["measured"] == pytest.approx(
        100 * (final["highway"] - final["resnet"]))
    gate = next(d["gate"] for c, d in results if c["kind"] == "highway")
    assert by_id["highway_gates_mostly_carry"]["measured"] == pytest.approx(np.mean(gate))
    assert len(gate) == 3 and all(0 < t < 1 for t in gate)
    names = exp.plot(json.loads(json.dumps(out["data"])), tmp_path)
    assert names == ["highway_vs_residual.png"] and (tmp_path / names[0]).stat().st_size > 0


@pytest.mark.backends("numpy")
def test_gates_mostly_carry_after_training_at_small_scale():
    """n = 1, width 0.25, 4 epochs: the carry rule holds (mean T below 0.5)."""
    seed = training.net_seed(0)
    c = {"kind": "highway", "replicate": 0, "train_seed": seed,
         "train": training.config(1, width=0.25, epochs=4, block="highway", gate_bias=-2.0)}
    d = exp.run_trial(c, 0)
    assert d["test_acc"][-1] > 0.5
    carry = exp.summarise([(c, d)], "default")["claims"][0]
    assert carry["id"] == "highway_gates_mostly_carry"
    assert claims.judge(carry, "default")["agrees"]
