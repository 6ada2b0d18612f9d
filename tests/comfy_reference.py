"""Torch references for the samplers, written from ComfyUI's source at commit
a125cd84b054a57729b5eecab930ca9408719832 (comfy/k_diffusion/sampling.py, comfy/k_diffusion/deis.py,
comfy/extra_samplers/uni_pc.py, comfy/samplers.py KSAMPLER.sample, comfy/model_sampling.py CONST and
ModelSamplingDiscreteFlow), in the form its KSampler runs them on a flow model: the RF / CONST branches,
default arguments, float32 tensors throughout.

`model(x, sigma) -> denoised` (sigma a 0-d float32 tensor); `noise_sampler(sigma, sigma_next)` returns the
next injected noise tensor, or for the SDE samplers ComfyUI's own, `brownian_noise_sampler` (torchsde's
Brownian tree). `run` adds what KSAMPLER.sample does around the sampler function.
These are loops over the whole schedule, as ComfyUI writes them, independent of our step objects.
"""

from __future__ import annotations

import torch


def _to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def _ancestral(sigma_from, sigma_to, eta=1.0):
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def _lam(sigma):  # CONST half-log-SNR: -logit(sigma)
    return sigma.logit().neg()


def _sigma_of(lam):
    return lam.neg().sigmoid()


def _offset_first(sigmas, shift):
    if len(sigmas) > 1 and sigmas[0] >= 1:
        sigmas = sigmas.clone()
        t = 1.0 - 1e-4
        sigmas[0] = t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)
    return sigmas


class BrownianTreeNoiseSampler:
    """BatchedBrownianTree + BrownianTreeNoiseSampler (transform the identity, cpu=True): one
    torchsde.BrownianTree(t0, w0, t1, entropy=seed) per seed, queried between two sigmas and normalized."""

    def __init__(self, x, sigma_min, sigma_max, seed):
        import torchsde

        t0, t1, self.sign = self._sort(torch.as_tensor(sigma_min), torch.as_tensor(sigma_max))
        w0 = torch.zeros_like(x)
        self.batched = isinstance(seed, (tuple, list))
        if self.batched:
            w0 = w0[0]
        else:
            seed = (seed,)
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in seed]

    @staticmethod
    def _sort(a, b):
        return (a, b, 1) if a < b else (b, a, -1)

    def __call__(self, sigma, sigma_next):
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        a, b, sign = self._sort(t0, t1)
        w = torch.stack([tree(a.float(), b.float()) for tree in self.trees]) * (self.sign * sign)
        return (w if self.batched else w[0]) / (t1 - t0).abs().sqrt()


def brownian_noise_sampler(x, sigmas, seed):
    """The noise sampler sample_dpmpp_sde / _2m_sde / _3m_sde make for themselves: a tree over the run's smallest
    positive and largest sigma (taken before offset_first_sigma_for_snr)."""
    return BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed)


def euler(model, x, sigmas, **_):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def _rf_terms(s, s_next, eta=1.0):
    sigma_down = s_next * (1 + (s_next / s - 1) * eta)
    a_next, a_down = 1 - s_next, 1 - sigma_down
    renoise = (s_next**2 - sigma_down**2 * a_next**2 / a_down**2) ** 0.5
    return sigma_down, a_next, a_down, renoise


def euler_ancestral(model, x, sigmas, noise_sampler, **_):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        sigma_down, a_next, a_down, renoise = _rf_terms(sigmas[i], sigmas[i + 1])
        ratio = sigma_down / sigmas[i]
        x = ratio * x + (1 - ratio) * denoised
        x = (a_next / a_down) * x + noise_sampler(sigmas[i], sigmas[i + 1]) * renoise
    return x


def heun(model, x, sigmas, **_):
    for i in range(len(sigmas) - 1):
        d = _to_d(x, sigmas[i], model(x, sigmas[i]))
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = _to_d(x2, sigmas[i + 1], model(x2, sigmas[i + 1]))
            x = x + (d + d2) / 2 * dt
    return x


def dpm_2(model, x, sigmas, **_):
    for i in range(len(sigmas) - 1):
        d = _to_d(x, sigmas[i], model(x, sigmas[i]))
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x2 = x + d * (mid - sigmas[i])
            d2 = _to_d(x2, mid, model(x2, mid))
            x = x + d2 * (sigmas[i + 1] - sigmas[i])
    return x


def dpm_2_ancestral(model, x, sigmas, noise_sampler, **_):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, a_next, a_down, renoise = _rf_terms(sigmas[i], sigmas[i + 1])
        d = _to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x2 = x + d * (mid - sigmas[i])
            d2 = _to_d(x2, mid, model(x2, mid))
            x = x + d2 * (sigma_down - sigmas[i])
            x = (a_next / a_down) * x + noise_sampler(sigmas[i], sigmas[i + 1]) * renoise
    return x


def dpmpp_2s_ancestral(model, x, sigmas, noise_sampler, **_):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, a_next, a_down, renoise = _rf_terms(sigmas[i], sigmas[i + 1])
        if sigmas[i + 1] == 0:
            x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            if sigmas[i] == 1.0:
                sigma_s = torch.tensor(0.9999)
            else:
                lam_i, lam_down = ((1 - sigmas[i]) / sigmas[i]).log(), ((1 - sigma_down) / sigma_down).log()
                sigma_s = ((lam_i + (lam_down - lam_i) / 2).exp() + 1) ** -1
            ratio = sigma_s / sigmas[i]
            u = ratio * x + (1 - ratio) * denoised
            d_i = model(u, sigma_s)
            ratio = sigma_down / sigmas[i]
            x = ratio * x + (1 - ratio) * d_i
        if sigmas[i + 1] > 0:
            x = (a_next / a_down) * x + noise_sampler(sigmas[i], sigmas[i + 1]) * renoise
    return x


def dpmpp_sde(model, x, sigmas, noise_sampler, shift, **_):
    sigmas = _offset_first(sigmas, shift)
    r, fac = 0.5, 1.0
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = _lam(sigmas[i]), _lam(sigmas[i + 1])
        h = lam_t - lam_s
        lam_s1 = lam_s + r * h
        sigma_s1 = _sigma_of(lam_s1)
        alpha_s, alpha_s1, alpha_t = sigmas[i] * lam_s.exp(), sigma_s1 * lam_s1.exp(), sigmas[i + 1] * lam_t.exp()
        sd, su = _ancestral(lam_s.neg().exp(), lam_s1.neg().exp())
        h_ = sd.log().neg() - lam_s
        x2 = (alpha_s1 / alpha_s) * (-h_).exp() * x - alpha_s1 * (-h_).expm1() * denoised
        x2 = x2 + alpha_s1 * noise_sampler(sigmas[i], sigma_s1) * su
        denoised_2 = model(x2, sigma_s1)
        sd, su = _ancestral(lam_s.neg().exp(), lam_t.neg().exp())
        h_ = sd.log().neg() - lam_s
        mixed = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * mixed
        x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * su
    return x


def dpmpp_2m(model, x, sigmas, **_):
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        t, t_next = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            mixed = denoised
        else:
            r = (t - sigmas[i - 1].log().neg()) / h
            mixed = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * mixed
        old = denoised
    return x


def _multistep_sde(model, x, sigmas, noise_sampler, shift, third_order):
    sigmas = _offset_first(sigmas, shift)
    d_1 = d_2 = h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = _lam(sigmas[i]), _lam(sigmas[i + 1])
            h = lam_t - lam_s
            h_eta = h * 2
            alpha_t = sigmas[i + 1] * lam_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if third_order and h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif third_order and h_1 is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + (alpha_t * phi_2) * ((denoised - d_1) / (h_1 / h))
            elif not third_order and d_1 is not None:
                x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / (h_1 / h)) * (denoised - d_1)
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h).expm1().neg().sqrt()
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
    return x


def dpmpp_2m_sde(model, x, sigmas, noise_sampler, shift, **_):
    return _multistep_sde(model, x, sigmas, noise_sampler, shift, third_order=False)


def dpmpp_3m_sde(model, x, sigmas, noise_sampler, shift, **_):
    return _multistep_sde(model, x, sigmas, noise_sampler, shift, third_order=True)


def lcm(model, x, sigmas, noise_sampler, **_):
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i])
        if sigmas[i + 1] > 0:
            s = sigmas[i + 1]
            x = s * noise_sampler(sigmas[i], sigmas[i + 1]) + (1.0 - s) * x
    return x


_AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def ipndm(model, x, sigmas, **_):
    buffer = []  # oldest first
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        order = min(4, i + 1)
        if sigmas[i + 1] == 0:
            x_next = denoised
        else:
            w = _AB[order]
            total = w[0] * d
            for k in range(1, order):
                total = total + w[k] * buffer[-k]
            x_next = x + (sigmas[i + 1] - sigmas[i]) * total
        buffer = (buffer + [d])[-3:]
        x = x_next
    return x


def _deis_coefficients(t_steps, max_order=3, n=10000):
    """deis.get_deis_coeff_list, 'tab' mode, float32 torch with autograd as there."""
    sigma_min, sigma_max, eps_s = torch.tensor(0.002), torch.tensor(80.0), 1e-3
    beta_d = 2 * (torch.log(sigma_min**2 + 1) / eps_s - torch.log(sigma_max**2 + 1)) / (eps_s - 1)
    beta_min = torch.log(sigma_max**2 + 1) - 0.5 * beta_d
    t_steps = ((beta_min**2 + 2 * beta_d * (t_steps**2 + 1).log()).sqrt() - beta_min) / beta_d
    beta_0, beta_1 = beta_min, beta_d + beta_min
    out = []
    for i in range(len(t_steps) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            out.append([])
            continue
        taus = torch.linspace(t_steps[i], t_steps[i + 1], n)
        dtau = (t_steps[i + 1] - t_steps[i]) / n
        with torch.enable_grad():
            tt = taus.clone().requires_grad_(True)
            alpha = torch.exp(-0.5 * tt**2 * (beta_1 - beta_0) - tt * beta_0)
            alpha.log().sum().backward()
        alpha = alpha.detach()
        integrand = -0.5 * tt.grad / torch.sqrt(alpha * (1 - alpha))
        prev = t_steps[[i - k for k in range(order)]]
        row = []
        for j in range(order):
            poly = 1
            for k in range(order):
                if k != j:
                    poly = poly * (taus - prev[k]) / (prev[j] - prev[k])
            row.append(torch.sum(integrand * poly) * dtau)
        out.append(row)
    return out


def deis(model, x, sigmas, **_):
    coeffs = _deis_coefficients(sigmas)
    buffer = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        order = 1 if sigmas[i + 1] <= 0 else min(3, i + 1)
        if order == 1:
            x_next = x + (sigmas[i + 1] - sigmas[i]) * d
        else:
            c = coeffs[i]
            x_next = x + c[0] * d
            for k in range(1, order):
                x_next = x_next + c[k] * buffer[-k]
        buffer = (buffer + [d])[-2:]
        x = x_next
    return x


def res_multistep(model, x, sigmas, **_):
    old_denoised = old_sigma_down = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down = sigmas[i + 1]  # eta 0
        if sigma_down == 0 or old_denoised is None:
            x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_old = sigmas[i].log().neg(), old_sigma_down.log().neg()
            t_next, t_prev = sigma_down.log().neg(), sigmas[i - 1].log().neg()
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            x = (-h).exp() * x + h * (b1 * denoised + b2 * old_denoised)
        old_denoised, old_sigma_down = denoised, sigma_down
    return x


def gradient_estimation(model, x, sigmas, **_):
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = _to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = x + d * dt
            if i >= 1:
                x = x + (d - old_d) * dt  # ge_gamma 2
        old_d = d
    return x


def _unipc(model, x, sigmas, variant):
    """sample_unipc: VE sigmas, multistep bh update, data prediction, order min(3, steps - 1)."""
    ts = sigmas[:]  # a view, as there: the last sigma's overwrite reaches the caller's schedule
    if sigmas[-1] == 0:
        ts[-1] = 0.001

    def lmc(s):
        return 0.5 * torch.log(1 / (s * s + 1))

    def alpha(s):
        return torch.exp(lmc(s))

    def std(s):
        return torch.sqrt(1.0 - torch.exp(2.0 * lmc(s)))

    def lam(s):
        return lmc(s) - 0.5 * torch.log(1.0 - torch.exp(2.0 * lmc(s)))

    def data(x_vp, s):  # predict_eps_sigma then data_prediction_fn
        inp = x_vp * (s**2 + 1.0) ** 0.5
        eps = (inp - model(inp, s)) / s
        return (x_vp - std(s) * eps) / alpha(s)

    def update(x, models, times, t, order, corrector):
        t0, m0 = times[-1], models[-1]
        h = lam(t) - lam(t0)
        rks, d1s = [], []
        for i in range(1, order):
            rk = (lam(times[-(i + 1)]) - lam(t0)) / h
            rks.append(rk)
            d1s.append((models[-(i + 1)] - m0) / rk)
        rks.append(torch.tensor(1.0))
        rks = torch.stack(rks)
        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if variant == "bh1" else torch.expm1(hh)
        fact, big_r, b = 1, [], []
        for i in range(1, order + 1):
            big_r.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        big_r, b = torch.stack(big_r), torch.stack(b)
        x_t_ = std(t) / std(t0) * x - alpha(t) * h_phi_1 * m0
        x_t = x_t_
        if d1s:
            rhos_p = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(big_r[:-1, :-1], b[:-1])
            x_t = x_t_ - alpha(t) * b_h * sum(r * d for r, d in zip(rhos_p, d1s, strict=True))
        model_t = None
        if corrector:
            rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(big_r, b)
            model_t = data(x_t, t)
            corr = sum(r * d for r, d in zip(rhos_c[:-1], d1s, strict=True)) if d1s else 0
            x_t = x_t_ - alpha(t) * b_h * (corr + rhos_c[-1] * (model_t - m0))
        return x_t, model_t

    x = x / torch.sqrt(1.0 + ts[0] ** 2.0)
    steps = len(ts) - 1
    order = min(3, len(ts) - 2)
    models, times = [data(x, ts[0])], [ts[0]]
    for k in range(1, steps):
        step_order = k if k < order else min(order, steps + 1 - k)
        x, m = update(x, models, times, ts[k], step_order, True)
        models, times = (models + [m])[-max(order, 1) :], (times + [ts[k]])[-max(order, 1) :]
    if steps > 1:
        x, _ = update(x, models, times, ts[steps], min(order, 1), False)
    return x / alpha(ts[-1])


def uni_pc(model, x, sigmas, **_):
    return _unipc(model, x, sigmas, "bh1")


def uni_pc_bh2(model, x, sigmas, **_):
    return _unipc(model, x, sigmas, "bh2")


SAMPLERS = {
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "heun": heun,
    "dpm_2": dpm_2,
    "dpm_2_ancestral": dpm_2_ancestral,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "dpmpp_sde": dpmpp_sde,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "lcm": lcm,
    "ipndm": ipndm,
    "deis": deis,
    "res_multistep": res_multistep,
    "gradient_estimation": gradient_estimation,
    "ddim": euler,  # samplers.sampler_object: ksampler("euler", inpaint_options={"random": True})
    "uni_pc": uni_pc,
    "uni_pc_bh2": uni_pc_bh2,
}
DISCARD_PENULTIMATE = {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}


def schedule(sigmas_for, name: str, steps: int) -> torch.Tensor:
    """KSampler.calculate_sigmas: steps + 1 with the penultimate sigma dropped for some samplers."""
    if name in DISCARD_PENULTIMATE:
        s = torch.as_tensor(sigmas_for(steps + 1))
        return torch.cat([s[:-2], s[-1:]])
    return torch.as_tensor(sigmas_for(steps))


def run(name: str, model, x, sigmas: torch.Tensor, noise_sampler=None, shift: float = 3.0):
    """KSAMPLER.sample after the noise scaling (x is already noised to sigmas[0]): the sampler function,
    then CONST.inverse_noise_scaling at the (possibly overwritten) last sigma."""
    sigmas = sigmas.clone()
    out = SAMPLERS[name](model, x, sigmas, noise_sampler=noise_sampler, shift=shift)
    return out / (1.0 - sigmas[-1])
