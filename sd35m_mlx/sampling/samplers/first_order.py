"""Euler and its kin: one step from sigma to sigma_next along the velocity, with ancestral noise (the RF
forms ComfyUI picks for flow models), a second evaluation (heun, dpm_2), or a gradient correction.

ComfyUI comfy/k_diffusion/sampling.py at commit a125cd84b054a57729b5eecab930ca9408719832: sample_euler,
sample_euler_ancestral_RF, sample_heun, sample_dpm_2, sample_dpm_2_ancestral_RF, sample_lcm,
sample_gradient_estimation. k-diffusion's d = (x - denoised) / sigma is the model's velocity v here.
"""

from __future__ import annotations

import math

import mlx.core as mx

from .base import Model, Sampler, rf_ancestral


class EulerSampler(Sampler):
    """diffusers' FlowMatchEulerDiscreteScheduler.step (= ComfyUI's sample_euler): x + (sigma_next - sigma) * v."""

    def step(self, i: int, x: mx.array, v: mx.array, model: Model | None = None) -> mx.array:
        # The difference is taken in float32, as diffusers does, so steps match it bit for bit.
        dt = float(self.sigmas[i + 1] - self.sigmas[i])
        return x + dt * v


class DDIMSampler(EulerSampler):
    """ComfyUI's "ddim" is euler (samplers.sampler_object), with one difference for inpainting: the model sees
    the known region noised with a fresh torch.randn seeded seed + 1 instead of the initial noise
    (`random_inpaint_noise`: KSAMPLER.sample's inpaint_options "random"; editing/inpaint.py InpaintBlend)."""

    random_inpaint_noise = True


class EulerAncestralSampler(Sampler):
    """sample_euler_ancestral_RF (eta 1, s_noise 1): an Euler step down to sigma_down, then noise back up to
    sigma_next with the flow's alpha = 1 - sigma rescaling. The last step returns the denoised estimate."""

    needs_noise = True
    eta = 1.0

    def step(self, i: int, x: mx.array, v: mx.array, model: Model | None = None) -> mx.array:
        sigma, sigma_next = self._sigma(i)
        denoised = x - sigma * v
        if sigma_next == 0:
            return denoised
        sigma_down, rescale, renoise = rf_ancestral(sigma, sigma_next, self.eta)
        r = sigma_down / sigma
        x = r * x + (1 - r) * denoised
        return rescale * x + renoise * self._draw(x)


class HeunSampler(Sampler):
    """sample_heun: the Euler step's end point evaluated again, the two velocities averaged (Euler on the
    last step, to sigma 0)."""

    def step(self, i: int, x: mx.array, v: mx.array, model: Model | None = None) -> mx.array:
        sigma, sigma_next = self._sigma(i)
        dt = sigma_next - sigma
        if sigma_next == 0:
            return x + dt * v
        x2 = x + dt * v
        v2 = model(x2, sigma_next)
        return x + dt * ((v + v2) / 2)


def _log_midpoint(a: float, b: float) -> float:
    """exp(lerp(log a, log b, 1/2)) as torch computes it in sample_dpm_2."""
    la = math.log(a)
    return math.exp(la + 0.5 * (math.log(b) - la))


class DPM2Sampler(Sampler):
    """sample_dpm_2: the velocity at the log-midpoint of sigma and sigma_next drives the whole step (Euler on
    the last step). ComfyUI runs it over steps + 1 sigmas with the penultimate dropped."""

    discard_penultimate_sigma = True

    def extra_sigmas(self, i: int) -> tuple[float, ...]:
        sigma, sigma_next = self._sigma(i)
        return () if sigma_next == 0 else (_log_midpoint(sigma, sigma_next),)

    def step(self, i: int, x: mx.array, v: mx.array, model: Model | None = None) -> mx.array:
        sigma, sigma_next = self._sigma(i)
        if sigma_next == 0:
            return x + (sigma_next - sigma) * v
        mid = _log_midpoint(sigma, sigma_next)
        v2 = model(x + (mid - sigma) * v, mid)
        return x + (sigma_next - sigma) * v2


class DPM2AncestralSampler(Sampler):
    """sample_dpm_2_ancestral_RF (eta 1): dpm_2 down to sigma_down, then the RF renoising to sigma_next."""

    discard_penultimate_sigma = True
    needs_noise = True
    eta = 1.0

    def extra_sigmas(self, i: int) -> tuple[float, ...]:
        sigma, sigma_next = self._sigma(i)
        sigma_down = rf_ancestral(sigma, sigma_next, self.eta)[0]
        return () if sigma_down == 0 else (_log_midpoint(sigma, sigma_down),)

    def step(self, i: int, x: mx.array, v: mx.array, model: Model | None = None) -> mx.array:
        sigma, sigma_next = self._sigma(i)
        sigma_down, rescale, renoise = rf_ancestral(sigma, sigma_next, self.eta)
        if sigma_down == 0:
            return x + (sigma_down - sigma) * v
        mid = _log_midpoint(sigma, sigma_down)
        v2 = model(x + (mid - sigma) * v, mid)
        x = x + (sigma_down - sigma) * v2
        return rescale * x + renoise * self._draw(x)


class LCMSampler(Sampler):
    """sample_lcm: jump to the denoised estimate, then noise it to sigma_next with fresh noise (the flow's
    noise_scaling: sigma * noise + (1 - sigma) * x)."""

    needs_noise = True

    def step(self, i: int, x: mx.array, v: mx.array, model: Model | None = None) -> mx.array:
        sigma, sigma_next = self._sigma(i)
        denoised = x - sigma * v
        if sigma_next > 0:
            return sigma_next * self._draw(x) + (1.0 - sigma_next) * denoised
        return denoised


class GradientEstimationSampler(Sampler):
    """sample_gradient_estimation (ge_gamma 2): Euler plus (gamma - 1) times the change in velocity since the
    previous step; the last step returns the denoised estimate."""

    ge_gamma = 2.0

    def __init__(self, sigmas, noise=None, **kwargs):
        super().__init__(sigmas, noise, **kwargs)
        self._old_v: mx.array | None = None

    def step(self, i: int, x: mx.array, v: mx.array, model: Model | None = None) -> mx.array:
        sigma, sigma_next = self._sigma(i)
        dt = sigma_next - sigma
        old, self._old_v = self._old_v, v
        if sigma_next == 0:
            return x - sigma * v
        x = x + dt * v
        if old is not None:
            x = x + dt * ((self.ge_gamma - 1) * (v - old))
        return x
