"""The demo runs and its numbers are computed, not printed from memory."""

import numpy as np
import pytest

from miniresnet import demo


def test_demo_runs(backend, capsys):
    demo.main(["--width", "16", "--seeds", "2"])
    out = capsys.readouterr().out
    assert f"backend {backend.name!r}" in out
    assert "max |J - (I + J_F)| = 0.0e+00" in out


def test_input_gradient_norm_matches_numpy(backend):
    """Recompute one measurement by hand with NumPy (depth 2, plain and residual)."""
    width, seed = 8, 3
    rng = backend.rng(seed)
    std = (2.0 / width) ** 0.5
    w1 = [backend.to_numpy(rng.normal((width, width), std=std)) for _ in range(2)]
    w2 = [backend.to_numpy(rng.normal((width, width), std=std)) for _ in range(2)]
    readout = backend.to_numpy(rng.normal((width, 1), std=width**-0.5))
    x = backend.to_numpy(rng.normal((width, 1)))
    for beta in (None, 0.5):
        h, jac = x, np.eye(width)
        for i in range(2):
            pre = w1[i] @ h
            d = np.diag((pre[:, 0] > 0).astype(float))
            if beta is None:
                h, jac = np.maximum(pre, 0), d @ w1[i] @ jac
            else:
                h = h + beta * w2[i] @ np.maximum(pre, 0)
                jac = (np.eye(width) + beta * w2[i] @ d @ w1[i]) @ jac
        expected = np.linalg.norm(readout[:, 0] @ jac)
        assert demo.input_gradient_norm(2, width, beta, seed) == pytest.approx(expected, rel=1e-12)
