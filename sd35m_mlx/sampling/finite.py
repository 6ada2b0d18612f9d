"""Stop a generation whose numbers broke (NaN or infinity) with one line saying why, instead of writing a
black PNG: a float16 overflow, extreme LoRA or ControlNet weights, a damaged model file."""

from __future__ import annotations

import mlx.core as mx

from .loop import StepExtra, StepResult


class NonFiniteError(RuntimeError):
    """The latents or the decoded pixels became NaN or infinite; the message names the likely cause."""


def likely_cause(dtype: mx.Dtype) -> str:
    if dtype == mx.float16:
        return "float16 overflows in this model: use --dtype bfloat16 (or float32)"
    return "try --dtype float32; extreme LoRA or ControlNet weights or a damaged model file also cause this"


def check_finite(x: mx.array, what: str, dtype: mx.Dtype) -> None:
    """One reduction on evaluated arrays; raises NonFiniteError naming `what` and the likely cause."""
    if not mx.isfinite(x).all().item():
        raise NonFiniteError(f"{what} became NaN or infinite; {likely_cause(dtype)}")


class FiniteLatents(StepExtra):
    """After every step: the new latents are finite, else the run stops there (no decode, no file)."""

    def __init__(self, dtype: mx.Dtype):
        self.dtype = dtype

    def observe(self, result: StepResult) -> None:
        s = result.step
        check_finite(result.latents, f"the latents at step {s.count} of {s.total}", self.dtype)
