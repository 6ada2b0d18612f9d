"""Random-weight SD3.5 Medium components for the benchmarks, written in the diffusers layout so
both implementations load the same files through their own loaders (offline, seeded).

- transformer: the real width (scripts/build_fixture.py) at reduced depth, with SD3.5 Medium's
  proportions of block kinds: dual-attention (MMDiT-X) blocks first, then plain ones, the last
  block context-pre-only. Depth >= 3 has all three kinds.
- text encoders: full CLIP-L/14 and OpenCLIP-G/14 towers, T5 v1.1 XXL width with fewer layers,
  and the tiny fixture's tokenizers (real ones need the gated repo; tokenization is not timed
  apart and costs microseconds).
- VAE: SD3's AutoencoderKL at full size.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from scripts.build_fixture import (
    FULL_WIDTH_DUAL_ATTENTION_LAYERS,
    FULL_WIDTH_TRANSFORMER,
    VAE,
    _randomise_,
    _stream_transformer,
    build_tiny_pipeline,
)

MEDIUM_DEPTH = 24
CLIP_L_FULL = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
)
CLIP_G_FULL = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280
)
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128)
VAE_FULL = dict(VAE, block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024)


def medium_dual_layers(depth: int) -> tuple[int, ...]:
    """Dual-attention block indices at `depth`, in SD3.5 Medium's proportion (13 of 24), keeping at
    least one dual block and, from depth 3 on, one plain block before the context-pre-only one."""
    full = len(FULL_WIDTH_DUAL_ATTENTION_LAYERS)
    n = max(1, min(full, round(full * depth / MEDIUM_DEPTH)))
    if depth >= 3:
        n = min(n, depth - 2)
    return tuple(range(n))


def build_transformer_folder(out_dir: str | Path, depth: int, seed: int = 0) -> Path:
    config = dict(FULL_WIDTH_TRANSFORMER, num_layers=depth, dual_attention_layers=medium_dual_layers(depth))
    return _stream_transformer(Path(out_dir), config, seed, torch.float32)


def build_text_folder(out_dir: str | Path, t5_layers: int, seed: int = 0) -> Path:
    """A pipeline folder whose text_encoder{,_2,_3} are full-size (T5 with `t5_layers` layers)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    folder = build_tiny_pipeline(out_dir, seed=seed)
    for salt, (sub, sizes, act) in enumerate(
        [("text_encoder", CLIP_L_FULL, "quick_gelu"), ("text_encoder_2", CLIP_G_FULL, "gelu")], start=20
    ):
        tiny = json.loads((folder / sub / "config.json").read_text())
        ids = {k: tiny[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}  # the tokenizer's
        config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act=act, **ids, **sizes)
        _save(_randomise_(CLIPTextModelWithProjection(config), seed, salt), folder / sub)
    t5 = T5Config(
        **dict(T5_XXL, num_layers=t5_layers),
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
    )
    _save(_randomise_(T5EncoderModel(t5), seed, salt=22), folder / "text_encoder_3")
    return folder


def build_vae_folder(out_dir: str | Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL

    out_dir = Path(out_dir)
    _save(_randomise_(AutoencoderKL(**VAE_FULL), seed, salt=23), out_dir)
    return out_dir


def _save(model: torch.nn.Module, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder, safe_serialization=True)
    del model
