"""One training step's loss and LoRA gradients, and the update that follows them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .lora_params import TrainableLora
from .optim import clip_gradients
from .recipe import Recipe, flow_matching_loss
from .staged import staged_loss_and_grads


@dataclass
class Batch:
    """Cached training inputs: scaled VAE latents x0 (B, H/8, W/8, C) = (latent - shift) * scale, and the
    prompt embeddings the transformer takes (B, L, D) and (B, pooled)."""

    latents: mx.array
    prompt_embeds: mx.array
    pooled_prompt_embeds: mx.array


def loss_and_grads(
    lora: TrainableLora,
    transformer: nn.Module,
    batch: Batch,
    noise: mx.array,
    sigmas: mx.array,
    timesteps: mx.array,
    recipe: Recipe,
    params: dict | None = None,
) -> tuple[mx.array, dict]:
    """(loss, d loss / d LoRA params) for fixed noise and sigmas; only the LoRA factors get gradients."""

    def loss_fn(p):
        lora.bind(p)

        def predict(x_t, t):
            return transformer(x_t, batch.prompt_embeds, batch.pooled_prompt_embeds, t)

        return flow_matching_loss(predict, batch.latents, noise, sigmas, timesteps, recipe)

    return mx.value_and_grad(loss_fn)(lora.params if params is None else params)


Update = Callable[[Batch, mx.array, mx.array, mx.array], mx.array]


def make_update(
    lora: TrainableLora,
    transformer: nn.Module,
    optimizer,
    recipe: Recipe,
    max_grad_norm: float,
    compile: bool,
    staged: bool = False,
) -> Update:
    """`update(batch, noise, sigmas, timesteps) -> loss`: loss and LoRA gradients, clipping and the AdamW
    step, applied to `lora.params` in place (lazily: the caller evaluates).

    `staged`: the gradients come block by block (staged.py), one block's activations alive at a time.
    `compile`: `mx.compile` traces the update once per input shape (aspect bucket), LoRA factors and
    optimizer state as its captured state, so elementwise chains fuse; with `staged` (which evaluates
    between stages) only the clipping and AdamW step are compiled."""

    def apply(grads):
        grads, _ = clip_gradients(grads, max_grad_norm)
        new = optimizer.apply_gradients(grads, lora.params)
        for path, factors in new.items():  # in place: compile reads its state through these containers
            lora.params[path].update(factors)

    state = [lora.params, optimizer.state]
    if staged:
        apply_step = mx.compile(apply, inputs=state, outputs=state) if compile else apply

        def run_staged(batch: Batch, noise: mx.array, sigmas: mx.array, timesteps: mx.array) -> mx.array:
            loss, grads = staged_loss_and_grads(
                lora, transformer, *(batch.latents, batch.prompt_embeds, batch.pooled_prompt_embeds), noise,
                sigmas, timesteps, recipe
            )  # fmt: skip
            apply_step(grads)
            return loss

        return run_staged

    def update(latents, prompt_embeds, pooled_prompt_embeds, noise, sigmas, timesteps):
        batch = Batch(latents, prompt_embeds, pooled_prompt_embeds)
        loss, grads = loss_and_grads(lora, transformer, batch, noise, sigmas, timesteps, recipe)
        apply(grads)
        return loss

    if compile:
        update = mx.compile(update, inputs=state, outputs=state)

    def run(batch: Batch, noise: mx.array, sigmas: mx.array, timesteps: mx.array) -> mx.array:
        return update(batch.latents, batch.prompt_embeds, batch.pooled_prompt_embeds, noise, sigmas, timesteps)

    return run
