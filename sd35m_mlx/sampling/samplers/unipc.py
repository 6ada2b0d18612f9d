"""UniPC, as ComfyUI runs it (comfy/extra_samplers/uni_pc.py at commit a125cd84b054a57729b5eecab930ca9408719832:
sample_unipc, multistep, data prediction, order min(3, steps - 1), lower order at the end).

ComfyUI applies it to every model as if the sigmas were variance-exploding: alpha = 1 / sqrt(1 + sigma^2),
lambda = -log(sigma), the state x / sqrt(1 + sigma^2), and the final sigma 0 replaced by 0.001. That
replacement writes into the schedule tensor itself (`timesteps = sigmas[:]` is a view), so the sampler's caller
then divides the result by 1 - 0.001 (the flow model's inverse_noise_scaling at "sigma" 0.001); both are kept
here so the picture matches.

Each step evaluates the model once, at the schedule's sigma: on the predictor's latents (which the loop
carries between steps), then corrects them with that evaluation and predicts the next step.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from .base import Model, Sampler

_LAST_SIGMA = 0.001


def _std(sigma: float) -> float:  # SigmaConvert.marginal_std
    return sigma / math.sqrt(1 + sigma * sigma)


def _alpha(sigma: float) -> float:  # SigmaConvert.marginal_alpha
    return 1 / math.sqrt(1 + sigma * sigma)


class UniPCSampler(Sampler):
    """UniPC bh1 ("uni_pc"); `UniPCBH2Sampler` is "uni_pc_bh2". ComfyUI runs both over steps + 1 sigmas with
    the penultimate dropped."""

    discard_penultimate_sigma = True
    variant = "bh1"

    def __init__(self, sigmas, noise=None, **kwargs):
        super().__init__(sigmas, noise, **kwargs)
        self._run: _Run | None = None
        self._start = 0

    def step(self, i: int, x: mx.array, v: mx.array, model: Model | None = None) -> mx.array:
        if self._run is None:
            self._run, self._start = _Run(self.sigmas[i:], self.variant), i
        return self._run.step(i - self._start, x, v)


class UniPCBH2Sampler(UniPCSampler):
    variant = "bh2"


class _Run:
    """One run over `sigmas` (the part of the schedule it runs), stepped by run index k."""

    def __init__(self, sigmas: np.ndarray, variant: str):
        ts = [float(s) for s in sigmas]
        if ts[-1] == 0:
            ts[-1] = _LAST_SIGMA
            self.final_scale = 1 / (1 - _LAST_SIGMA)  # inverse_noise_scaling at the overwritten last sigma
        else:
            self.final_scale = 1.0
        self.ts = ts
        self.steps = len(ts) - 1
        self.order = min(3, len(ts) - 2)
        self.variant = variant
        self.models: list[mx.array] = []  # data predictions (D) at the earlier times, oldest first
        self.times: list[float] = []
        self.x: mx.array | None = None  # the corrected state (VP-scaled) at the last time
        self.pending = None  # the predictor's terms for correcting at ts[k]

    def _model_space(self, x_vp: mx.array, sigma: float) -> mx.array:
        return x_vp * math.sqrt(sigma * sigma + 1.0)

    def step(self, k: int, x: mx.array, v: mx.array) -> mx.array:
        t = self.ts[k]
        denoised = x - t * v
        if k == 0:
            self.x = x / math.sqrt(1.0 + t * t)
        else:  # the corrector of the update that predicted x, with the model's estimate there
            x_t_, coeff, corr_res, rho, model_prev_0 = self.pending
            self.x = x_t_ - coeff * (corr_res + rho * (denoised - model_prev_0))
        keep = max(self.order, 1)
        self.models, self.times = (self.models + [denoised])[-keep:], (self.times + [t])[-keep:]
        if self.steps == 1:  # order 0: ComfyUI evaluates the model once and leaves x as it is
            return self._final(self.x)
        nxt = k + 1
        if nxt < self.order:
            order, corrector = nxt, True
        else:
            order, corrector = min(self.order, self.steps + 1 - nxt), nxt != self.steps
        x_t, self.pending = self._update(self.ts[nxt], order, corrector)
        if nxt == self.steps:
            return self._final(x_t)
        return self._model_space(x_t, self.ts[nxt])

    def _final(self, x_vp: mx.array) -> mx.array:
        return x_vp * (self.final_scale / _alpha(self.ts[-1]))

    def _update(self, t: float, order: int, use_corrector: bool):
        """multistep_uni_pc_bh_update with predict_x0: the predictor's x_t, and what its corrector needs."""
        t_prev_0 = self.times[-1]
        model_prev_0 = self.models[-1]
        lam_prev_0, lam_t = -math.log(t_prev_0), -math.log(t)
        h = lam_t - lam_prev_0
        rks, d1s = [], []
        for i in range(1, order):
            rk = (-math.log(self.times[-(i + 1)]) - lam_prev_0) / h
            rks.append(rk)
            d1s.append((self.models[-(i + 1)] - model_prev_0) / rk)
        rks.append(1.0)
        hh = -h
        h_phi_1 = math.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.variant == "bh1" else math.expm1(hh)
        factorial = 1
        big_r, b = [], []
        for i in range(1, order + 1):
            big_r.append(np.power(rks, i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        big_r, b = np.array(big_r), np.array(b)
        alpha_t = _alpha(t)
        x_t_ = (_std(t) / _std(t_prev_0)) * self.x - (alpha_t * h_phi_1) * model_prev_0
        coeff = alpha_t * b_h
        x_t = x_t_
        if d1s:
            rhos_p = [0.5] if order == 2 else np.linalg.solve(big_r[:-1, :-1], b[:-1])
            x_t = x_t_ - coeff * _combine(rhos_p, d1s)
        if not use_corrector:
            return x_t, None
        rhos_c = [0.5] if order == 1 else np.linalg.solve(big_r, b)
        corr_res = _combine(rhos_c[:-1], d1s) if d1s else 0.0
        return x_t, (x_t_, coeff, corr_res, float(rhos_c[-1]), model_prev_0)


def _combine(weights, arrays):
    out = float(weights[0]) * arrays[0]
    for w, a in zip(weights[1:], arrays[1:], strict=True):
        out = out + float(w) * a
    return out
