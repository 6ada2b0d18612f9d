"""Random-weight SD3.5 Medium components for the benchmarks, in the real diffusers layout, so both
implementations load the same files through their own loaders (offline, seeded; the builders are
scripts/build_fixture.py's). Adds the `FULL` / `TOY` sizes, `build_medium_transformer` (real width,
reduced depth, SD3.5 Medium's proportions of block kinds) and `build_text` / `build_pipeline` (the tiny
fixture's tokenizers with full-size CLIP-L/G and a T5 at XXL width with fewer layers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from scripts.build_fixture import (
    CLIP_G,
    CLIP_G_FULL,
    CLIP_L,
    CLIP_L_FULL,
    FULL_WIDTH_DUAL_ATTENTION_LAYERS,
    FULL_WIDTH_TRANSFORMER,
    T5_XXL,
    VAE,
    VAE_FULL,
    build_clip,
    build_full_width_transformer,
    build_t5,
    build_tiny_pipeline,
    build_vae,
)

MEDIUM_DEPTH = 24


@dataclass(frozen=True)
class Sizes:
    """Component sizes: `FULL` is SD3.5 Medium's (transformer depth and T5 layers chosen per build)."""

    clip_l: dict
    clip_g: dict
    t5: dict
    vae: dict
    transformer: dict


FULL = Sizes(CLIP_L_FULL, CLIP_G_FULL, T5_XXL, VAE_FULL, FULL_WIDTH_TRANSFORMER)
# widths are multiples of 64 so the quantization policy applies as at full size
TOY = Sizes(
    clip_l=dict(CLIP_L, hidden_size=64, intermediate_size=256, num_attention_heads=2, projection_dim=64),
    clip_g=dict(CLIP_G, hidden_size=128, intermediate_size=512, num_attention_heads=2, projection_dim=128),
    t5=dict(T5_XXL, d_model=256, d_ff=640, num_heads=4),
    vae=dict(VAE, block_out_channels=(32, 64, 64, 64), norm_num_groups=32),
    transformer=dict(FULL_WIDTH_TRANSFORMER, num_attention_heads=2, caption_projection_dim=128,
                     joint_attention_dim=256, pooled_projection_dim=192, pos_embed_max_size=32),
)  # fmt: skip


def medium_dual_layers(depth: int) -> tuple[int, ...]:
    """Dual-attention block indices at `depth`, in SD3.5 Medium's proportion (13 of 24), keeping at
    least one dual block and, from depth 3 on, one plain block before the context-pre-only one."""
    full = len(FULL_WIDTH_DUAL_ATTENTION_LAYERS)
    n = max(1, min(full, round(full * depth / MEDIUM_DEPTH)))
    if depth >= 3:
        n = min(n, depth - 2)
    return tuple(range(n))


def build_medium_transformer(folder: str | Path, depth: int, seed: int = 0) -> Path:
    """The full-width transformer at `depth` with SD3.5 Medium's proportions of block kinds (float32)."""
    return build_full_width_transformer(folder, depth=depth, seed=seed, dual_attention_layers=medium_dual_layers(depth))


def build_text(
    out_dir: str | Path, t5_layers: int, *, sizes: Sizes = FULL, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """A pipeline folder whose text_encoder{,_2,_3} are at `sizes` (T5 with `t5_layers` layers)."""
    folder = build_tiny_pipeline(out_dir, seed=seed)  # tokenizers, scheduler, model_index.json
    for salt, (sub, dims) in enumerate([("text_encoder", sizes.clip_l), ("text_encoder_2", sizes.clip_g)], start=20):
        tiny = json.loads((folder / sub / "config.json").read_text())
        ids = {k: tiny[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}  # the tokenizer's
        build_clip(folder / sub, dims, ids, seed=seed, salt=salt, dtype=dtype)
    build_t5(folder / "text_encoder_3", t5_layers, sizes=sizes.t5, seed=seed, dtype=dtype)
    return folder


def build_pipeline(
    out_dir: str | Path,
    *,
    depth: int,
    t5_layers: int,
    sizes: Sizes = FULL,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """`build_text`, plus the VAE and a transformer of `depth` blocks (dual attention in 0..12) at `sizes`.
    Loads with `StableDiffusion35.from_pretrained`."""
    folder = build_text(out_dir, t5_layers, sizes=sizes, seed=seed, dtype=dtype)
    build_vae(folder / "vae", sizes=sizes.vae, seed=seed, dtype=dtype)
    build_full_width_transformer(folder / "transformer", depth=depth, seed=seed, dtype=dtype, width=sizes.transformer)
    return folder
