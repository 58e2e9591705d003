"""Modules, blocks and models: every variant computes exactly the formula it claims."""

import numpy as np
import pytest

import miniresnet as mr
import miniresnet.functional as F
from miniresnet import nn


def host(x):
    return mr.to_numpy(x)


def data(backend, shape, seed=0):
    return backend.asarray(np.random.default_rng(seed).normal(size=shape), "float64")


# -- Module ---------------------------------------------------------------------------------------
def test_module_registration_and_state(backend):
    m = nn.Sequential(nn.Linear(3, 4, rng=0), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2, rng=1))
    names = [n for n, _ in m.named_parameters()]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    assert [n for n, _ in m.named_buffers()] == ["1.running_mean", "1.running_var"]
    assert m.num_parameters() == 3 * 4 + 4 + 4 + 4 + 4 * 2 + 2
    assert all(p.requires_grad for p in m.parameters())
    state = m.state_dict()
    assert set(state) == set(names) | {"1.running_mean", "1.running_var"}
    m.eval()
    assert not any(mod.training for mod in m.modules())
    m.train()
    assert all(mod.training for mod in m.modules())
    text = repr(m)
    assert "Linear(3, 4, bias=True)" in text and "BatchNorm1d(4" in text


def test_load_state_dict_round_trip_and_errors(backend):
    a, b = nn.mlp(2, 5, seed=0), nn.mlp(2, 5, seed=1)
    x = data(backend, (4, 1))
    assert not np.array_equal(host(a(x).raw), host(b(x).raw))
    b.load_state_dict({k: mr.to_numpy(v) for k, v in a.state_dict().items()})
    np.testing.assert_array_equal(host(a(x).raw), host(b(x).raw))
    state = dict(a.state_dict())
    state["extra"] = state.pop("stem.weight")
    state["head.2.weight"] = backend.asarray(np.zeros((3, 3)), "float64")
    with pytest.raises(KeyError, match=r"missing keys \['stem.weight'\].*unexpected keys "
                                       r"\['extra'\].*mis-shaped keys \[head.2.weight: expected"):
        b.load_state_dict(state)


def test_functional_call_and_block_by_block(backend):
    model = nn.resnet_cifar(1, width=0.25, in_channels=1, seed=3)
    x = data(backend, (2, 1, 8, 8))
    h = model.stem(x)
    for block in model.blocks:
        h = block(h)
    np.testing.assert_array_equal(host(model.head(h).raw), host(model(x).raw))
    outs = model.block_outputs(x)
    assert len(outs) == len(model.blocks) + 1
    names = [n for n, _ in model.named_parameters()]
    params = [p.raw for p in model.parameters()]

    def loss(*ps):
        logits = nn.functional_call(model, dict(zip(names, ps)), x)
        return F.cross_entropy(logits, backend.asarray(np.array([1, 2]), "int64"))

    grads = mr.grad(loss, argnums=tuple(range(len(params))))(*params)
    model.zero_grad()
    loss(*model.parameters()).backward()
    for g, p in zip(grads, model.parameters()):
        np.testing.assert_allclose(host(g), host(p.grad), rtol=1e-12, atol=1e-14)


# -- blocks: the five orderings, plain vs residual ----------------------------------------------
def _reference(block, x):
    """The block's output computed from its own layers by the formulas in nn.blocks."""
    (l1, l2), (n1, n2) = list(block.layers), list(block.norms)
    act = F.relu
    order = block.order
    if order == "post":
        f = n2(l2(act(n1(l1(x)))))
    elif order == "bn_after_add":
        f = l2(act(n1(l1(x))))
    elif order == "relu_before_add":
        f = act(n2(l2(act(n1(l1(x))))))
    elif order == "relu_preact":
        f = n2(l2(act(n1(l1(act(x))))))
    else:
        f = l2(act(n2(l1(act(n1(x))))))
    out = f * block.beta
    if block.residual:
        out = out + block.lam * block.shortcut(x)
    if order == "post":
        out = act(out)
    if order == "bn_after_add":
        out = act(n2(out))
    return out


@pytest.mark.parametrize("order", nn.ORDERS)
@pytest.mark.parametrize("dense", [False, True])
def test_block_orderings_match_formulas(backend, order, dense):
    kind = nn.DenseBlock if dense else nn.BasicBlock
    shape = (6, 4) if dense else (3, 4, 5, 5)
    x = data(backend, shape)
    for residual in (True, False):
        block = kind(4, 4, residual=residual, order=order, beta=0.7, lam=1.3, rng=5)
        block.eval()  # BN with running stats: a deterministic function to compare
        np.testing.assert_array_equal(host(block(x).raw), host(_reference(block, x).raw))
        block.train()
        np.testing.assert_allclose(host(block(x).raw), host(_reference(block, x).raw),
                                   rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("order", ["relu_before_add", "relu_preact", "full_preact"])
def test_plain_differs_only_by_the_skip(backend, order):
    x = data(backend, (2, 4, 5, 5))
    res = nn.BasicBlock(4, 4, residual=True, order=order, rng=9)
    plain = nn.BasicBlock(4, 4, residual=False, order=order, rng=9)
    for a, b in zip(res.parameters(), plain.parameters()):
        np.testing.assert_array_equal(host(a), host(b))
    np.testing.assert_allclose(host((res(x) - plain(x)).raw), host(x), atol=1e-14)


def test_shortcuts_when_shape_changes(backend):
    x = data(backend, (2, 4, 6, 6))
    zp = nn.BasicBlock(4, 8, stride=2, shortcut="zero_pad", rng=0)
    s = host(zp.shortcut(x).raw)
    assert s.shape == (2, 8, 3, 3)
    np.testing.assert_array_equal(s[:, 2:6], host(x)[:, :, ::2, ::2])
    assert not s[:, :2].any() and not s[:, 6:].any()
    proj = nn.BasicBlock(4, 8, stride=2, shortcut="projection", rng=0)
    assert proj(x).shape == (2, 8, 3, 3) and len(list(proj.shortcut.parameters())) == 3
    with pytest.raises(ValueError, match="identity shortcut impossible"):
        nn.BasicBlock(4, 8, stride=2, shortcut="identity")
    assert nn.DenseBlock(4, 6, shortcut="zero_pad", rng=0)(data(backend, (3, 4))).shape == (3, 6)


def test_skipinit_fixup_and_zero_init_make_blocks_identity(backend):
    x = data(backend, (2, 1, 8, 8))
    for kwargs in ({"skipinit": 0.0, "norm": False}, {"init": "fixup", "norm": False},
                   {"zero_init_residual": True}):
        model = nn.resnet_cifar(1, width=0.5, in_channels=1, seed=1, shortcut="zero_pad",
                                **kwargs)
        h = model.stem(x)
        if kwargs.get("zero_init_residual"):
            h = F.relu(h)  # post-order blocks end with relu(x + 0)
        first = model.blocks[0]
        np.testing.assert_array_equal(host(first(h).raw), host(h.raw))
    fixup = nn.resnet_cifar(2, width=0.5, in_channels=1, init="fixup", norm=False, seed=0)
    he = nn.resnet_cifar(2, width=0.5, in_channels=1, norm=False, seed=0)
    w_fix = host(fixup.blocks[1].layers[0].weight)
    w_he = host(he.blocks[1].layers[0].weight)
    np.testing.assert_allclose(w_fix, w_he * 6 ** -0.5, rtol=1e-15)  # L=6 blocks, m=2
    assert not host(fixup.head[-1].weight).any()
    with pytest.raises(ValueError, match="zero_init_residual needs"):
        nn.resnet_cifar(1, order="full_preact", zero_init_residual=True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_scalar_parameters_train(backend, dtype):
    """A 0-d parameter (SkipInit's α) stays usable after SGD steps; NumPy turns 0-d results
    into NumPy scalars, which must not count as another backend."""
    from miniresnet.optim import SGD

    model = nn.resnet_cifar(1, width=0.25, in_channels=1, norm=False, skipinit=0.0,
                            dtype=dtype, seed=0)
    x = backend.xp.astype(data(backend, (4, 1, 8, 8)), backend.dtype(dtype))
    y = backend.asarray(np.array([0, 1, 2, 3]))
    opt = SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    alpha = model.blocks[0].alpha
    assert alpha.shape == () and alpha.dtype == backend.dtype(dtype) and host(alpha) != 0


def test_highway_block_formula(backend):
    x = data(backend, (2, 4, 5, 5))
    hw = nn.HighwayBlock(4, 4, gate_bias=-3.0, rng=2)
    np.testing.assert_array_equal(host(hw.gate.bias), np.full(4, -3.0))
    hw.eval()
    t = F.sigmoid(hw.gate(x))
    expected = t * hw.h.branch(x) + (1.0 - t) * x
    np.testing.assert_allclose(host(hw(x).raw), host(expected.raw), rtol=1e-14)


def test_resnet_cifar_family(backend):
    m = nn.resnet_cifar(3, in_channels=1)
    weighted = [mod for name, mod in m.named_modules()
                if isinstance(mod, (nn.Conv2d, nn.Linear)) and "shortcut" not in name]
    assert len(weighted) == 6 * 3 + 2  # ResNet-20
    assert len(m.blocks) == 9
    assert m.config["model"] == "resnet_cifar" and m.config["n"] == 3
    rebuilt = nn.build_model(m.config)
    for a, b in zip(m.parameters(), rebuilt.parameters()):
        np.testing.assert_array_equal(host(a), host(b))
    plain = nn.resnet_cifar(3, in_channels=1, residual=False)
    assert len(list(plain.parameters())) < len(list(m.parameters()))  # no projections
    out = nn.resnet_cifar(1, in_channels=1, width=0.25, dtype="float32")(
        backend.asarray(np.zeros((2, 1, 8, 8)), "float32"))
    assert out.shape == (2, 10) and out.dtype == backend.dtype("float32")


def test_construction_errors(backend):
    with pytest.raises(ValueError, match="unknown order 'pre'; valid: post, bn_after_add"):
        nn.BasicBlock(4, 4, order="pre")
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        nn.mlp(2, 4, activation="gelu")
    with pytest.raises(ValueError, match="unknown initialiser 'kaiming'"):
        nn.Linear(2, 2, init="kaiming")
    with pytest.raises(ValueError, match="unknown block 'bottleneck'"):
        nn.resnet_cifar(1, block="bottleneck")


def test_initialiser_statistics(backend):
    from miniresnet.nn import init

    rng = backend.rng(0)
    w = mr.to_numpy(init.he_normal(rng, (400, 100, 3, 3)))
    assert w.std() == pytest.approx((2 / 900) ** 0.5, rel=0.01)
    w = mr.to_numpy(init.xavier_normal(rng, (300, 500)))
    assert w.std() == pytest.approx((2 / 800) ** 0.5, rel=0.01)
    q = mr.to_numpy(init.orthogonal(rng, (8, 2, 3, 3))).reshape(8, 18)
    np.testing.assert_allclose(q @ q.T, np.eye(8), atol=1e-12)
    q = mr.to_numpy(init.orthogonal(rng, (20, 5), gain=2.0))
    np.testing.assert_allclose(q.T @ q, 4 * np.eye(5), atol=1e-12)
    same = [mr.to_numpy(nn.Linear(3, 3, rng=7).weight) for _ in range(2)]
    np.testing.assert_array_equal(*same)


def test_eval_batch_norm_rounds_the_same_with_and_without_a_derivative(backend):
    """Evaluation-mode batch norm uses one formula whether or not a derivative is being taken,
    so its forward values are bit-identical under vjp and jvp."""
    rng = np.random.default_rng(3)
    x = backend.asarray(rng.normal(size=(4, 3, 2, 2)) * 1e3 + 7.0, "float64")
    rm, rv = (backend.asarray(v, "float64") for v in (rng.normal(size=3), rng.random(3) + 0.5))
    w, b = (backend.asarray(v, "float64") for v in (rng.normal(size=3), rng.normal(size=3)))
    plain = host(F.batch_norm(x, rm, rv, w, b, training=False))
    under_vjp, _ = mr.vjp(lambda w: F.batch_norm(x, rm, rv, w, b, training=False), w)
    under_jvp, _ = mr.jvp(lambda x: F.batch_norm(x, rm, rv, w, b, training=False), (x,), (x,))
    np.testing.assert_array_equal(host(under_vjp), plain)
    np.testing.assert_array_equal(host(under_jvp), plain)


def test_running_statistics_that_require_grad_are_refused(backend):
    x = data(backend, (4, 3))
    mean = mr.tensor(np.zeros(3), requires_grad=True)
    with pytest.raises(ValueError, match="running statistics must not require grad"):
        F.batch_norm(x, mean, mr.ones((3,)), training=True)
