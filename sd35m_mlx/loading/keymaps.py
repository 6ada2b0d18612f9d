"""Key maps from the Stability single-file layout to our (diffusers) names, mlx-examples style:
`map_*_weights(key, value) -> [(key, value), ...]`, one source tensor to one or more of ours.

Keys arrive without their file prefix (`model.diffusion_model.`, `first_stage_model.`).
Splits and swaps are slices and concatenations of lazy arrays: nothing is read until evaluated.
diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` and `convert_ldm_vae_checkpoint`
(diffusers/loaders/single_file_utils.py) are the executable reference; tests check the two agree.
"""

from __future__ import annotations

import mlx.core as mx

Pairs = list[tuple[str, mx.array]]

# ---------------------------------------------------------------------------------------------
# MMDiT: `model.diffusion_model.*` -> SD3Transformer2DModel

_MMDIT_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}

# (stream, module inside the stream) -> our module(s) inside transformer_blocks.i; 3 names = fused qkv
_MMDIT_BLOCK = {
    ("x_block", "attn.qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("x_block", "attn.ln_q"): ("attn.norm_q",),
    ("x_block", "attn.ln_k"): ("attn.norm_k",),
    ("x_block", "attn.proj"): ("attn.to_out.0",),
    ("x_block", "attn2.qkv"): ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    ("x_block", "attn2.ln_q"): ("attn2.norm_q",),
    ("x_block", "attn2.ln_k"): ("attn2.norm_k",),
    ("x_block", "attn2.proj"): ("attn2.to_out.0",),
    ("x_block", "adaLN_modulation.1"): ("norm1.linear",),
    ("x_block", "mlp.fc1"): ("ff.net.0.proj",),
    ("x_block", "mlp.fc2"): ("ff.net.2",),
    ("context_block", "attn.qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("context_block", "attn.ln_q"): ("attn.norm_added_q",),
    ("context_block", "attn.ln_k"): ("attn.norm_added_k",),
    ("context_block", "attn.proj"): ("attn.to_add_out",),
    ("context_block", "adaLN_modulation.1"): ("norm1_context.linear",),
    ("context_block", "mlp.fc1"): ("ff_context.net.0.proj",),
    ("context_block", "mlp.fc2"): ("ff_context.net.2",),
}


def mmdit_module_names(num_layers: int) -> list[str]:
    """Every single-file MMDiT module name `map_mmdit_weights` knows for a model of this depth (LoRA
    loaders build their key tables from it)."""
    blocks = [f"joint_blocks.{i}.{stream}.{inner}" for i in range(num_layers) for stream, inner in _MMDIT_BLOCK]
    return [*_MMDIT_TOP, *blocks]


def split_qkv(value: mx.array) -> list[mx.array]:
    """A fused q|k|v projection (rows stacked on axis 0) as three lazy slices."""
    n = value.shape[0] // 3
    return [value[i * n : (i + 1) * n] for i in range(3)]


def swap_halves(value: mx.array) -> mx.array:
    """(shift, scale) rows -> (scale, shift): the reference code and diffusers chunk the 2-way adaLN
    of the final layer and of the context-pre-only block in opposite orders."""
    n = value.shape[0] // 2
    return mx.concatenate([value[n:], value[:n]], axis=0)


def map_mmdit_weights(key: str, value: mx.array, num_layers: int) -> Pairs:
    """One single-file MMDiT tensor -> our key(s). Raises KeyError for a key that is not SD3's."""
    if key == "pos_embed":
        return [("pos_embed.pos_embed", value)]
    module, _, param = key.rpartition(".")
    if module in _MMDIT_TOP:
        if module == "final_layer.adaLN_modulation.1":
            value = swap_halves(value)
        return [(f"{_MMDIT_TOP[module]}.{param}", value)]
    parts = module.split(".", 3)
    if len(parts) < 4 or parts[0] != "joint_blocks" or (parts[2], parts[3]) not in _MMDIT_BLOCK:
        raise KeyError(key)
    _, index, stream, inner = parts
    targets = _MMDIT_BLOCK[stream, inner]
    prefix = f"transformer_blocks.{index}."
    if len(targets) == 3:
        return [(f"{prefix}{t}.{param}", v) for t, v in zip(targets, split_qkv(value), strict=True)]
    if (stream, inner) == ("context_block", "adaLN_modulation.1") and int(index) == num_layers - 1:
        value = swap_halves(value)  # the last block is context-pre-only: a 2-way (shift, scale) adaLN
    return [(f"{prefix}{targets[0]}.{param}", value)]


# ---------------------------------------------------------------------------------------------
# VAE: LDM `first_stage_model.*` -> AutoencoderKL

_VAE_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _vae_module(side: str, path: list[str], num_levels: int) -> str | None:
    """Our module name for an LDM module path below `encoder.`/`decoder.` (None if unknown)."""
    match path:
        case [name] if name in _VAE_TOP:
            return f"{side}.{_VAE_TOP[name]}"
        case ["mid", "block_1" | "block_2" as block, layer] if layer in _VAE_RESNET:
            return f"{side}.mid_block.resnets.{int(block[-1]) - 1}.{_VAE_RESNET[layer]}"
        case ["mid", "attn_1", layer] if layer in _VAE_ATTENTION:
            return f"{side}.mid_block.attentions.0.{_VAE_ATTENTION[layer]}"
        case ["down", level, "block", j, layer] if side == "encoder" and layer in _VAE_RESNET:
            return f"encoder.down_blocks.{level}.resnets.{j}.{_VAE_RESNET[layer]}"
        case ["down", level, "downsample", "conv"] if side == "encoder":
            return f"encoder.down_blocks.{level}.downsamplers.0.conv"
        case ["up", level, "block", j, layer] if side == "decoder" and layer in _VAE_RESNET:
            # LDM numbers decoder levels from the lowest resolution up; diffusers from the top down
            return f"decoder.up_blocks.{num_levels - 1 - int(level)}.resnets.{j}.{_VAE_RESNET[layer]}"
        case ["up", level, "upsample", "conv"] if side == "decoder":
            return f"decoder.up_blocks.{num_levels - 1 - int(level)}.upsamplers.0.conv"
    return None


def map_vae_weights(key: str, value: mx.array, num_levels: int) -> Pairs:
    """One LDM VAE tensor -> our key. The mid-block attention's 1x1 convs become Linear weights.

    `num_levels` is len(block_out_channels). Raises KeyError for a key that is not an LDM VAE's.
    """
    module, _, param = key.rpartition(".")
    path = module.split(".")
    if path[0] in ("quant_conv", "post_quant_conv") and len(path) == 1:
        return [(f"{module}.{param}", value)]
    target = _vae_module(path[0], path[1:], num_levels) if path[0] in ("encoder", "decoder") else None
    if target is None:
        raise KeyError(key)
    if ".attentions." in target and value.ndim == 4:
        value = value.reshape(value.shape[:2])
    return [(f"{target}.{param}", value)]
