"""One training step's loss and LoRA gradients, and the update that follows them."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .lora_params import TrainableLora
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
