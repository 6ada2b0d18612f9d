"""One training step's loss and LoRA gradients, and the update that follows them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .lora_params import TrainableLora
from .optim import clip_gradients
from .recipe import Recipe, flow_matching_loss


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
    lora: TrainableLora, transformer: nn.Module, optimizer, recipe: Recipe, max_grad_norm: float, compile: bool
) -> Update:
    """`update(batch, noise, sigmas, timesteps) -> loss`: loss and LoRA gradients, clipping and the AdamW
    step, applied to `lora.params` in place (lazily: the caller evaluates). With `compile`, the whole update
    is one `mx.compile`d graph (LoRA factors and optimizer state as its captured state), traced once per
    input shape (aspect bucket); elementwise chains fuse, so fewer intermediates are written and read."""

    def update(latents, prompt_embeds, pooled_prompt_embeds, noise, sigmas, timesteps):
        batch = Batch(latents, prompt_embeds, pooled_prompt_embeds)
        loss, grads = loss_and_grads(lora, transformer, batch, noise, sigmas, timesteps, recipe)
        grads, _ = clip_gradients(grads, max_grad_norm)
        new = optimizer.apply_gradients(grads, lora.params)
        for path, factors in new.items():  # in place: compile reads its state through these containers
            lora.params[path].update(factors)
        return loss

    if compile:
        state = [lora.params, optimizer.state]
        update = mx.compile(update, inputs=state, outputs=state)

    def run(batch: Batch, noise: mx.array, sigmas: mx.array, timesteps: mx.array) -> mx.array:
        loss = update(batch.latents, batch.prompt_embeds, batch.pooled_prompt_embeds, noise, sigmas, timesteps)
        return loss

    return run
