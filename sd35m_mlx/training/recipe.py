"""The training objective of diffusers' `train_dreambooth_lora_sd3.py`, on NHWC latents.

One step, as diffusers does it (defaults in brackets):
  u ~ density(weighting_scheme) [logit_normal: sigmoid(N(logit_mean 0, logit_std 1))]
  i = floor(u * 1000); sigma = the shifted training table [shift 3] at i; timestep = sigma * 1000
  x_t = (1 - sigma) * x0 + sigma * noise
  pred = transformer(x_t, timestep, text)
  precondition_outputs [True]: pred = pred * (-sigma) + x_t (an x0 estimate), target = x0
  otherwise (plain velocity MSE):                              target = noise - x0
  loss = mean_batch(mean((weighting(sigma) * (pred - target)^2)))  [weighting 1 for logit_normal]
Both targets train the same velocity field: the preconditioned form equals sigma^2 times the velocity
MSE, so it down-weights the noisy end; the velocity form is what SD3's paper and most trainers use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..sampling.schedule import FlowMatchSchedule

WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap")


@dataclass(frozen=True)
class Recipe:
    """diffusers' flags of the same names (`--weighting_scheme`, `--logit_mean`, ...)."""

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = True

    def __post_init__(self):
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            valid = ", ".join(WEIGHTING_SCHEMES)
            raise ValueError(f"weighting_scheme must be one of {valid}, got {self.weighting_scheme!r}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")


def training_sigmas(schedule: FlowMatchSchedule) -> np.ndarray:
    """The scheduler's float32 training table, sigma for index 0..N-1 (from ~1 down to 1/N, shifted)."""
    n = schedule.num_train_timesteps
    t = np.linspace(1, n, n, dtype=np.float32)[::-1].copy() / np.float32(n)
    return (schedule.shift * t / (1 + (schedule.shift - 1) * t)).astype(np.float32)


def sample_u(recipe: Recipe, batch: int, key: mx.array) -> mx.array:
    """diffusers' compute_density_for_timestep_sampling: u in (0, 1), one per batch element."""
    if recipe.weighting_scheme == "logit_normal":
        return mx.sigmoid(recipe.logit_mean + recipe.logit_std * mx.random.normal((batch,), key=key))
    u = mx.random.uniform(shape=(batch,), key=key)
    if recipe.weighting_scheme == "mode":
        u = 1 - u - recipe.mode_scale * (mx.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sample_sigmas(u: mx.array | np.ndarray, schedule: FlowMatchSchedule) -> tuple[mx.array, mx.array]:
    """(sigmas, timesteps) for u, as diffusers indexes its training table: i = floor(u * N)."""
    table = training_sigmas(schedule)
    n = schedule.num_train_timesteps
    idx = np.clip((np.asarray(u, dtype=np.float32) * n).astype(np.int64), 0, n - 1)
    sigmas = table[idx]
    return mx.array(sigmas), mx.array(sigmas * np.float32(n))


def loss_weighting(recipe: Recipe, sigmas: mx.array) -> mx.array:
    """diffusers' compute_loss_weighting_for_sd3."""
    if recipe.weighting_scheme == "sigma_sqrt":
        return sigmas**-2.0
    if recipe.weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return mx.ones_like(sigmas)


def flow_matching_loss(
    predict, x0: mx.array, noise: mx.array, sigmas: mx.array, timesteps: mx.array, recipe: Recipe
) -> mx.array:
    """The scalar loss of one batch. `predict(x_t, timesteps)` is the transformer's velocity (NHWC)."""
    x_t = noised(x0, noise, sigmas)
    return prediction_loss(predict(x_t, timesteps), x_t, x0, noise, sigmas, recipe)


def noised(x0: mx.array, noise: mx.array, sigmas: mx.array) -> mx.array:
    """x_t = (1 - sigma) x0 + sigma noise, in x0's dtype."""
    s = sigmas.astype(mx.float32).reshape(-1, 1, 1, 1)
    return ((1.0 - s) * x0 + s * noise).astype(x0.dtype)


def prediction_loss(
    pred: mx.array, x_t: mx.array, x0: mx.array, noise: mx.array, sigmas: mx.array, recipe: Recipe
) -> mx.array:
    """The scalar loss of the transformer's velocity `pred` at x_t (see the module docstring)."""
    s = sigmas.astype(mx.float32).reshape(-1, 1, 1, 1)
    pred = pred.astype(mx.float32)
    if recipe.precondition_outputs:
        pred = pred * (-s) + x_t.astype(mx.float32)
        target = x0.astype(mx.float32)
    else:
        target = (noise - x0).astype(mx.float32)
    w = loss_weighting(recipe, s)
    per_example = (w * (pred - target) ** 2).reshape(x0.shape[0], -1).mean(axis=1)
    return per_example.mean()
