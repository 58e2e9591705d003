"""The PyTorch twin: the post-order CIFAR ResNet and its cases written in ``torch.nn``.

The ``torch`` module is passed in (imported by :func:`~miniresnet.bench.runner.import_libs`,
which also sets its thread count), so this module imports without PyTorch installed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from miniresnet import nn
from miniresnet.bench.measure import Fn


def torch_resnet(torch: Any, model: Any) -> Any:
    """A PyTorch module computing exactly ``model`` (post-order ``resnet_cifar``, or one
    :class:`~miniresnet.nn.BasicBlock`), with the same parameter names and order; weights are
    not copied (see :func:`load_torch`)."""
    tnn = torch.nn
    ours_dtype = np.dtype(next(iter(model.parameters())).raw.dtype).name
    dtype = {"float64": torch.float64, "float32": torch.float32}[ours_dtype]

    def conv(m: Any) -> Any:
        return tnn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                          bias=m.bias is not None, dtype=dtype)

    def bn(m: Any) -> Any:
        return tnn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum, dtype=dtype)

    class Block(tnn.Module):
        def __init__(self, b: Any) -> None:
            super().__init__()
            self.layers = tnn.ModuleList([conv(m) for m in b.layers])
            self.norms = tnn.ModuleList([bn(m) for m in b.norms])
            self.shortcut = (tnn.Sequential(conv(b.shortcut[0]), bn(b.shortcut[1]))
                             if isinstance(b.shortcut, nn.Sequential) else tnn.Identity())

        def forward(self, x: Any) -> Any:
            f = torch.relu(self.norms[0](self.layers[0](x)))
            f = self.norms[1](self.layers[1](f))
            return torch.relu(f + self.shortcut(x))

    if isinstance(model, nn.BasicBlock):
        return Block(model)

    class Pool(tnn.Module):
        def forward(self, x: Any) -> Any:
            return x.mean(dim=(2, 3))

    class Net(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = tnn.Sequential(conv(model.stem[0]), bn(model.stem[1]), tnn.ReLU())
            self.blocks = tnn.Sequential(*(Block(b) for b in model.blocks))
            lin = model.head[1]
            self.head = tnn.Sequential(Pool(), tnn.Linear(lin.in_features, lin.out_features,
                                                          dtype=dtype))

        def forward(self, x: Any) -> Any:
            return self.head(self.blocks(self.stem(x)))

    return Net()


def load_torch(torch: Any, tmodel: Any, weights: dict[str, np.ndarray],
               buffers: dict[str, np.ndarray] | None = None) -> list[Any]:
    """Copy ``weights`` (our names) into ``tmodel``; return its parameters in our order."""
    params = dict(tmodel.named_parameters())
    if set(params) != set(weights):
        raise ValueError(f"parameter names differ: {sorted(set(params) ^ set(weights))}")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(torch.from_numpy(np.ascontiguousarray(v)))
        own = dict(tmodel.named_buffers())
        for k, v in (buffers or {}).items():
            own[k].copy_(torch.from_numpy(np.ascontiguousarray(v)))
    return [params[k] for k in weights]


# -- the cases (see miniresnet.bench.ours) --------------------------------------------------------
def train_step(torch: Any, model: Any, weights: dict[str, np.ndarray], x: np.ndarray,
               y: np.ndarray) -> Fn:
    """Forward, cross-entropy and backward of ``model``'s twin holding ``weights``; the call
    returns the loss and the gradients in ``weights`` order."""
    tmodel = torch_resnet(torch, model)
    tparams = load_torch(torch, tmodel, weights)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    cross_entropy = torch.nn.functional.cross_entropy

    def step() -> list:
        tmodel.zero_grad(set_to_none=True)
        loss = cross_entropy(tmodel(tx), ty)
        loss.backward()
        return [loss.detach()] + [p.grad for p in tparams]

    return step


def block_jacobian(torch: Any, block: Any, weights: dict[str, np.ndarray],
                   buffers: dict[str, np.ndarray], x: np.ndarray) -> Fn:
    """The Jacobian of the eval-mode twin of ``block`` (``weights``, running statistics
    ``buffers``) with respect to its input, at ``x``, by ``torch.func.jacrev``."""
    tblock = torch_resnet(torch, block)
    load_torch(torch, tblock, weights, buffers)
    tblock.eval()
    tx = torch.from_numpy(x)
    tjac = torch.func.jacrev(tblock)

    def jacobian() -> list:
        with torch.no_grad():
            return [tjac(tx)]

    return jacobian


def to_host(result: list) -> list[np.ndarray]:
    """The NumPy arrays of one call's result (outside the timed call)."""
    return [r.detach().numpy() for r in result]
