"""The one parity assertion of the test suite: our output against the reference's (PyTorch / diffusers /
transformers on CPU, float32), as the largest absolute difference.

Each call states its tolerance, where it is used: `atol` on a fixed scale (pixels in [0, 1], latents), or
`rtol_of_std` x the reference's standard deviation for activations whose scale depends on random weights.
`min_std` guards the comparison itself: a flat reference would let any output pass.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np


def as_numpy(a: Any) -> np.ndarray:
    """A NumPy array from an MLX array, a torch tensor (float32: NumPy has no bfloat16) or anything array-like."""
    if isinstance(a, mx.array):
        return np.array(a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a)
    if hasattr(a, "detach"):  # torch.Tensor, without importing torch here
        return a.detach().float().numpy()
    return np.asarray(a)


def assert_close(
    actual: Any,
    expected: Any,
    *,
    atol: float | None = None,
    rtol_of_std: float | None = None,
    min_std: float | None = None,
    what: str = "output",
) -> None:
    """Same shape, finite, and max |actual - expected| <= atol, or <= rtol_of_std x std(expected) (exactly one
    of the two); with `min_std`, the reference must vary more than that for the check to mean anything."""
    if (atol is None) == (rtol_of_std is None):
        raise TypeError("assert_close: give exactly one of atol and rtol_of_std")
    actual, expected = as_numpy(actual), as_numpy(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != reference {expected.shape}"
    assert np.isfinite(actual).all(), f"{what}: not finite"
    scale = float(expected.std())
    if min_std is not None:
        assert scale > min_std, (
            f"{what}: reference is flat (std {scale:.3g} <= {min_std}), the comparison is meaningless"
        )
    err = float(np.abs(actual - expected).max())
    if atol is not None:
        assert err <= atol, f"{what}: max abs difference {err:.3g} > {atol}"
    else:
        assert err <= rtol_of_std * scale, f"{what}: max abs difference {err:.3g} > {rtol_of_std} x std {scale:.3g}"
