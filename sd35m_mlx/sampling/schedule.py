"""Flow-matching noise schedule, identical to diffusers' FlowMatchEulerDiscreteScheduler (static shift)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

# scheduler_config.json options that change the schedule; only their "off" values are reproduced here.
_UNSUPPORTED = (
    "use_dynamic_shifting",
    "invert_sigmas",
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "stochastic_sampling",
)


@dataclass(frozen=True)
class FlowMatchSchedule:
    """diffusers `scheduler/scheduler_config.json`; defaults are SD3.5 Medium's.

    sigma(t) = shift * t / (1 + (shift - 1) * t) for t in (0, 1]; the model sees timestep sigma * 1000.
    """

    num_train_timesteps: int = 1000
    shift: float = 3.0

    @classmethod
    def from_dict(cls, d: Mapping) -> FlowMatchSchedule:
        for key in _UNSUPPORTED:
            if d.get(key):
                raise ValueError(f"scheduler option {key}={d[key]!r} is not supported (only a static shift)")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        # diffusers' own default shift is 1.0: a config without the key means no shift.
        kwargs.setdefault("shift", 1.0)
        return cls(**kwargs)

    def _shifted(self, s):
        return self.shift * s / (1 + (self.shift - 1) * s)

    def sigmas(self, num_inference_steps: int) -> np.ndarray:
        """float32 sigmas of length N + 1, from 1.0 down to a final 0, exactly as diffusers' set_timesteps."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        n = self.num_train_timesteps
        # diffusers' __init__ builds the 1000-entry training table in float32 and takes its ends...
        table = self._shifted(np.arange(n, 0, -1, dtype=np.float32) / np.float32(n))
        sigma_max, sigma_min = float(table[0]), float(table[-1])
        # ...then set_timesteps spaces the inference steps between them in float64 and shifts again
        # (so the low end is shifted twice), before casting to float32.
        t = np.linspace(sigma_max * n, sigma_min * n, num_inference_steps)
        s = self._shifted(t / n).astype(np.float32)
        return np.concatenate([s, np.zeros(1, np.float32)])

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """float32 timesteps (length N) that the transformer sees: sigma * num_train_timesteps."""
        return self.sigmas(num_inference_steps)[:-1] * np.float32(self.num_train_timesteps)


def img2img_start_index(num_inference_steps: int, strength: float) -> int:
    """First step of an img2img run, as StableDiffusion3Img2ImgPipeline.get_timesteps computes it.

    Note diffusers' float arithmetic: int(N - N * strength), which is not N - int(N * strength)
    (N=28, strength=0.6 starts at 11, not 12).
    """
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    init_timestep = min(num_inference_steps * strength, num_inference_steps)
    # strength > 0 always leaves at least one step: N - N * strength < N.
    return int(max(num_inference_steps - init_timestep, 0))


def scale_noise(sample: mx.array, noise: mx.array, sigma: float) -> mx.array:
    """Flow-matching forward process, as diffusers' scheduler.scale_noise.

    sigma * noise + (1 - sigma) * sample; for img2img, sigma = sigmas[img2img_start_index(...)].
    """
    return sigma * noise + (1.0 - sigma) * sample
