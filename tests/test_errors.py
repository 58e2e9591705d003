"""Bad input gets a clear error that names the op and the shapes, dtypes or values involved."""

import re

import numpy as np
import pytest

import miniresnet as mr
import miniresnet.functional as F
from miniresnet import nn
from miniresnet.backends import BackendUnavailable, is_available


def arr(backend, shape, dtype="float64"):
    return backend.asarray(np.ones(shape, dtype=dtype), dtype)


def test_shape_mismatch_add_matmul(backend):
    with pytest.raises(ValueError, match=r"add: shapes \(2, 3\), \(4,\) cannot be broadcast"):
        mr.add(arr(backend, (2, 3)), arr(backend, (4,)))
    with pytest.raises(ValueError, match=r"matmul: shapes \(5, 3\) and \(4, 2\) are not aligned"):
        mr.matmul(arr(backend, (5, 3)), arr(backend, (4, 2)))
    with pytest.raises(ValueError, match="matmul: both operands need at least 2 axes"):
        mr.matmul(arr(backend, (3,)), arr(backend, (3, 2)))
    with pytest.raises(ValueError, match="reshape: cannot reshape a tensor of shape"):
        mr.reshape(arr(backend, (2, 3)), (4, 2))


def test_conv2d_errors(backend):
    x, w = arr(backend, (2, 3, 5, 5)), arr(backend, (4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"conv2d: input has 3 channels \(shape \(2, 3, 5, 5\)\)"
                                         r" but weight of shape \(4, 2, 3, 3\) expects 2"):
        F.conv2d(x, w)
    with pytest.raises(TypeError, match="conv2d: input must be floating point.*int64"):
        F.conv2d(arr(backend, (2, 3, 5, 5), "int64"), arr(backend, (4, 3, 3, 3)))
    with pytest.raises(ValueError, match=r"conv2d: expected input \(N, C, H, W\)"):
        F.conv2d(arr(backend, (3, 5, 5)), w)
    with pytest.raises(ValueError, match="does not fit input of spatial size"):
        F.conv2d(arr(backend, (1, 2, 2, 2)), arr(backend, (1, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"conv2d: bias shape \(3,\) != \(4,\)"):
        F.conv2d(arr(backend, (2, 2, 5, 5)), w, arr(backend, (3,)))


BAD_GEOMETRY = [  # (argument, value, error): a stride is an int >= 1, a padding an int >= 0
    ("stride", 0, ValueError), ("stride", -1, ValueError), ("stride", 1.5, ValueError),
    ("stride", 2.0, ValueError), ("stride", (1, 0), ValueError), ("stride", (1, 2, 3), ValueError),
    ("stride", "2", TypeError), ("stride", True, TypeError), ("stride", None, TypeError),
    ("padding", -1, ValueError), ("padding", 0.5, ValueError), ("padding", (0, -2), ValueError),
    ("padding", "1", TypeError), ("padding", False, TypeError),
]


def _geometry_error(name, what, value):
    low = 1 if what != "padding" else 0
    return re.escape(f"{name}: {what} must be an int >= {low} or a pair of them, got {value!r}")


@pytest.mark.parametrize("what,value,error", BAD_GEOMETRY)
def test_conv2d_rejects_bad_stride_and_padding(backend, what, value, error):
    x, w = arr(backend, (1, 1, 4, 4)), arr(backend, (1, 1, 3, 3))
    with pytest.raises(error, match=_geometry_error("conv2d", what, value)):
        F.conv2d(x, w, **{what: value})
    with pytest.raises(error, match=_geometry_error("conv2d", what, value)):
        F.conv2d(object(), object(), **{what: value})  # checked before the inputs are touched
    with pytest.raises(error, match=_geometry_error("Conv2d", what, value)):
        nn.Conv2d(1, 1, 3, **{what: value})  # checked before the weights are drawn


@pytest.mark.parametrize("value", [0, -3, 2.5, (3, 0), "3"])
def test_kernel_sizes_are_checked(backend, value):
    error = TypeError if isinstance(value, str) else ValueError
    with pytest.raises(error, match=_geometry_error("Conv2d", "kernel_size", value)):
        nn.Conv2d(1, 1, value)
    with pytest.raises(error, match=_geometry_error("avg_pool2d", "kernel_size", value)):
        F.avg_pool2d(arr(backend, (1, 1, 4, 4)), value)


def test_conv_primitive_errors(backend):
    with pytest.raises(ValueError, match=r"conv: expected x .* with equal C, got shapes "
                                         r"\(1, 2, 3, 3\) and \(1, 3, 3, 3\)"):
        mr.conv(arr(backend, (1, 2, 3, 3)), arr(backend, (1, 3, 3, 3)))
    with pytest.raises(ValueError, match=r"conv_transpose: a cotangent of spatial size \(2, 2\)"
                                         r" does not match an image of size \(3, 3\)"):
        mr.conv_transpose(arr(backend, (1, 1, 2, 2)), arr(backend, (1, 1, 3, 3)), 3, 3)
    with pytest.raises(ValueError, match=r"conv_weight_grad: expected x .* with equal N"):
        mr.conv_weight_grad(arr(backend, (1, 1, 3, 3)), arr(backend, (2, 1, 1, 1)), 3, 3)
    with pytest.raises(TypeError, match="conv: operands have different dtypes"):
        mr.conv(arr(backend, (1, 1, 3, 3)), arr(backend, (1, 1, 3, 3), "float32"))


def test_dtype_mismatch_is_not_silently_cast(backend):
    with pytest.raises(TypeError, match="mul: operands have different dtypes"):
        mr.mul(arr(backend, (2,), "float32"), arr(backend, (2,), "float64"))


def test_mixed_backends(backend):
    if not is_available("array_api_strict")[0]:
        pytest.skip("array_api_strict not installed")
    other = "numpy" if backend.name != "numpy" else "array_api_strict"
    foreign = mr.get_backend(other).asarray(np.ones(3), "float64")
    with pytest.raises(TypeError, match=f"arrays from different backends.*{other}"):
        mr.add(arr(backend, (3,)), foreign)
    with pytest.raises(TypeError, match="arrays from different backends"):
        mr.matmul(arr(backend, (3, 3)), mr.get_backend(other).asarray(np.ones((3, 3)), "float64"))
    moved = mr.to_backend(foreign, backend.name)
    assert type(moved) is backend.array_type


def test_batch_norm_errors(backend):
    with pytest.raises(ValueError, match=r"batch_norm: expected more than 1 value per channel "
                                         r"when training, got input of shape \(1, 3\)"):
        F.batch_norm(arr(backend, (1, 3)), None, None, training=True)
    with pytest.raises(ValueError, match=r"weight has shape \(4,\), expected \(3,\)"):
        F.batch_norm(arr(backend, (2, 3)), None, None, arr(backend, (4,)), training=True)
    with pytest.raises(ValueError, match="evaluation mode needs running_mean"):
        F.batch_norm(arr(backend, (2, 3)), None, None)


def test_cross_entropy_errors(backend):
    logits = arr(backend, (3, 4))
    target = backend.asarray(np.array([0, 4, -1]), "int64")
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 3\] for 4 classes; "
                                         r"got values from -1 to 4"):
        F.cross_entropy(logits, target)
    with pytest.raises(TypeError, match="target must be integer class indices"):
        F.cross_entropy(logits, arr(backend, (3,)))
    with pytest.raises(ValueError, match=r"expected logits \(N, C\) and target \(N,\)"):
        F.cross_entropy(logits, backend.asarray(np.array([0, 1]), "int64"))


def test_transform_errors(backend):
    x = arr(backend, (3,))
    with pytest.raises(ValueError, match=r"grad: the function must return a scalar, got shape"):
        mr.grad(lambda x: x * 2.0)(x)
    _, fn = mr.vjp(lambda x: x * 2.0, x)
    with pytest.raises(ValueError, match=r"vjp_fn: cotangent shape \(2,\) must be the output"):
        fn(arr(backend, (2,)))
    with pytest.raises(TypeError, match="jvp: primals and tangents must be tuples"):
        mr.jvp(mr.tanh, x, x)
    with pytest.raises(TypeError, match="must be floating point to differentiate"):
        mr.grad(lambda x: mr.sum(x))(arr(backend, (3,), "int64"))


def test_indexing_errors(backend):
    with pytest.raises(IndexError, match="only basic indexing"):
        mr.getitem(arr(backend, (3,)), [0, 1])
    with pytest.raises(ValueError, match="sum: axis 2 is out of range"):
        mr.sum(arr(backend, (3, 2)), axis=2)


def test_unavailable_backend_says_why_and_how():
    ok, reason = is_available("cupy")
    if ok:
        pytest.skip("CuPy with a CUDA device is present here")
    with pytest.raises(BackendUnavailable, match=r'pip install -e "\.\[cuda\]"'):
        mr.use_backend("cupy")
    with pytest.raises(BackendUnavailable, match="valid names: numpy, array_api_strict, cupy"):
        mr.use_backend("torch")


def test_numpy_functions_on_traced_tensors_fail_clearly(backend):
    def f(x):
        np.zeros_like(x)
        return mr.sum(x)

    with pytest.raises(TypeError, match="traced Tensor cannot become a NumPy array"):
        mr.grad(f)(arr(backend, (3,)))
    assert np.asarray(mr.tensor([1.0, 2.0])).tolist() == [1.0, 2.0]  # constants convert
