"""Linear multistep samplers on the velocity: iPNDM (Adams-Bashforth weights up to fourth order) and DEIS
(weights integrated over the VP exponential integrator, third order).

ComfyUI comfy/k_diffusion/sampling.py (sample_ipndm, sample_deis) and comfy/k_diffusion/deis.py
(get_deis_coeff_list, 'tab' mode) at commit a125cd84b054a57729b5eecab930ca9408719832, both taken there from
zju-pi/diff-sampler. The order ramps up from the first step of the run; the step to sigma 0 is first order.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .base import Model, Sampler

# iPNDM's weights for the current and the earlier velocities, newest first, by order.
_IPNDM = {1: (1,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


class _VelocityHistory(Sampler):
    max_order = 4

    def __init__(self, sigmas, noise=None, **kwargs):
        super().__init__(sigmas, noise, **kwargs)
        self._vs: list[mx.array] = []  # earlier steps' velocities, newest first
        self._start: int | None = None

    def _push(self, v: mx.array) -> None:
        self._vs = [v] + self._vs[: self.max_order - 2]


class IPNDMSampler(_VelocityHistory):
    """sample_ipndm (max_order 4): the first step taken is Euler, the last returns the denoised estimate."""

    def step(self, i: int, x: mx.array, v: mx.array, model: Model | None = None) -> mx.array:
        sigma, sigma_next = self._sigma(i)
        order = min(self.max_order, len(self._vs) + 1)
        if sigma_next == 0:
            out = x - sigma * v
        else:
            weights = _IPNDM[order]
            d = weights[0] * v
            for w, old in zip(weights[1:], self._vs, strict=False):
                d = d + w * old
            out = x + (sigma_next - sigma) * d
        self._push(v)
        return out


class DEISSampler(_VelocityHistory):
    """sample_deis (max_order 3, 'tab'): weights from the run's own schedule (img2img: the part it runs)."""

    max_order = 3

    def __init__(self, sigmas, noise=None, **kwargs):
        super().__init__(sigmas, noise, **kwargs)
        self._coeffs: list[list[float]] | None = None

    def step(self, i: int, x: mx.array, v: mx.array, model: Model | None = None) -> mx.array:
        if self._coeffs is None:
            self._start = i
            self._coeffs = deis_coefficients(self.sigmas[i:], self.max_order)
        sigma, sigma_next = self._sigma(i)
        order = 1 if sigma_next <= 0 else min(self.max_order, len(self._vs) + 1)
        if order == 1:
            out = x + (sigma_next - sigma) * v
        else:
            c = self._coeffs[i - self._start]
            out = x + c[0] * v
            for w, old in zip(c[1:], self._vs, strict=False):
                out = out + w * old
        self._push(v)
        return out


def deis_coefficients(sigmas: np.ndarray, max_order: int, n: int = 10000) -> list[list[float]]:
    """deis.get_deis_coeff_list 'tab': each step's weights are the integrals, over the VP time t that the
    sigmas map to (edm2t: EDM's VP fit, sigma 0.002..80), of the exponential-integrator kernel times the
    Lagrange polynomials through the earlier steps' times (a Riemann sum of n points, as there). The
    d log(alpha)/dt that ComfyUI gets by autograd is written out. Entries for first-order steps are empty."""
    eps_s, sigma_min, sigma_max = 1e-3, 0.002, 80.0
    beta_d = 2 * (np.log(sigma_min**2 + 1) / eps_s - np.log(sigma_max**2 + 1)) / (eps_s - 1)
    beta_min = np.log(sigma_max**2 + 1) - 0.5 * beta_d
    s = np.asarray(sigmas, np.float64)
    t_steps = (np.sqrt(beta_min**2 + 2 * beta_d * np.log(s**2 + 1)) - beta_min) / beta_d
    beta_0, beta_1 = beta_min, beta_d + beta_min
    coeffs = []
    for i in range(len(t_steps) - 1):
        order = min(i + 1, max_order)
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        if order == 1 or s[i + 1] <= 0:  # the step to 0 is first order (its kernel is unbounded at t = 0)
            coeffs.append([])
            continue
        taus = np.linspace(t_cur, t_next, n)
        dtau = (t_next - t_cur) / n
        alpha = np.exp(-0.5 * taus**2 * (beta_1 - beta_0) - taus * beta_0)
        d_log_alpha = -taus * (beta_1 - beta_0) - beta_0
        integrand = -0.5 * d_log_alpha / np.sqrt(alpha * (1 - alpha))
        prev = t_steps[[i - k for k in range(order)]]
        row = []
        for j in range(order):
            poly = np.ones_like(taus)
            for k in range(order):
                if k != j:
                    poly = poly * (taus - prev[k]) / (prev[j] - prev[k])
            row.append(float(np.sum(integrand * poly) * dtau))
        coeffs.append(row)
    return coeffs
