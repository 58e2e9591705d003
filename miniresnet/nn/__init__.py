"""Neural-network modules: layers, blocks (residual, plain, highway, dense) and models."""

from miniresnet.nn import init
from miniresnet.nn.blocks import (
    ORDERS,
    BasicBlock,
    DenseBlock,
    HighwayBlock,
    ResidualBlock,
    ZeroPadShortcut,
)
from miniresnet.nn.layers import (
    Activation,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    CReLU,
    Flatten,
    GlobalAvgPool2d,
    Identity,
    IdentityActivation,
    LeakyReLU,
    Linear,
    ReLU,
    Sigmoid,
    Tanh,
)
from miniresnet.nn.models import (
    Network,
    build_model,
    mlp,
    resnet_cifar,
    state_count,
    state_shapes,
    validate_config,
)
from miniresnet.nn.module import (
    Module,
    RemovableHandle,
    Sequential,
    frozen_stats,
    functional_call,
    parameter,
)

__all__ = [
    "ORDERS", "BasicBlock", "BatchNorm1d", "BatchNorm2d", "Conv2d", "DenseBlock", "Flatten",
    "GlobalAvgPool2d", "HighwayBlock", "Identity", "Linear", "Module", "Network", "ReLU",
    "RemovableHandle", "ResidualBlock", "Sequential", "Sigmoid", "Tanh", "ZeroPadShortcut",
    "build_model", "frozen_stats", "functional_call", "init", "mlp", "parameter",
    "resnet_cifar", "state_count", "state_shapes", "validate_config", "Activation", "CReLU",
    "IdentityActivation", "LeakyReLU",
]
