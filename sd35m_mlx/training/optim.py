"""AdamW with warm-up then a constant or cosine learning rate, and gradient clipping (mlx.optimizers)."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim

LR_SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(learning_rate: float, steps: int, warmup_steps: int = 0, kind: str = "constant"):
    """Linear warm-up from 0 over `warmup_steps` (as diffusers' get_scheduler), then constant or a cosine
    decay to 0 at `steps`."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {kind!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    main = (
        optim.cosine_decay(learning_rate, max(steps - warmup_steps, 1))
        if kind == "cosine"
        else _constant(learning_rate)
    )
    if warmup_steps == 0:
        return main
    # diffusers' warm-up is lr * (step + 1) / warmup at optimizer step `step` (0-based) after its first update
    return optim.join_schedules(
        [
            optim.linear_schedule(learning_rate / warmup_steps, learning_rate, warmup_steps - 1)
            if warmup_steps > 1
            else _constant(learning_rate),
            main,
        ],
        [warmup_steps],
    )


def _constant(value: float):
    return lambda step: mx.array(value, dtype=mx.float32)


def make_optimizer(
    learning_rate, steps, warmup_steps=0, lr_schedule="constant", weight_decay=1e-4, betas=(0.9, 0.999), eps=1e-8
) -> optim.AdamW:
    """diffusers' defaults: betas (0.9, 0.999), weight decay 1e-4, eps 1e-8."""
    schedule = learning_rate_schedule(learning_rate, steps, warmup_steps, lr_schedule)
    return optim.AdamW(learning_rate=schedule, betas=list(betas), eps=eps, weight_decay=weight_decay)


def clip_gradients(grads, max_norm: float | None):
    """(grads scaled so their global norm is at most max_norm, the norm before clipping)."""
    if max_norm is None or max_norm <= 0:
        return grads, optim.clip_grad_norm(grads, float("inf"))[1]
    return optim.clip_grad_norm(grads, max_norm)
