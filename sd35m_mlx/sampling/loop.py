"""The denoising loop, and the protocol its per-step extras plug into.

`generate()` hands the loop a sampler, a velocity function and a list of `StepExtra`s. Features
that act once per step live in their own extra instead of branching through the loop:
ControlNet residuals feed the model (`model_inputs`), inpainting shows the model the known region
(`model_latents`) and re-imposes it on the new latents (`after_step`), and callbacks, previews and
cancellation watch the evaluated result (`observe`). Extras run in list order; one `mx.eval` per step.

Every step evaluates the model at its own sigma first (every sampler begins there); samplers that
evaluate again inside the step (heun, dpm_2, ...: midpoints, sigma_next) get `model(x, sigma)`, which
runs the same extras' `model_latents` and `model_inputs` for that sigma, so ControlNet and inpainting
act on every evaluation.
"""

from __future__ import annotations

import dataclasses
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
    sigmas the step moves between. For an extra model evaluation inside the step, `sigma` is where that
    evaluation is (`at_sigma`); windows (ControlNet, SLG) go by `index`."""

    index: int
    count: int
    total: int
    sigma: float
    sigma_next: float


def at_sigma(step: Step, sigma: float) -> Step:
    """The step as one of its extra model evaluations sees it: same index and window, `sigma` where it is."""
    return step if sigma == step.sigma else dataclasses.replace(step, sigma=sigma)


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

    def model_latents(self, step: Step, x: mx.array) -> mx.array:
        """The latents the model sees when evaluated at `step.sigma` (lazy)."""
        return x

    def model_inputs(self, step: Step, x: mx.array) -> dict:
        """Extra keyword inputs for the velocity function when evaluated at `step.sigma` (lazy arrays)."""
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


def model_at(step: Step, velocity: Callable[..., mx.array], extras: Sequence[StepExtra]) -> Callable:
    """`model(x, sigma) -> velocity` for the evaluations of one step: each extra's `model_latents`, then
    their `model_inputs`, then `velocity(index, x, sigma, **inputs)`."""

    def model(x: mx.array, sigma: float) -> mx.array:
        where = at_sigma(step, sigma)
        for extra in extras:
            x = extra.model_latents(where, x)
        inputs = {}
        for extra in extras:
            inputs.update(extra.model_inputs(where, x))
        return velocity(step.index, x, sigma, **inputs)

    return model


def denoise(
    x: mx.array,
    start: int,
    sampler,
    velocity: Callable[..., mx.array],
    extras: Sequence[StepExtra] = (),
    work_budget: int | None = None,
) -> mx.array:
    """Run steps start..N-1 of the sampler's schedule `sampler.sigmas` (length N + 1) from latents `x`.

    `sampler.step(i, x, v, model)` (sampling/samplers); `velocity(i, x, sigma, **inputs)` the guided model
    (sampling/guidance.py), `i` the schedule index (for windows such as SLG's)."""
    sigmas = sampler.sigmas
    n = len(sigmas) - 1
    with bounded_work(work_budget):  # the work MLX may hold in flight (memory.py)
        for i in range(start, n):
            step = Step(i, i - start + 1, n - start, float(sigmas[i]), float(sigmas[i + 1]))
            model = model_at(step, velocity, extras)
            v = model(x, step.sigma)
            x_next = sampler.step(i, x, v, model)
            for extra in extras:
                x_next = extra.after_step(step, x, v, x_next)
            mx.eval(x_next)
            result = StepResult(step, x, v, x_next)
            for extra in extras:
                extra.observe(result)
            x = x_next
    return x
