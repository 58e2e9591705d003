"""inspect.profile, block_jacobian, stream_jacobian, lesioned, accuracy: checked against
block-by-block VJPs, the eager tape, brute-force pair counts and mr.jacobian."""

import itertools

import numpy as np
import pytest
from model_state import unchanged

import miniresnet as mr
from miniresnet import functional as F
from miniresnet import nn, ops
from miniresnet.inspect.lesion import accuracy, lesioned
from miniresnet.inspect.profile import Profile, block_jacobian, profile, stream_jacobian

MODES = ["train", "eval"]


def _data(backend, shape, seed=0):
    return backend.asarray(np.random.default_rng(seed).normal(size=shape), "float64")


def _resnet(**kw):
    kw = {"n": 1, "in_channels": 1, "width": 0.25, **kw}
    return nn.resnet_cifar(kw.pop("n"), **kw)


def _stream(model, x):
    with nn.frozen_stats(model):
        return model.block_outputs(x)


def _cotangent(model, x, seed=1):
    with nn.frozen_stats(model):
        shape = model(x).shape
    return np.random.default_rng(seed).normal(size=shape)


def _norm(a):
    return np.linalg.norm(mr.to_numpy(a))


# -- profile -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["resnet", "preact", "mlp", "plain"])
def test_profile_gradient_and_forward_norms_match_a_block_by_block_computation(
        backend, kind, mode):
    model, x = {
        "resnet": lambda: (_resnet(lam=0.8, skipinit=0.5), _data(backend, (3, 1, 4, 4))),
        "preact": lambda: (_resnet(order="full_preact", shortcut="zero_pad", activation="tanh"),
                           _data(backend, (3, 1, 4, 4))),
        "mlp": lambda: (nn.mlp(3, 4, in_features=2, out_features=3, residual=True, beta=0.5),
                        _data(backend, (5, 2))),
        "plain": lambda: (nn.mlp(3, 4, in_features=2, activation="sigmoid"),
                          _data(backend, (5, 2))),
    }[kind]()
    c = _cotangent(model, x)
    with unchanged(model, x, mode):
        p = profile(model, x, cotangent=c)
    assert isinstance(p, Profile)
    hs = _stream(model, x)
    # ∂s/∂h_l block by block: one VJP of the head, then one per block
    with nn.frozen_stats(model):
        _, head_vjp = mr.vjp(model.head, hs[-1])
        g = head_vjp(mr.to_backend(c, backend.name))[0]
        grads = [g]
        for block, h in zip(reversed(list(model.blocks)), reversed(hs[:-1])):
            g = mr.vjp(block, h)[1](g)[0]
            grads.append(g)
        value = float(mr.to_numpy(ops.sum(model(x) * mr.to_backend(c, backend.name))))
    L = len(model.blocks)
    assert p.grad_norm.shape == p.forward_norm.shape == p.forward_std.shape == (L + 1,)
    np.testing.assert_allclose(p.grad_norm, [_norm(g) for g in grads[::-1]], rtol=1e-12)
    np.testing.assert_allclose(p.forward_norm, [_norm(h) for h in hs], rtol=1e-12)
    np.testing.assert_allclose(p.forward_std, [mr.to_numpy(h).std() for h in hs], rtol=1e-12)
    assert p.value == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("labels", [True, False])
def test_profile_parameter_gradients_match_the_eager_tape_on_a_copy(backend, mode, labels):
    build = lambda: _resnet(order="bn_after_add", shortcut="projection", skipinit=0.7)  # noqa: E731
    model, copy = build(), build()
    x = _data(backend, (4, 1, 4, 4))
    y = backend.asarray(np.array([1, 0, 9, 4]), "int64") if labels else None
    c = None if labels else _cotangent(model, x)
    with unchanged(model, x, mode):
        p = profile(model, x, y, cotangent=c)
    copy.load_state_dict(model.state_dict())  # the statistics the model has now
    copy.train(mode == "train")
    out = copy(x)
    s = F.cross_entropy(out, y) if labels else ops.sum(out * mr.to_backend(c, backend.name))
    s.backward()
    named = list(copy.named_parameters())
    assert p.parameters == tuple(n for n, _ in named)
    np.testing.assert_allclose(p.param_grad_norm, [_norm(w.grad) for _, w in named], rtol=1e-10)
    np.testing.assert_allclose(p.param_norm, [_norm(w) for _, w in named], rtol=1e-14)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(p.param_ratio, p.param_grad_norm / p.param_norm, rtol=1e-14)
    assert p.value == pytest.approx(float(s.item()), rel=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_profile_counts_active_and_coactive_units_of_every_activation(backend, mode):
    model = _resnet(order="relu_preact", activation="relu")
    x = _data(backend, (5, 1, 4, 4))
    seen = []  # the pre-activations, caught by our own hooks
    names = {id(m): n for n, m in model.named_modules()}
    handles = [m.register_forward_hook(lambda m, args, out: seen.append(
        (names[id(m)], mr.to_numpy(args[0])))) for m in model.modules() if isinstance(m, nn.ReLU)]
    with unchanged(model, x, mode):
        seen.clear()
        p = profile(model, x, backend.asarray(np.arange(5), "int64"))  # with labels: no probe
        for h in handles:
            h.remove()
    assert p.activations == tuple(n for n, _ in seen) and len(seen) >= 7
    for (_, a), active, coactive in zip(seen, p.active, p.coactive):
        on = a.reshape(a.shape[0], -1) > 0
        pairs = [np.mean(on[i] & on[j]) for i, j in itertools.combinations(range(len(on)), 2)]
        assert active == pytest.approx(on.mean(), rel=1e-14)
        assert coactive == pytest.approx(np.mean(pairs), rel=1e-14)
    assert 0 < p.coactive.min() and p.coactive.max() < p.active.max() <= 1


def test_profile_of_one_sample_has_no_coactive_fraction(backend):
    p = profile(nn.mlp(2, 3, in_features=2).eval(), _data(backend, (1, 2)))
    assert np.all(np.isnan(p.coactive)) and np.all((p.active >= 0) & (p.active <= 1))


@pytest.mark.parametrize("mode", MODES)
def test_profile_skip_and_branch_norms_are_the_block_terms(backend, mode):
    x = _data(backend, (3, 1, 4, 4))
    for model in (_resnet(order="full_preact", shortcut="projection", lam=0.6, beta=0.4),
                  _resnet(residual=False), _resnet(block="highway")):
        with unchanged(model, x, mode):
            p = profile(model, x)
        hs = _stream(model, x)
        for i, block in enumerate(model.blocks):
            if isinstance(block, nn.HighwayBlock):
                assert np.isnan(p.skip_norm[i]) and np.isnan(p.branch_norm[i])
                continue
            with nn.frozen_stats(model):
                skip, branch = block.terms(hs[i])
            assert p.branch_norm[i] == pytest.approx(_norm(branch), rel=1e-14)
            if skip is None:
                assert np.isnan(p.skip_norm[i])
            else:
                assert p.skip_norm[i] == pytest.approx(_norm(skip), rel=1e-14)


def test_profile_refuses_what_is_not_a_network(backend):
    with pytest.raises(TypeError, match="inspect.profile: model must be a Network"):
        profile(nn.Linear(2, 2), _data(backend, (1, 2)))


# -- Jacobians ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_block_jacobian_is_the_jacobian_of_the_block_and_chains(backend, mode):
    model = _resnet(order="post", shortcut="zero_pad", lam=0.9)
    x = _data(backend, (2, 1, 4, 4))
    with unchanged(model, x, mode):
        jacs = [block_jacobian(model, x, i) for i in (1, 2, 3)]
        whole = stream_jacobian(model, x, 1, 3)
        tail = stream_jacobian(model, x, 2, 3)
    hs = _stream(model, x)
    for i, j in enumerate(jacs):
        assert isinstance(j, np.ndarray)
        assert j.shape == tuple(hs[i + 1].shape) + tuple(hs[i].shape)
        with nn.frozen_stats(model):
            direct = mr.to_numpy(mr.jacobian(model.blocks[i])(hs[i]))
        np.testing.assert_allclose(j, direct, rtol=1e-13, atol=1e-13 * np.abs(direct).max())

    # the chain rule: J_{1..3} = J_3 J_2 J_1, contracting each Jacobian's input axes
    inner = np.tensordot(jacs[1], jacs[0], axes=len(hs[1].shape))
    composed = np.tensordot(jacs[2], inner, axes=len(hs[2].shape))
    np.testing.assert_allclose(whole, composed, rtol=1e-12, atol=1e-12 * np.abs(whole).max())
    np.testing.assert_allclose(tail, np.tensordot(jacs[2], jacs[1], axes=len(hs[2].shape)),
                               rtol=1e-12, atol=1e-12 * np.abs(tail).max())


def test_batch_norm_in_training_mode_couples_the_samples(backend):
    model = nn.mlp(2, 3, in_features=2, residual=True)  # each block begins with BatchNorm1d
    x = _data(backend, (4, 2))
    model.train()
    coupled = block_jacobian(model, x, 1)  # (4, 3, 4, 3): sample, unit, sample, unit
    model.eval()
    separate = block_jacobian(model, x, 1)
    off = ~np.eye(4, dtype=bool)
    assert np.abs(coupled.transpose(0, 2, 1, 3)[off]).max() > 1e-3
    assert np.all(separate.transpose(0, 2, 1, 3)[off] == 0)


def test_jacobian_arguments_are_checked(backend):
    model, x = _resnet(), _data(backend, (2, 1, 4, 4))
    with pytest.raises(IndexError, match="block i=4 is out of range.*numbered 1 to 3"):
        block_jacobian(model, x, 4)
    with pytest.raises(ValueError, match="start=3 is after stop=2"):
        stream_jacobian(model, x, 3, 2)
    with pytest.raises(TypeError, match="stop must be a block index"):
        stream_jacobian(model, x, 1, "3")


# -- lesioned and accuracy ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", nn.ORDERS)
def test_lesioning_zero_branches_changes_nothing(backend, order, mode):
    model = _resnet(n=2, order=order, shortcut="projection", skipinit=0.0, lam=0.8)
    x = _data(backend, (3, 1, 4, 4))
    with unchanged(model, x, mode), nn.frozen_stats(model):
        full = mr.to_numpy(model(x))
        with lesioned(model, range(1, 7)) as m:
            assert m is model
            np.testing.assert_array_equal(mr.to_numpy(model(x)), full)


@pytest.mark.parametrize("order", nn.ORDERS)
@pytest.mark.parametrize("shortcut", ["projection", "zero_pad"])
def test_a_lesioned_block_computes_post_of_its_skip(backend, order, shortcut):
    model = _resnet(order=order, shortcut=shortcut, lam=0.7, beta=0.5)
    x = _data(backend, (3, 1, 4, 4))
    hs = _stream(model, x)
    with unchanged(model, x, "train"), nn.frozen_stats(model):
        for i, block in enumerate(model.blocks):
            skip, branch = block.terms(hs[i])
            expected = mr.to_numpy(block.post(skip))
            with lesioned(model, i + 1):
                lesion_out = mr.to_numpy(block(hs[i]))
                np.testing.assert_array_equal(lesion_out, expected)
            restored = mr.to_numpy(block(hs[i]))
            np.testing.assert_array_equal(restored, mr.to_numpy(block.post(skip + branch)))
            assert np.abs(restored - lesion_out).max() > 1e-3  # the branch mattered
            assert "forward" not in block.__dict__


def test_lesioned_plain_blocks_and_errors(backend):
    plain = nn.mlp(3, 4, in_features=2)
    x = _data(backend, (3, 2))
    with nn.frozen_stats(plain):
        hs = plain.block_outputs(x)
        with lesioned(plain, [2]):
            np.testing.assert_array_equal(mr.to_numpy(plain.blocks[1](hs[1])),
                                          mr.to_numpy(hs[1]))
    net = _resnet(residual=False)
    with pytest.raises(ValueError, match="block 2 is plain and maps 4 to 8"):
        with lesioned(net, [1, 2]):
            pass
    assert all("forward" not in b.__dict__ for b in net.blocks)  # nothing changed
    with pytest.raises(TypeError, match="block 1 is a HighwayBlock"):
        with lesioned(_resnet(block="highway"), 1):
            pass
    with pytest.raises(IndexError, match="drop=4 is out of range"):
        with lesioned(_resnet(), [4]):
            pass
    with pytest.raises(TypeError, match="drop must be"):
        with lesioned(_resnet(), 1.5):
            pass
    model = _resnet()
    with pytest.raises(RuntimeError, match="inside"):
        with lesioned(model, [1, 3]):
            raise RuntimeError("inside")
    assert all("forward" not in b.__dict__ for b in model.blocks)
    with lesioned(model, 1), lesioned(model, [1, 2]):  # nested: each restores its own
        pass
    assert all("forward" not in b.__dict__ for b in model.blocks)


@pytest.mark.parametrize("mode", MODES)
def test_accuracy_evaluates_in_eval_mode(backend, mode):
    model = _resnet(num_classes=3)
    x = _data(backend, (7, 1, 4, 4))
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    y = backend.asarray(labels, "int64")
    with unchanged(model, x, mode):
        acc = accuracy(model, (x, y), batch_size=3)
        model.eval()
        predicted = mr.to_numpy(model(x)).argmax(axis=1)
        model.train(mode == "train")
    assert isinstance(acc, float) and acc == np.mean(predicted == labels)
    with pytest.raises(TypeError, match="split must be a pair"):
        accuracy(model, x)


def test_lesioned_accuracy_falls_when_a_plain_net_loses_a_layer(backend):
    """A lesion acts on what accuracy measures: dropping a block changes the predictions."""
    model = nn.mlp(3, 8, in_features=2, out_features=4, norm=False, seed=3)
    x = _data(backend, (50, 2))
    model.eval()
    y = backend.asarray(mr.to_numpy(model(x)).argmax(axis=1), "int64")
    assert accuracy(model, (x, y)) == 1.0
    with lesioned(model, 2):
        assert accuracy(model, (x, y)) < 1.0
