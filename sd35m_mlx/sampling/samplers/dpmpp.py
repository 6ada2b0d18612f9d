"""DPM-Solver++ family and res_multistep: exponential integrators on the denoised estimate
D = x - sigma * v, single-step with a midpoint evaluation (2S ancestral, SDE) or multistep with the
previous steps' D (2M, 2M SDE, 3M SDE, res_multistep).

ComfyUI comfy/k_diffusion/sampling.py at commit a125cd84b054a57729b5eecab930ca9408719832, as its KSampler runs
them on a flow ("CONST") model: sample_dpmpp_2s_ancestral_RF, and sample_dpmpp_sde / _2m_sde / _3m_sde with the
flow's half-log-SNR lambda = log((1 - sigma) / sigma) and the first sigma moved off 1.0
(offset_first_sigma_for_snr). Defaults as there: eta 1, s_noise 1, r 1/2, the midpoint 2M SDE solver.

The SDE samplers' noise: ComfyUI draws it from a torchsde Brownian tree seeded with the seed, bounded by the
run's smallest positive and largest sigma; given `brownian`, so do these (sampling/brownian.py), else each
draw is a fresh `noise(shape)` call (ComfyUI's default_noise_sampler; the noise of rng="mlx").
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..brownian import sde_sigma_bounds
from .base import (
    Model,
    Sampler,
    ancestral_step,
    half_log_snr,
    offset_first_sigma,
    rf_ancestral,
    sigma_from_half_log_snr,
)


class DPMPP2MSampler(Sampler):
    """DPM-Solver++(2M) as in Stability's sd3_impls.sample_dpmpp_2m and ComfyUI's sample_dpmpp_2m (k-diffusion form).

    Works on the denoised estimate D = x - sigma * v with lambda = -log(sigma). The first step taken
    and the final step to sigma = 0 are first order; the others add a second-order correction with
    the previous step's D. With r = sigma_next / sigma the update reads x_next = r x + (1 - r) D',
    which is k-diffusion's (sigma_fn(t_next) / sigma_fn(t)) x - expm1(-h) D' written without logs.
    """

    def __init__(self, sigmas, noise=None, **kwargs):
        super().__init__(sigmas, noise, **kwargs)
        self._old_denoised: mx.array | None = None
        self._old_sigma: float | None = None

    def step(self, i: int, x: mx.array, v: mx.array, model: Model | None = None) -> mx.array:
        sigma, sigma_next = self._sigma(i)
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


class DPMPP2SAncestralSampler(Sampler):
    """sample_dpmpp_2s_ancestral_RF (eta 1): a DPM-Solver++(2S) step to sigma_down through the half-log-SNR
    midpoint (0.9999 when sigma is 1), then the RF renoising to sigma_next; Euler on the last step."""

    needs_noise = True
    eta = 1.0

    def _midpoint(self, sigma: float, sigma_down: float) -> float:
        if sigma == 1.0:
            return 0.9999
        lam = half_log_snr(sigma)
        return sigma_from_half_log_snr(lam + (half_log_snr(sigma_down) - lam) / 2)

    def extra_sigmas(self, i: int) -> tuple[float, ...]:
        sigma, sigma_next = self._sigma(i)
        return () if sigma_next == 0 else (self._midpoint(sigma, rf_ancestral(sigma, sigma_next, self.eta)[0]),)

    def step(self, i: int, x: mx.array, v: mx.array, model: Model | None = None) -> mx.array:
        sigma, sigma_next = self._sigma(i)
        sigma_down, rescale, renoise = rf_ancestral(sigma, sigma_next, self.eta)
        if sigma_next == 0:
            return x + (sigma_down - sigma) * v
        denoised = x - sigma * v
        sigma_s = self._midpoint(sigma, sigma_down)
        r = sigma_s / sigma
        u = r * x + (1 - r) * denoised
        denoised_s = u - sigma_s * model(u, sigma_s)
        r = sigma_down / sigma
        x = r * x + (1 - r) * denoised_s
        return rescale * x + renoise * self._draw(x)


class _HalfLogSNRSampler(Sampler):
    """The SDE samplers' shared set-up: the first sigma off 1.0, the noise of a step between two sigmas."""

    needs_noise = True
    eta = 1.0
    s_noise = 1.0

    def __init__(self, sigmas, noise=None, **kwargs):
        super().__init__(sigmas, noise, **kwargs)
        self._schedule = self.sigmas  # as given: ComfyUI bounds its tree before moving the first sigma
        self.sigmas = offset_first_sigma(self.sigmas, self.shift)
        self._between = None  # the run's Brownian noise, made at its first draw

    def _draw_between(self, i: int, x: mx.array, sigma: float, sigma_next: float) -> mx.array:
        """Step i's noise from sigma to sigma_next. The first draw comes at the run's first step (every step
        but the last draws), so the tree spans the sigmas from there on, as ComfyUI's run over the sliced
        schedule does."""
        if self.brownian is None:
            return self._draw(x)
        if self._between is None:
            self._between = self.brownian(tuple(x.shape), *sde_sigma_bounds(self._schedule[i:]))
        return self._between(sigma, sigma_next)


def _midpoint_f32(sigma: float, sigma_next: float, r: float) -> float:
    """dpmpp_sde's midpoint sigma in ComfyUI's float32 operations (-logit, lambda_s + r h, sigmoid of -lambda),
    the time its first draw asks the tree for. The tree rounds times to 6 decimals: a float64 midpoint lands
    on another microsecond than ComfyUI's in 1.8% of steps, this one in 0.06% (our log and exp are correctly
    rounded, torch's SLEEF ones within 1 ulp), and that draw then differs by the noise of one microsecond."""
    f = np.float32

    def lam(s):
        s = f(s)
        return -f(math.log(s / (f(1) - s)))

    lam_s = lam(sigma)
    lam_s1 = lam_s + f(r) * (lam(sigma_next) - lam_s)
    return float(f(1) / (f(1) + f(math.exp(lam_s1))))


class DPMPPSDESampler(_HalfLogSNRSampler):
    """sample_dpmpp_sde (eta 1, r 1/2): DPM-Solver++ with a stochastic midpoint step at lambda + h / 2 and a
    stochastic full step, two noise draws per step; the last step returns the denoised estimate."""

    r = 0.5

    def _midpoint(self, sigma: float, sigma_next: float) -> float:
        lam_s, lam_t = half_log_snr(sigma), half_log_snr(sigma_next)
        return sigma_from_half_log_snr(lam_s + self.r * (lam_t - lam_s))

    def extra_sigmas(self, i: int) -> tuple[float, ...]:
        sigma, sigma_next = self._sigma(i)
        return () if sigma_next == 0 else (self._midpoint(sigma, sigma_next),)

    def step(self, i: int, x: mx.array, v: mx.array, model: Model | None = None) -> mx.array:
        sigma, sigma_next = self._sigma(i)
        denoised = x - sigma * v
        if sigma_next == 0:
            return denoised
        lam_s, lam_t = half_log_snr(sigma), half_log_snr(sigma_next)
        lam_s1 = lam_s + self.r * (lam_t - lam_s)
        sigma_s1 = sigma_from_half_log_snr(lam_s1)
        fac = 1 / (2 * self.r)
        alpha_s, alpha_s1, alpha_t = sigma * math.exp(lam_s), sigma_s1 * math.exp(lam_s1), sigma_next * math.exp(lam_t)
        # Step 1: to the midpoint, with noise
        sd, su = ancestral_step(math.exp(-lam_s), math.exp(-lam_s1), self.eta)
        h_ = -math.log(sd) - lam_s
        x2 = (alpha_s1 / alpha_s) * math.exp(-h_) * x - alpha_s1 * math.expm1(-h_) * denoised
        if self.eta > 0 and self.s_noise > 0:
            noise = self._draw_between(i, x, sigma, _midpoint_f32(sigma, sigma_next, self.r))
            x2 = x2 + (alpha_s1 * self.s_noise * su) * noise
        denoised_2 = x2 - sigma_s1 * model(x2, sigma_s1)
        # Step 2: the whole step with the midpoint's estimate mixed in
        sd, su = ancestral_step(math.exp(-lam_s), math.exp(-lam_t), self.eta)
        h_ = -math.log(sd) - lam_s
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * math.exp(-h_) * x - alpha_t * math.expm1(-h_) * denoised_d
        if self.eta > 0 and self.s_noise > 0:
            x = x + (alpha_t * self.s_noise * su) * self._draw_between(i, x, sigma, sigma_next)
        return x


class DPMPP2MSDESampler(_HalfLogSNRSampler):
    """sample_dpmpp_2m_sde (eta 1, midpoint solver): the 2M correction with the previous step's D plus fresh
    noise each step; the last step returns the denoised estimate."""

    def __init__(self, sigmas, noise=None, **kwargs):
        super().__init__(sigmas, noise, **kwargs)
        self._history: list[tuple[mx.array, float]] = []  # (D, h) of earlier steps, newest first

    def _correction(self, denoised, h, h_eta, alpha_t, phi):
        if not self._history:
            return 0.0
        old, h_last = self._history[0]
        return (0.5 * alpha_t * phi * h / h_last) * (denoised - old)

    def step(self, i: int, x: mx.array, v: mx.array, model: Model | None = None) -> mx.array:
        sigma, sigma_next = self._sigma(i)
        denoised = x - sigma * v
        h = self._history[0][1] if self._history else None  # ComfyUI keeps the last h over a final step
        if sigma_next == 0:
            x = denoised
        else:
            lam_s, lam_t = half_log_snr(sigma), half_log_snr(sigma_next)
            h = lam_t - lam_s
            h_eta = h * (self.eta + 1)
            alpha_t = sigma_next * math.exp(lam_t)
            phi = -math.expm1(-h_eta)
            x = (sigma_next / sigma * math.exp(-h * self.eta)) * x + (alpha_t * phi) * denoised
            x = x + self._correction(denoised, h, h_eta, alpha_t, phi)
            if self.eta > 0 and self.s_noise > 0:
                noise = self._draw_between(i, x, sigma, sigma_next)
                x = x + (sigma_next * math.sqrt(-math.expm1(-2 * h * self.eta)) * self.s_noise) * noise
        self._history = [(denoised, h)] + self._history[:1]
        return x


class DPMPP3MSDESampler(DPMPP2MSDESampler):
    """sample_dpmpp_3m_sde (eta 1): as 2M SDE with a third-order correction once two earlier steps exist."""

    def _correction(self, denoised, h, h_eta, alpha_t, phi):
        if not self._history:
            return 0.0
        phi_2 = -phi / h_eta + 1  # expm1(-h_eta) / h_eta + 1
        d1_0 = (denoised - self._history[0][0]) * (h / self._history[0][1])
        if len(self._history) == 1:
            return (alpha_t * phi_2) * d1_0
        (d_1, h_1), (d_2, h_2) = self._history
        r0, r1 = h_1 / h, h_2 / h
        d1_1 = (d_1 - d_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_3 = phi_2 / h_eta - 0.5
        return (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2


class ResMultistepSampler(Sampler):
    """sample_res_multistep (eta 0): the second-order multistep RES method of arXiv 2308.02157 with the
    previous step's D; Euler for the first step taken and the last."""

    def __init__(self, sigmas, noise=None, **kwargs):
        super().__init__(sigmas, noise, **kwargs)
        self._old: tuple[mx.array, float, float] | None = None  # (D, sigma, sigma_down) of the previous step

    def step(self, i: int, x: mx.array, v: mx.array, model: Model | None = None) -> mx.array:
        sigma, sigma_next = self._sigma(i)
        denoised = x - sigma * v
        sigma_down = sigma_next  # eta 0: no ancestral noise (ComfyUI adds its draw times sigma_up = 0)
        old, self._old = self._old, (denoised, sigma, sigma_down)
        if sigma_down == 0 or old is None:
            return x + (sigma_down - sigma) * v
        old_denoised, sigma_prev, old_sigma_down = old
        t, t_old, t_next, t_prev = (-math.log(s) for s in (sigma, old_sigma_down, sigma_down, sigma_prev))
        h = t_next - t
        c2 = (t_prev - t_old) / h
        phi1 = math.expm1(-h) / -h
        phi2 = (phi1 - 1.0) / -h
        b1, b2 = np.nan_to_num([phi1 - phi2 / c2, phi2 / c2], nan=0.0)
        return math.exp(-h) * x + h * (float(b1) * denoised + float(b2) * old_denoised)
