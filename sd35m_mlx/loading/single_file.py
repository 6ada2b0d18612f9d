"""Load the Stability single-file layout and ComfyUI all-in-one checkpoints.

Stability (HF repo stabilityai/stable-diffusion-3.5-medium):
    sd3.5_medium.safetensors        MMDiT under `model.diffusion_model.`, VAE under `first_stage_model.` (LDM names)
    text_encoders/clip_l.safetensors, clip_g.safetensors          transformers key layout; clip_l has no projection
    text_encoders/t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors   (fp16 preferred when both exist)
    tokenizer/, tokenizer_2/, tokenizer_3/                         from the same repo
ComfyUI all-in-one: the text encoders inside the main file under `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`,
T5 possibly missing, possibly in ComfyUI's scaled float8 (`scaled_fp8` marker, per-tensor `scale_weight`).

Configs. Every size the tensors reveal is taken from their shapes (depth, widths, dual-attention blocks, qk-norm
and its head size, positional table, VAE channels, T5 heads from its relative-position table). What shapes cannot
tell (MMDiT heads without qk-norm, VAE GroupNorm groups and latent scaling, CLIP heads and activation) comes from
a diffusers `config.json` in the matching folder next to the checkpoint (transformer/, vae/, text_encoder{,_2,_3}/)
when there is one, else from the real models: SD3 (head size 64, 32 groups, 1.5305 / 0.0609), CLIP-L/14 (width
768) and OpenCLIP-G/14 (width 1280). Sidecar files (text_encoders/, tokenizer*/, config folders, scheduler/) are
looked up next to the checkpoint only.

Streaming: `mx.load` is lazy and every rename, qkv split, swap and dtype cast is a lazy op on one tensor, so no
full-precision copy of a whole model is ever built.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import mlx.core as mx

from ..defaults import DEFAULT_MODEL as _REPO
from ..models.clip import CLIPTextConfig, CLIPTextModel
from ..models.mmdit import MMDiTConfig, SD3Transformer2DModel
from ..models.prompt_encoder import PromptEncoder
from ..models.t5 import T5Config, T5EncoderModel
from ..models.vae import AutoencoderKL, VAEConfig
from ..sampling.schedule import FlowMatchSchedule
from . import hub
from .keymaps import map_mmdit_weights, map_vae_weights
from .parts import PipelineParts, load_schedule
from .safetensors_io import WeightsError, load_into, load_safetensors, read_header, read_json
from .text_encoders import load_tokenizer, sanitize_clip_weights, sanitize_t5_weights
from .transformer import sanitize_transformer_weights
from .vae import sanitize_vae_weights

CHECKPOINT_NAME = "sd3.5_medium.safetensors"
MMDIT_PREFIXES = ("model.diffusion_model.", "")  # the second: a bare MMDiT file
VAE_PREFIXES = ("first_stage_model.", "vae.")
TEXT_ENCODER_PREFIX = "text_encoders.{}.transformer."
# separate text encoder files, in order of preference
TEXT_ENCODER_FILES = {
    "clip_l": ("clip_l.safetensors",),
    "clip_g": ("clip_g.safetensors",),
    "t5xxl": ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors"),
}

Shapes = Mapping[str, tuple[int, ...]]


# ---------------------------------------------------------------------------------------------
# Finding the checkpoint and telling what it is


def is_single_file_source(path: Path) -> bool:
    """A safetensors file, or a folder with safetensors files at its top level (and no model_index.json)."""
    if path.is_file():
        return True
    return path.is_dir() and not (path / "model_index.json").exists() and any(path.glob("*.safetensors"))


def _has_mmdit(keys) -> bool:
    return any(k.startswith(p + "joint_blocks.") for k in keys for p in MMDIT_PREFIXES)


def find_checkpoint(path: Path) -> Path:
    """The main checkpoint file: `path` itself, or the SD3 checkpoint at the top level of folder `path`."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise WeightsError(f"{path}: only .safetensors checkpoints are loaded (pickle files can run code)")
        return path
    if (path / CHECKPOINT_NAME).is_file():
        return path / CHECKPOINT_NAME
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]  # whatever it is, `describe_checkpoint` will say
    found = [f for f in files if _has_mmdit(read_header(f))]
    if len(found) == 1:
        return found[0]
    if not found:
        raise WeightsError(f"{path}: no SD3 checkpoint (model.diffusion_model.joint_blocks.*) among its .safetensors")
    raise WeightsError(f"{path}: several SD3 checkpoints ({', '.join(f.name for f in found)}); name one file")


def describe_checkpoint(keys) -> str:
    """What a checkpoint without an SD3 MMDiT looks like, in a few words (for the error message)."""
    keys = list(keys)

    def has(*fragments: str) -> bool:
        return any(f in k for k in keys for f in fragments)

    if has("double_blocks.", "single_blocks."):
        return "a FLUX checkpoint (double_blocks / single_blocks), not SD3"
    if has("conditioner.embedders."):
        return "an SDXL checkpoint (UNet input_blocks, conditioner.embedders), not SD3"
    if has("model.diffusion_model.input_blocks.", "cond_stage_model."):
        return "a Stable Diffusion 1.x/2.x checkpoint (UNet input_blocks), not SD3"
    if has("transformer_blocks.0.attn.to_q.weight"):
        return "a diffusers-layout transformer file: load its whole diffusers folder (with model_index.json)"
    if has("first_stage_model.", "text_encoders."):
        return "VAE / text encoder weights only, no MMDiT (model.diffusion_model.joint_blocks.*)"
    sample = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    return f"not an SD3 checkpoint: no model.diffusion_model.joint_blocks.* among its {len(keys)} tensors ({sample})"


def _split_by_prefix(weights: Mapping[str, mx.array]) -> dict[str, dict[str, mx.array]]:
    """Component name -> its tensors with the file prefix removed; tensors of no component are ignored
    (ComfyUI's logit_scale and the like), except in a bare MMDiT file, where every tensor is the MMDiT's."""
    mmdit = next(p for p in MMDIT_PREFIXES if any(k.startswith(p + "joint_blocks.") for k in weights))
    prefixes = {name: TEXT_ENCODER_PREFIX.format(name) for name in TEXT_ENCODER_FILES}
    prefixes["vae"] = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in weights)), VAE_PREFIXES[0])
    if mmdit:
        prefixes["mmdit"] = mmdit
    groups: dict[str, dict[str, mx.array]] = {name: {} for name in (*prefixes, "mmdit")}
    for key, value in weights.items():
        name = next((n for n, p in prefixes.items() if key.startswith(p)), None)
        if name is not None:
            groups[name][key.removeprefix(prefixes[name])] = value
        elif not mmdit:
            groups["mmdit"][key] = value
    return groups


# ---------------------------------------------------------------------------------------------
# Config inference: shapes first, then a sidecar config.json, then the real models' values


def infer_mmdit_config(shapes: Shapes, hint: Mapping | None = None) -> MMDiTConfig:
    """MMDiT config from single-file shapes (keys without prefix); `hint` (a diffusers transformer config)
    supplies only what shapes cannot: the head size when there is no qk-norm, and sample_size."""
    hint = dict(hint or {})
    hidden, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
    rows = shapes["pos_embed"][1]
    side = math.isqrt(rows)
    if side * side != rows:
        raise WeightsError(f"pos_embed has {rows} rows, not a square table")
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("joint_blocks.")}
    ln_q = "joint_blocks.0.x_block.attn.ln_q.weight"
    default_head_dim = int(hint.get("attention_head_dim", MMDiTConfig.attention_head_dim))
    head_dim = shapes[ln_q][0] if ln_q in shapes else default_head_dim
    dual = [i for i in sorted(blocks) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes]
    if hidden % head_dim:
        raise WeightsError(f"MMDiT width {hidden} is not a multiple of the head size {head_dim}")
    return MMDiTConfig.from_dict(
        {
            **hint,
            "patch_size": patch,
            "in_channels": in_channels,
            "out_channels": shapes["final_layer.linear.weight"][0] // patch**2,
            "num_layers": max(blocks) + 1,
            "attention_head_dim": head_dim,
            "num_attention_heads": hidden // head_dim,
            "joint_attention_dim": shapes["context_embedder.weight"][1],
            "caption_projection_dim": hidden,
            "pooled_projection_dim": shapes["y_embedder.mlp.0.weight"][1],
            "pos_embed_max_size": side,
            "dual_attention_layers": dual,
            "qk_norm": "rms_norm" if ln_q in shapes else None,
        }
    )


def infer_vae_config(shapes: Shapes, hint: Mapping | None = None) -> VAEConfig:
    """VAE config from LDM shapes (keys without prefix); GroupNorm groups and the latent scaling come from
    `hint` (a diffusers vae config) or SD3's values."""
    levels = len({k.split(".")[2] for k in shapes if k.startswith("encoder.down.")})
    defaults = {f: getattr(VAEConfig, f) for f in ("norm_num_groups", "scaling_factor", "shift_factor")}
    return VAEConfig.from_dict(
        {
            **defaults,
            **(hint or {}),
            "in_channels": shapes["encoder.conv_in.weight"][1],
            "out_channels": shapes["decoder.conv_out.weight"][0],
            "block_out_channels": [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)],
            "layers_per_block": len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")}),
            "latent_channels": shapes["decoder.conv_in.weight"][1],
            "use_quant_conv": "quant_conv.weight" in shapes,
            "use_post_quant_conv": "post_quant_conv.weight" in shapes,
            "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in shapes,
        }
    )


# what CLIP shapes cannot tell, for the two towers SD3 uses (chosen by width)
KNOWN_CLIP = {
    768: {"num_attention_heads": 12, "hidden_act": "quick_gelu"},  # OpenAI CLIP-L/14
    1280: {"num_attention_heads": 20, "hidden_act": "gelu"},  # OpenCLIP-G/14
}


def infer_clip_config(shapes: Shapes, hint: Mapping | None = None) -> CLIPTextConfig:
    """CLIP text config from transformers-layout shapes; heads and activation from `hint` or KNOWN_CLIP."""
    vocab, hidden = shapes["text_model.embeddings.token_embedding.weight"]
    if not hint and hidden not in KNOWN_CLIP:
        known = " or ".join(map(str, KNOWN_CLIP))
        raise WeightsError(f"unknown CLIP text tower of width {hidden} (known: {known}); add its config.json")
    layers = {k.split(".")[3] for k in shapes if k.startswith("text_model.encoder.layers.")}
    projection = shapes.get("text_projection.weight", (hidden,))[0]
    return CLIPTextConfig.from_dict(
        {
            **KNOWN_CLIP.get(hidden, {}),
            **(hint or {}),
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
            "projection_dim": projection,
            "num_hidden_layers": len(layers),
            "max_position_embeddings": shapes["text_model.embeddings.position_embedding.weight"][0],
        }
    )


def infer_t5_config(shapes: Shapes, hint: Mapping | None = None) -> T5Config:
    """T5 encoder config from transformers-layout shapes (heads from the relative-position table)."""
    hint = dict(hint or {})
    vocab, d_model = shapes["shared.weight"]
    attention = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = shapes[attention + "relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    hint.setdefault("feed_forward_proj", "gated-gelu" if gated else "relu")
    d_ff = shapes[f"encoder.block.0.layer.1.DenseReluDense.wi{'_0' if gated else ''}.weight"][0]
    return T5Config.from_dict(
        {
            **hint,
            "vocab_size": vocab,
            "d_model": d_model,
            "d_kv": shapes[attention + "q.weight"][0] // heads,
            "d_ff": d_ff,
            "num_layers": len({k.split(".")[2] for k in shapes if k.startswith("encoder.block.")}),
            "num_heads": heads,
            "relative_attention_num_buckets": buckets,
        }
    )


# ---------------------------------------------------------------------------------------------
# Building the components


def dequantize_scaled_fp8(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """ComfyUI's scaled float8: `x.weight` (already decoded from e4m3fn) times its scalar `x.scale_weight`."""
    out = {}
    for key, value in weights.items():
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input")):
            continue
        scale = weights.get(key.removesuffix("weight") + "scale_weight") if key.endswith(".weight") else None
        if scale is not None:
            if scale.size != 1:
                raise WeightsError(f"{key}: only per-tensor scaled float8 is supported (scale shape {scale.shape})")
            value = value.astype(mx.float32) * scale.astype(mx.float32).reshape(())
        out[key] = value
    return out


def _cast(weights: Mapping[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def _shapes(weights: Mapping[str, mx.array]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in weights.items()}


def _infer(fn: Callable, weights: Mapping[str, mx.array], hint: Mapping | None, where: str):
    try:
        return fn(_shapes(weights), hint)
    except KeyError as e:
        raise WeightsError(f"{where}: incomplete checkpoint, no tensor {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, WeightsError):
            raise WeightsError(f"{where}: {e}") from None
        raise WeightsError(f"{where}: unsupported configuration ({e})") from None


def _map(fn: Callable, weights: Mapping[str, mx.array], where: str, **kwargs) -> dict[str, mx.array]:
    out = {}
    for key, value in weights.items():
        try:
            out.update(fn(key, value, **kwargs))
        except KeyError:
            raise WeightsError(f"{where}: unknown tensor {key}") from None
    return out


def _load(model, weights: Mapping[str, mx.array], dtype: mx.Dtype, source: Path, what: str):
    if dtype != mx.float32:
        model.set_dtype(dtype)
    return load_into(model, _cast(weights, dtype), {k: source for k in weights}, what=what)


def build_transformer(
    weights: Mapping[str, mx.array], dtype: mx.Dtype, source: Path, hint: Mapping | None = None
) -> SD3Transformer2DModel:
    weights = dequantize_scaled_fp8(weights)  # ComfyUI also ships scaled float8 MMDiTs
    config = _infer(infer_mmdit_config, weights, hint, f"{source} (MMDiT)")
    mapped = _map(map_mmdit_weights, weights, f"{source} (MMDiT)", num_layers=config.num_layers)
    return _load(SD3Transformer2DModel(config), sanitize_transformer_weights(mapped), dtype, source, "transformer")


def build_vae(
    weights: Mapping[str, mx.array], dtype: mx.Dtype, source: Path, hint: Mapping | None = None
) -> AutoencoderKL:
    config = _infer(infer_vae_config, weights, hint, f"{source} (VAE)")
    levels = len(config.block_out_channels)
    mapped = _map(map_vae_weights, weights, f"{source} (VAE)", num_levels=levels)
    return _load(AutoencoderKL(config), sanitize_vae_weights(mapped), dtype, source, "vae")


def build_clip(
    weights: Mapping[str, mx.array], dtype: mx.Dtype, source: Path, hint: Mapping | None = None, what: str = "CLIP"
) -> CLIPTextModel:
    weights = sanitize_clip_weights(dict(weights))
    config = _infer(infer_clip_config, weights, hint, f"{source} ({what})")
    model = CLIPTextModel(config, projection="text_projection.weight" in weights)
    return _load(model, weights, dtype, source, what)


def build_t5(
    weights: Mapping[str, mx.array], dtype: mx.Dtype, source: Path, hint: Mapping | None = None
) -> T5EncoderModel:
    if dtype == mx.float16:
        warnings.warn("T5 overflows in float16; loading the T5 text encoder in bfloat16 instead", stacklevel=3)
        dtype = mx.bfloat16
    weights = sanitize_t5_weights(dict(weights))
    config = _infer(infer_t5_config, weights, hint, f"{source} (T5)")
    return _load(T5EncoderModel(config), weights, dtype, source, "T5 encoder")


# ---------------------------------------------------------------------------------------------
# Sidecar files, all in the checkpoint's own folder (never further up: a stray config.json there
# could change GroupNorm groups or CLIP heads, which no tensor shape would catch)


def _hint(root: Path, folder: str) -> dict | None:
    path = root / folder / "config.json"
    return read_json(path) if path.is_file() else None


def _tokenizer(root: Path, name: str, class_name: str):
    """The checkpoint's tokenizer folder; else the one of the SD3.5 Medium repo in the HF cache (fetched
    if allowed: the tokenizer files alone are a few MB)."""
    folder = root / name
    if not folder.is_dir():
        try:
            folder = hub.download_tokenizers(_REPO) / name
        except hub.ModelSourceError as e:
            raise WeightsError(
                f"no {name}/ folder in {root} (single-file checkpoints carry no tokenizers) and none from the "
                f"Hub ({e}); copy tokenizer/, tokenizer_2/ and tokenizer_3/ of {_REPO} next to the checkpoint"
            ) from None
    return load_tokenizer(folder, class_name)


def _text_encoder_weights(
    name: str, embedded: dict[str, mx.array], root: Path, checkpoint: Path
) -> tuple[dict[str, mx.array], Path] | None:
    """A text encoder's tensors: those inside the checkpoint (ComfyUI), else its file in text_encoders/ (or
    next to the checkpoint)."""
    if embedded:
        return dequantize_scaled_fp8(embedded), checkpoint
    for file in TEXT_ENCODER_FILES[name]:
        path = next((p for p in (root / "text_encoders" / file, root / file) if p.is_file()), None)
        if path is not None:
            weights, _ = load_safetensors(path)  # native dtypes; float8 decoded to float32
            return dequantize_scaled_fp8(weights), path
    return None


# ---------------------------------------------------------------------------------------------
# Entry point


def load_single_file(path: str | os.PathLike, dtype: mx.Dtype, *, load_t5: bool = True) -> PipelineParts:
    """Pipeline parts from a single-file checkpoint, or from a folder holding one and its sidecar files."""
    checkpoint = find_checkpoint(Path(path))
    root = checkpoint.parent
    weights, _ = load_safetensors(checkpoint)  # lazy: nothing is read yet
    if not _has_mmdit(weights):
        raise WeightsError(f"{checkpoint}: {describe_checkpoint(weights)}")
    groups = _split_by_prefix(weights)
    if not groups["vae"]:
        raise WeightsError(f"{checkpoint}: no VAE (first_stage_model.*) in the checkpoint")

    transformer = build_transformer(groups["mmdit"], dtype, checkpoint, _hint(root, "transformer"))
    vae = build_vae(groups["vae"], dtype, checkpoint, _hint(root, "vae"))

    encoders = {}
    for name, folder in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        found = _text_encoder_weights(name, groups[name], root, checkpoint)
        if found is None:
            raise WeightsError(
                f"{checkpoint}: no {name} text encoder, neither inside nor text_encoders/{name}.safetensors"
            )
        encoders[folder] = build_clip(found[0], dtype, found[1], _hint(root, folder), what=name)
    kwargs = dict(
        text_encoder=encoders["text_encoder"],
        text_encoder_2=encoders["text_encoder_2"],
        tokenizer=_tokenizer(root, "tokenizer", "CLIPTokenizer"),
        tokenizer_2=_tokenizer(root, "tokenizer_2", "CLIPTokenizer"),
    )
    if load_t5:
        found = _text_encoder_weights("t5xxl", groups["t5xxl"], root, checkpoint)
        if found is None:
            files = " or ".join(TEXT_ENCODER_FILES["t5xxl"][:2])
            raise WeightsError(f"{checkpoint}: no T5, neither inside nor text_encoders/{files}; pass load_t5=False")
        kwargs["text_encoder_3"] = build_t5(found[0], dtype, found[1], _hint(root, "text_encoder_3"))
        kwargs["tokenizer_3"] = _tokenizer(root, "tokenizer_3", "T5TokenizerFast")

    scheduler = root / "scheduler"
    return PipelineParts(
        transformer=transformer,
        vae=vae,
        prompt_encoder=PromptEncoder(**kwargs, joint_attention_dim=transformer.config.joint_attention_dim),
        schedule=load_schedule(scheduler) if scheduler.is_dir() else FlowMatchSchedule(),
    )
