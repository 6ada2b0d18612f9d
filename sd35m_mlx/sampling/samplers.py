"""Samplers over a flow-matching sigma schedule: x_{i+1} = step(i, x_i, v_i), v the model's velocity.

A sampler object lives for one run (DPM++ 2M remembers the previous denoised estimate). Steps must
be taken in order, but may start at any index (img2img starts part-way down the schedule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from ..defaults import SAMPLERS


class EulerSampler:
    """diffusers' FlowMatchEulerDiscreteScheduler.step: x + (sigma_next - sigma) * v."""

    def __init__(self, sigmas: Sequence[float] | np.ndarray):
        self.sigmas = np.asarray(sigmas, dtype=np.float32)

    def step(self, i: int, x: mx.array, v: mx.array) -> mx.array:
        # The difference is taken in float32, as diffusers does, so steps match it bit for bit.
        dt = float(self.sigmas[i + 1] - self.sigmas[i])
        return x + dt * v


class DPMPP2MSampler:
    """DPM-Solver++(2M) as in Stability's sd3_impls.sample_dpmpp_2m (k-diffusion form).

    Works on the denoised estimate D = x - sigma * v with lambda = -log(sigma). The first step taken
    and the final step to sigma = 0 are first order; the others add a second-order correction with
    the previous step's D. With r = sigma_next / sigma the update reads x_next = r x + (1 - r) D',
    which is k-diffusion's (sigma_fn(t_next) / sigma_fn(t)) x - expm1(-h) D' written without logs.
    """

    def __init__(self, sigmas: Sequence[float] | np.ndarray):
        self.sigmas = np.asarray(sigmas, dtype=np.float32)
        self._old_denoised: mx.array | None = None
        self._old_sigma: float | None = None

    def step(self, i: int, x: mx.array, v: mx.array) -> mx.array:
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        denoised = x - sigma * v
        if self._old_denoised is None or sigma_next == 0:
            d = denoised
        else:
            h = math.log(sigma / sigma_next)
            h_last = math.log(self._old_sigma / sigma)
            c = h / (2 * h_last)  # 1 / (2 r) with r = h_last / h
            d = (1 + c) * denoised - c * self._old_denoised
        self._old_denoised, self._old_sigma = denoised, sigma
        ratio = sigma_next / sigma
        return ratio * x + (1 - ratio) * d


_SAMPLERS = {"euler": EulerSampler, "dpmpp_2m": DPMPP2MSampler}
if tuple(_SAMPLERS) != SAMPLERS:  # the front ends offer defaults.SAMPLERS without importing mlx
    raise ImportError(f"sd35m_mlx.defaults.SAMPLERS {SAMPLERS} must name the samplers here: {tuple(_SAMPLERS)}")


def make_sampler(name: str, sigmas: Sequence[float] | np.ndarray) -> EulerSampler | DPMPP2MSampler:
    """A fresh sampler for one run over `sigmas` (length N + 1, ending in 0)."""
    try:
        cls = _SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None
    return cls(sigmas)
