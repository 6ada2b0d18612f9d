"""The denoising loop, and the protocol its per-step extras plug into.

`generate()` hands the loop a sampler, a velocity function and a list of `StepExtra`s. Features
that act once per step live in their own extra instead of branching through the loop:
ControlNet residuals feed the model (`model_inputs`), inpainting re-imposes the known region on the
new latents (`after_step`), and callbacks, previews and cancellation watch the evaluated result
(`observe`). Extras run in list order; one `mx.eval` per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx

from .memory import bounded_work


class GenerationCancelled(Exception):
    """Raised by `generate` when it is cancelled: `pipe.cancel()`, or the step callback returned False."""


@dataclass(frozen=True)
class Step:
    """Where a step stands: schedule index `index` (0-based over the whole schedule), `count` the
    1-based step number within this run, `total` the run's steps (img2img starts part-way), and the
    sigmas the step moves between."""

    index: int
    count: int
    total: int
    sigma: float
    sigma_next: float


@dataclass
class StepResult:
    """A finished step: the latents it started from, the guided velocity and the new latents."""

    step: Step
    x_in: mx.array
    velocity: mx.array
    latents: mx.array

    @property
    def denoised(self) -> mx.array:
        """The model's current estimate of the clean latents, x0 = x_t - sigma_t * v (flow matching)."""
        return self.x_in - self.step.sigma * self.velocity


class StepExtra:
    """A per-step piece of the denoising loop. Override what the feature needs; defaults do nothing."""

    def model_inputs(self, step: Step, x: mx.array) -> dict:
        """Extra keyword inputs for the velocity function at this step (lazy arrays)."""
        return {}

    def after_step(self, step: Step, x_in: mx.array, velocity: mx.array, x: mx.array) -> mx.array:
        """The latents to continue from, given the sampler's `x` (lazy; evaluated with the step)."""
        return x

    def observe(self, result: StepResult) -> None:
        """Called once the step is evaluated. May raise (e.g. GenerationCancelled) to stop the run."""


class StepCallback(StepExtra):
    """`callback(step, total, latents)` after every step; returning False cancels the run."""

    def __init__(self, callback: Callable[[int, int, mx.array], bool | None]):
        self.callback = callback

    def observe(self, result: StepResult) -> None:
        s = result.step
        if self.callback(s.count, s.total, result.latents) is False:
            raise GenerationCancelled(f"cancelled after step {s.count} of {s.total}")


def denoise(
    x: mx.array,
    sigmas: Sequence[float],
    start: int,
    sampler,
    velocity: Callable[..., mx.array],
    extras: Sequence[StepExtra] = (),
    work_budget: int | None = None,
) -> mx.array:
    """Run steps start..N-1 of the schedule `sigmas` (length N + 1) from latents `x`."""
    n = len(sigmas) - 1
    with bounded_work(work_budget):  # the work MLX may hold in flight (memory.py)
        for i in range(start, n):
            step = Step(i, i - start + 1, n - start, float(sigmas[i]), float(sigmas[i + 1]))
            inputs = {}
            for extra in extras:
                inputs.update(extra.model_inputs(step, x))
            v = velocity(i, x, **inputs)
            x_next = sampler.step(i, x, v)
            for extra in extras:
                x_next = extra.after_step(step, x, v, x_next)
            mx.eval(x_next)
            result = StepResult(step, x, v, x_next)
            for extra in extras:
                extra.observe(result)
            x = x_next
    return x
