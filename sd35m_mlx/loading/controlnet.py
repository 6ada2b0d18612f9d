"""Load an SD3 ControlNet: a diffusers-layout folder (config.json + safetensors), a single safetensors file with
diffusers keys (config.json beside it, or the config inferred from the tensor shapes), or a Hub repo id."""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

import mlx.core as mx

from ..models.controlnet import ControlNetConfig, SD3ControlNetModel
from ..quantize import LayerPolicy
from . import hub
from .safetensors_io import WeightsError, load_component, load_into, load_safetensors, read_config_as, read_header

WHAT = "SD3 ControlNet"
# as the transformer's: the conditioning embedders stay in full precision, adaLN layers at 8 bits or more
QUANTIZATION_POLICY = LayerPolicy(
    keep=("time_text_embed.*", "context_embedder"),
    at_least_8_bits=("transformer_blocks.*.norm1.linear", "transformer_blocks.*.norm1_context.linear"),
)
_HUB_FILES = [
    "config.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model-?????-of-?????.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
]


def sanitize_controlnet_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """PyTorch Conv2d weights are OIHW; MLX wants OHWI."""
    for key in ("pos_embed.proj.weight", "pos_embed_input.proj.weight"):
        w = weights.get(key)
        if w is not None and w.ndim == 4:
            weights[key] = w.transpose(0, 2, 3, 1)
    return weights


def load_controlnet(
    source: str | os.PathLike, dtype: mx.Dtype = mx.float32, *, revision: str | None = None
) -> SD3ControlNetModel:
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        for folder in (path, path / "controlnet"):
            if (folder / "config.json").exists():
                sanitize = sanitize_controlnet_weights
                return load_component(folder, ControlNetConfig, SD3ControlNetModel, dtype, WHAT, sanitize)
        raise WeightsError(f"{path}: not a diffusers-layout ControlNet folder (no config.json)")
    if path.is_file():
        return load_controlnet_file(path, dtype)
    if hub.is_hub_id(source):
        return load_controlnet(fetch_controlnet(str(source), revision), dtype)
    raise FileNotFoundError(f"{source}: no such ControlNet folder or file")


def fetch_controlnet(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of a Hub ControlNet, downloaded now where the Hugging Face cache lacks it (a server does
    this at start-up, so its worker only reads local files)."""
    folder = hub._snapshot(repo_id, revision, _HUB_FILES, load_t5=False)  # one-line errors, as models
    if not (folder / "config.json").exists():
        raise hub.ModelSourceError(f"{repo_id}: no config.json at the top of the repo: not a diffusers ControlNet")
    return folder


def load_controlnet_file(path: Path, dtype: mx.Dtype = mx.float32) -> SD3ControlNetModel:
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: only .safetensors ControlNets are loaded (pickle files can run code)")
    shapes = {k: tuple(v["shape"]) for k, v in read_header(path).items() if k != "__metadata__"}
    if "controlnet_blocks.0.weight" not in shapes:
        raise WeightsError(f"{path}: not an SD3 ControlNet (no controlnet_blocks.0.weight)")
    if "transformer_blocks.0.adaLN_modulation.1.weight" in shapes:
        width = shapes["controlnet_blocks.0.weight"][0]
        raise WeightsError(
            f"{path}: Stability's SD3.5 Large ControlNet format (width {width}); it fits SD3.5 Large only and "
            "is not supported: use a diffusers-layout ControlNet"
        )
    if (path.parent / "config.json").exists():
        config = read_config_as(path.parent, ControlNetConfig, WHAT)
    else:
        config = infer_config(shapes)
        warnings.warn(
            f"{path}: no config.json beside it; sizes read from the tensors, force_zeros_for_pooled_projection="
            f"{config.force_zeros_for_pooled_projection} assumed (diffusers' default): put the repo's config.json "
            "next to the file to be sure",
            stacklevel=2,
        )
    weights, origin = load_safetensors(path, dtype)
    model = SD3ControlNetModel(config)
    if dtype != mx.float32:
        model.set_dtype(dtype)
    return load_into(model, sanitize_controlnet_weights(weights), origin, what=WHAT)


def infer_config(shapes: dict[str, tuple[int, ...]]) -> ControlNetConfig:
    """A diffusers-keyed ControlNet's config from its tensor shapes (what shapes cannot tell keeps the default)."""
    blocks = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"controlnet_blocks\.(\d+)\.weight$", k))})
    dim = shapes["controlnet_blocks.0.weight"][0]
    norm_q = shapes.get("transformer_blocks.0.attn.norm_q.weight")
    head_dim = norm_q[0] if norm_q else 64
    cond = shapes["pos_embed_input.proj.weight"]  # (D, C, p, p)
    proj = shapes.get("pos_embed.proj.weight")
    in_channels = proj[1] if proj else 16
    table = shapes.get("pos_embed.pos_embed")
    context = shapes.get("context_embedder.weight")
    return ControlNetConfig(
        patch_size=cond[2],
        in_channels=in_channels,
        num_layers=len(blocks),
        attention_head_dim=head_dim,
        num_attention_heads=dim // head_dim,
        joint_attention_dim=context[1] if context else None,
        caption_projection_dim=dim,
        pooled_projection_dim=shapes["time_text_embed.text_embedder.linear_1.weight"][1],
        pos_embed_max_size=math.isqrt(table[1]) if table else None,
        extra_conditioning_channels=cond[1] - in_channels,
        dual_attention_layers=tuple(i for i in blocks if f"transformer_blocks.{i}.attn2.to_q.weight" in shapes),
        qk_norm="rms_norm" if norm_q else None,
        use_pos_embed=proj is not None,
    )
