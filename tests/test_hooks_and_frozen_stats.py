"""What inspection builds on: forward hooks, frozen batch statistics, a block's two terms."""

import numpy as np
import pytest

import miniresnet as mr
from miniresnet import nn


def _state(model):
    return {k: mr.to_numpy(v) for k, v in model.state_dict().items()}


def test_frozen_stats_normalises_with_the_batch_and_updates_nothing(backend):
    model = nn.resnet_cifar(1, in_channels=1, width=0.25)
    x = backend.asarray(np.random.default_rng(0).normal(size=(4, 1, 8, 8)), "float64")
    before = _state(model)
    with nn.frozen_stats(model) as m:
        assert m is model
        frozen = mr.to_numpy(model(x))
    assert all(np.array_equal(before[k], v) for k, v in _state(model).items())
    assert model.training
    trained = mr.to_numpy(model(x))  # an ordinary training-mode pass: same output, new stats
    np.testing.assert_array_equal(frozen, trained)
    assert any(not np.array_equal(before[k], v) for k, v in _state(model).items())
    with nn.frozen_stats(model):
        pass
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.track_running_stats for m in norms)


def test_frozen_stats_restores_on_error(backend):
    model = nn.mlp(2, 4)
    with pytest.raises(RuntimeError), nn.frozen_stats(model):
        raise RuntimeError
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm1d))


def test_forward_hooks_see_every_call_until_removed(backend):
    model = nn.mlp(3, 4, in_features=2)
    x = backend.asarray(np.ones((5, 2)), "float64")
    seen = []
    handles = [block.register_forward_hook(lambda m, args, out: seen.append((m, out.shape)))
               for block in model.blocks]
    model(x)
    assert [m for m, _ in seen] == list(model.blocks) and {s for _, s in seen} == {(5, 4)}
    for h in handles:
        h.remove()
    model(x)
    assert len(seen) == 3
    with model.stem.register_forward_hook(lambda m, args, out: seen.append(args)):
        model(x)
    assert len(seen) == 4 and seen[-1][0] is x
    model(x)
    assert len(seen) == 4


@pytest.mark.parametrize("order", nn.ORDERS)
@pytest.mark.parametrize("residual", [True, False])
def test_a_block_is_post_of_the_sum_of_its_terms(backend, order, residual):
    block = nn.BasicBlock(2, 4, 2, order=order, residual=residual, lam=0.7, beta=0.3,
                          skipinit=0.5, shortcut="projection", rng=1)
    x = backend.asarray(np.random.default_rng(2).normal(size=(3, 2, 6, 6)), "float64")
    with nn.frozen_stats(block):
        skip, branch = block.terms(x)
        assert (skip is None) == (not residual)
        z = branch if skip is None else skip + branch
        np.testing.assert_array_equal(mr.to_numpy(block.post(z)), mr.to_numpy(block(x)))
