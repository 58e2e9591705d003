"""Sequential item assignment and slicing; re-assigning a registered name keeps its place."""

import numpy as np
import pytest

import miniresnet as mr
from miniresnet import nn


def host(x):
    return mr.to_numpy(x.raw if isinstance(x, mr.Tensor) else x)


def data(backend, shape, seed=0):
    return backend.asarray(np.random.default_rng(seed).normal(size=shape), "float64")


def same(xs, ys):
    xs, ys = list(xs), list(ys)
    return len(xs) == len(ys) and all(a is b for a, b in zip(xs, ys))


def three():
    return nn.Linear(3, 4, rng=0), nn.ReLU(), nn.Linear(4, 2, rng=1)


def test_item_assignment_replaces_in_place(backend):
    a, b, c = three()
    seq = nn.Sequential(a, b, c)
    new = nn.Linear(3, 4, rng=7)
    seq[0] = new
    assert len(seq) == 3 and seq[0] is new and same(seq, [new, b, c])
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [n for n, _ in seq.named_parameters()] == names
    assert list(seq.state_dict()) == names
    assert same(seq.parameters(), [new.weight, new.bias, c.weight, c.bias])
    x = data(backend, (5, 3))
    np.testing.assert_array_equal(host(seq(x)), host(c(b(new(x)))))
    last = nn.Linear(4, 6, rng=2)
    seq[-1] = last
    assert seq[2] is last and seq[-1] is last and same(seq, [new, b, last])
    assert seq(x).shape == (5, 6)
    seq[np.int64(1)] = nn.Tanh()
    np.testing.assert_array_equal(host(seq(x)), host(last(mr.tanh(new(x)))))


def test_setattr_of_an_existing_name_keeps_its_place(backend):
    a, b, c = three()
    seq = nn.Sequential(a, b, c)
    tanh = nn.Tanh()
    setattr(seq, "1", tanh)
    assert same(seq, [a, tanh, c]) and list(seq._modules) == ["0", "1", "2"]
    x = data(backend, (5, 3))
    np.testing.assert_array_equal(host(seq(x)), host(c(mr.tanh(a(x)))))
    # a parameter and a buffer re-assigned keep their places too
    lin = nn.Linear(3, 4, rng=0)
    lin.weight = nn.parameter(backend.asarray(np.zeros((4, 3)), "float64"))
    assert [n for n, _ in lin.named_parameters()] == ["weight", "bias"]
    bn = nn.BatchNorm1d(4)
    bn.running_mean = backend.asarray(np.ones(4), "float64")
    assert [n for n, _ in bn.named_buffers()] == ["running_mean", "running_var"]
    # a registered name is not shadowed by an earlier plain attribute of that name
    m = nn.Identity()
    m.extra = 3
    relu = nn.ReLU()
    m.extra = relu
    assert m.extra is relu and same(m.children(), [relu])


def test_replacing_parts_of_a_network_keeps_the_state_dict_order(backend):
    model = nn.mlp(3, 5, seed=0)
    keys = list(model.state_dict())
    other = nn.mlp(3, 5, seed=1)
    model.blocks[1] = other.blocks[1]
    model.stem = other.stem
    assert list(model.state_dict()) == keys
    assert same(model.blocks, [model.blocks[0], other.blocks[1], model.blocks[2]])
    x = data(backend, (4, 1))
    h = other.stem(x)
    for block in model.blocks:
        h = block(h)
    np.testing.assert_array_equal(host(model(x)), host(model.head(h)))
    # the state dict loads back into a model built in the ordinary order
    fresh = nn.mlp(3, 5, seed=2)
    fresh.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(host(fresh(x)), host(model(x)))


def test_index_errors(backend):
    seq = nn.Sequential(*three())
    for i in (3, -4):
        with pytest.raises(IndexError, match=rf"Sequential index {i} is out of range for "
                                             r"length 3"):
            seq[i]
        with pytest.raises(IndexError, match=rf"index {i} is out of range for length 3"):
            seq[i] = nn.ReLU()
    with pytest.raises(TypeError, match="Sequential items must be Modules, got str"):
        seq[0] = "relu"
    with pytest.raises(TypeError, match="Sequential items must be Modules, got function"):
        seq[0] = mr.tanh
    with pytest.raises(TypeError, match="integers or slices, got str '0'"):
        seq["0"]
    with pytest.raises(TypeError, match="one module at a time .* not a slice"):
        seq[0:1] = nn.ReLU()
    with pytest.raises(TypeError, match="Sequential items must be Modules, got int"):
        seq.append(3)
    assert len(seq) == 3 and list(seq._modules) == ["0", "1", "2"]  # nothing changed


def test_slicing_shares_modules_and_renumbers(backend):
    l1, l2, l3 = (nn.Linear(3, 3, rng=i) for i in range(3))
    relu, tanh = nn.ReLU(), nn.Tanh()
    seq = nn.Sequential(l1, relu, l2, tanh, l3)
    part = seq[1:4]
    assert type(part) is nn.Sequential and len(part) == 3 and same(part, [relu, l2, tanh])
    assert [n for n, _ in part.named_parameters()] == ["1.weight", "1.bias"]
    assert same(part.parameters(), [l2.weight, l2.bias])  # shared, not copied
    x = data(backend, (2, 3))
    np.testing.assert_array_equal(host(part(x)), host(tanh(l2(relu(x)))))
    np.testing.assert_array_equal(host(seq[2:](seq[:2](x))), host(seq(x)))
    assert same(seq[::-1], [l3, tanh, l2, relu, l1]) and same(seq[-2:], [tanh, l3])
    assert len(seq[5:]) == 0 and seq[5:](x) is x
    seq.eval()
    assert not seq[1:3].training
    # a network split into its blocks' halves computes the same output
    model = nn.resnet_cifar(2, width=0.25, in_channels=1, seed=3)
    x = data(backend, (2, 1, 8, 8))
    first, rest = model.blocks[:1], model.blocks[1:]
    assert len(first) + len(rest) == len(model.blocks)
    np.testing.assert_array_equal(host(model.head(rest(first(model.stem(x))))), host(model(x)))
