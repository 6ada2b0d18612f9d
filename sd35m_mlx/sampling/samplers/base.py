"""What every sampler shares: the schedule it steps along, its step protocol, and the sigma arithmetic of
ComfyUI's flow-matching ("CONST") model sampling that several of them use.

A sampler lives for one run and takes steps in order from any start index (img2img starts part-way; a
sampler's history begins at its first step, as ComfyUI's runs over the sliced schedule). Step i gets the
latents x at sigmas[i], the velocity v the loop evaluated there, and `model(x, sigma) -> velocity` for any
further evaluations (heun, dpm_2, ...); it returns the latents at sigmas[i + 1]. Samplers that draw fresh
noise (ancestral, SDE, LCM) call `noise(shape)` once per draw, as ComfyUI's `default_noise_sampler` does;
given `brownian`, the SDE samplers take theirs from it instead, as ComfyUI's Brownian tree (sampling/brownian.py).

Reference: ComfyUI comfy/k_diffusion/sampling.py and comfy/model_sampling.py at commit
a125cd84b054a57729b5eecab930ca9408719832.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import mlx.core as mx
import numpy as np

Model = Callable[[mx.array, float], mx.array]  # (latents, sigma) -> velocity
Noise = Callable[[tuple[int, ...]], mx.array]  # shape -> standard normal draw (float32), one draw per call
# (shape, sigma_min, sigma_max) -> noise(sigma, sigma_next): the SDE samplers' noise over [sigma_min, sigma_max]
Brownian = Callable[[tuple[int, ...], float, float], Callable[[float, float], mx.array]]


class Sampler:
    """Base class: `step(i, x, v, model)` moves x from sigmas[i] to sigmas[i + 1].

    Class attributes the pipeline reads: `discard_penultimate_sigma` (ComfyUI's KSampler then builds the
    schedule for steps + 1 and drops its penultimate sigma, `sampler_schedule`), `needs_noise` (the sampler
    draws fresh noise: `noise` is required). `brownian`, where given, is the SDE samplers' noise source.
    """

    discard_penultimate_sigma: ClassVar[bool] = False
    needs_noise: ClassVar[bool] = False
    random_inpaint_noise: ClassVar[bool] = False  # inpainting: the model sees the known region noised by seed + 1

    def __init__(
        self,
        sigmas: Sequence[float] | np.ndarray,
        noise: Noise | None = None,
        *,
        shift: float = 3.0,
        brownian: Brownian | None = None,
    ):
        self.sigmas = np.array(sigmas, dtype=np.float32)  # the loop steps along these (a copy: some adjust it)
        self.noise = noise
        self.brownian = brownian
        self.shift = shift  # the model's schedule shift (ComfyUI's ModelSamplingSD3), for percent_to_sigma

    def step(self, i: int, x: mx.array, v: mx.array, model: Model | None = None) -> mx.array:
        raise NotImplementedError

    def extra_sigmas(self, i: int) -> tuple[float, ...]:
        """Sigmas off the schedule at which step i evaluates the model (midpoints); none by default."""
        return ()

    def model_sigmas(self, start: int = 0) -> list[float]:
        """Every sigma at which a run from step `start` evaluates the model, so its adaLN modulations can be
        computed before the loop (low_memory drops the weights that compute them)."""
        n = len(self.sigmas) - 1
        steps = range(start, n)
        return [float(self.sigmas[i]) for i in steps] + [s for i in steps for s in self.extra_sigmas(i)]

    def _sigma(self, i: int) -> tuple[float, float]:
        return float(self.sigmas[i]), float(self.sigmas[i + 1])

    def _draw(self, x: mx.array) -> mx.array:
        return self.noise(tuple(x.shape))


def half_log_snr(sigma: float) -> float:
    """log(alpha / sigma) of a flow model, alpha = 1 - sigma (ComfyUI's sigma_to_half_log_snr for CONST)."""
    return math.log((1 - sigma) / sigma)


def sigma_from_half_log_snr(lam: float) -> float:
    """The inverse: 1 / (1 + exp(lambda)) (ComfyUI's half_log_snr_to_sigma for CONST)."""
    return 1 / (1 + math.exp(lam))


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) as k-diffusion's get_ancestral_step."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def rf_ancestral(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float, float]:
    """ComfyUI's RF ancestral step (sample_euler_ancestral_RF and kin): (sigma_down, the factor alpha_next /
    alpha_down applied before renoising, the renoise coefficient)."""
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise = (sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2) ** 0.5 if alpha_down else 0.0
    return sigma_down, (alpha_next / alpha_down if alpha_down else 1.0), renoise


def offset_first_sigma(sigmas: np.ndarray, shift: float, percent: float = 1e-4) -> np.ndarray:
    """ComfyUI's offset_first_sigma_for_snr: a first sigma >= 1 (log-SNR -inf) becomes the model's sigma at
    1e-4 of the way, ModelSamplingDiscreteFlow.percent_to_sigma: shift * t / (1 + (shift - 1) * t), t = 1 - 1e-4."""
    if len(sigmas) > 1 and sigmas[0] >= 1:
        t = 1.0 - percent
        sigmas = sigmas.copy()
        sigmas[0] = t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)
    return sigmas
