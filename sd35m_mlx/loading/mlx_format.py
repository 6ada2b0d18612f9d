"""Converted MLX weights: write any loadable source once, load it with no conversion work afterwards.

Layout (mlx-lm conventions, one folder per component, as a diffusers folder):

    model_index.json          diffusers' index plus "sd35m_mlx": {"format": 1, "dtype": ...}
    transformer/ vae/ text_encoder/ text_encoder_2/ [text_encoder_3/]
        config.json           the component config, plus "quantization": {"group_size", "bits"} if quantized
        model.safetensors or model-0000i-of-0000n.safetensors, and model.safetensors.index.json
    tokenizer/ tokenizer_2/ [tokenizer_3/] scheduler/

Tensors use our module's own key names and layouts (conv weights OHWI, T5's embedding as
`shared.weight`, quantized layers as weight/scales/biases), so loading is: build the module,
quantize the Linear layers whose `scales` are stored, `load_weights` strictly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..models.clip import CLIPTextConfig, CLIPTextModel
from ..models.mmdit import MMDiTConfig, SD3Transformer2DModel
from ..models.prompt_encoder import PromptEncoder
from ..models.t5 import T5Config, T5EncoderModel
from ..models.vae import AutoencoderKL, VAEConfig
from ..quantize import Quantization, quantization_config
from .parts import PipelineParts, load_schedule
from .safetensors_io import WeightsError, load_into, load_safetensors, read_config, read_json
from .text_encoders import _CLIP_TOKENIZERS, _T5_TOKENIZERS, _tokenizer_class, load_tokenizer

FORMAT_KEY = "sd35m_mlx"
FORMAT_VERSION = 1
# mlx-lm writes 5 GB shards; smaller ones keep conversion's peak memory (one shard is evaluated at a
# time) low on 8 GB Macs, and loading is lazy, so the shard count costs nothing there.
MAX_SHARD_BYTES = 2 << 30
DTYPE_NAMES = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}

# component -> (diffusers/transformers class name in model_index.json and config.json)
_CLASS_NAMES = {
    "transformer": ("diffusers", "SD3Transformer2DModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_3": ("transformers", "T5EncoderModel"),
}


# what the official repo's model_index.json names (our loader also takes the fast/slow sibling)
_TOKENIZER_SUFFIXES = (".json", ".txt", ".model")  # tokenizer*.json, vocab.json, merges.txt, spiece.model
_TOKENIZER_CLASSES = {"tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer", "tokenizer_3": "T5TokenizerFast"}


def is_converted_folder(path: str | os.PathLike) -> bool:
    index = Path(path) / "model_index.json"
    try:
        return FORMAT_KEY in json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        return False


# -- writing ---------------------------------------------------------------------------------------


def _save_sharded(weights: dict[str, mx.array], folder: Path, max_bytes: int | None = None) -> int:
    """Write `weights` as model*.safetensors + index, emptying the dict shard by shard (frees memory)."""
    max_bytes = max_bytes or MAX_SHARD_BYTES
    shards: list[list[str]] = [[]]
    size = 0
    for key, value in weights.items():
        if shards[-1] and size + value.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += value.nbytes
    total = sum(v.nbytes for v in weights.values())
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for name, keys in zip(names, shards, strict=True):
        mx.save_safetensors(str(folder / name), {k: weights[k] for k in keys}, metadata={"format": "mlx"})
        for k in keys:
            del weights[k]
            weight_map[k] = name
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def _save_tokenizer(tokenizer, folder: Path) -> None:
    """Copy the tokenizer files it was loaded from (every transformers version reads those; the hub
    cache's symlinks become files), else let transformers write them."""
    source = Path(getattr(tokenizer, "name_or_path", "") or "")
    files = [p for p in source.iterdir() if p.is_file() and p.suffix in _TOKENIZER_SUFFIXES] if source.is_dir() else []
    if not files:
        tokenizer.save_pretrained(folder)
        return
    folder.mkdir()
    for path in files:
        shutil.copyfile(path, folder / path.name)


def _write_component(folder: Path, name: str, model: nn.Module) -> int:
    """config.json + shards for one model; drops the model's arrays as they are written."""
    folder.mkdir()
    config = {"_class_name": _CLASS_NAMES[name][1], **dataclasses.asdict(model.config)}
    quantization = quantization_config(model)
    if quantization is not None:
        config["quantization"] = quantization
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = dict(tree_flatten(model.parameters()))
    model.clear()  # the dict now holds the only references: each shard is freed once written
    return _save_sharded(weights, folder)


def _take_models(parts: PipelineParts) -> dict[str, nn.Module]:
    """The weight-carrying components, removed from `parts` so they can be freed one by one."""
    encoder = parts.prompt_encoder
    models = {"transformer": parts.transformer, "vae": parts.vae}
    for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(encoder, attr) is not None:
            models[attr] = getattr(encoder, attr)
            setattr(encoder, attr, None)
    parts.transformer = parts.vae = None
    return models


def write_converted(parts: PipelineParts, folder: str | os.PathLike, dtype: mx.Dtype, progress=None) -> None:
    """Write loaded (optionally quantized) parts into the empty `folder`. Consumes `parts`' models."""
    say = progress or (lambda _: None)
    folder = Path(folder)
    encoder = parts.prompt_encoder
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        FORMAT_KEY: {"format": FORMAT_VERSION, "dtype": DTYPE_NAMES.get(dtype, str(dtype))},
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    for slot, class_name in _TOKENIZER_CLASSES.items():
        tokenizer = getattr(encoder, slot)
        index[slot] = ["transformers", class_name] if tokenizer is not None else [None, None]
        if tokenizer is not None:
            _save_tokenizer(tokenizer, folder / slot)
    (folder / "scheduler").mkdir()
    schedule = {"_class_name": "FlowMatchEulerDiscreteScheduler", **dataclasses.asdict(parts.schedule)}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(schedule, indent=2) + "\n")
    models = _take_models(parts)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        index[name] = list(_CLASS_NAMES[name]) if name in models else [None, None]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name in list(models):
        size = _write_component(folder / name, name, models.pop(name))
        say(f"Wrote {name}/ ({size / 1e9:.2f} GB)" if size >= 1e8 else f"Wrote {name}/ ({size / 1e6:.1f} MB)")


# -- loading ---------------------------------------------------------------------------------------


def _load_component(folder: Path, dtype: mx.Dtype, build: Callable[[dict, dict], nn.Module], what: str):
    config = read_config(folder)
    weights, origin = load_safetensors(folder, dtype)
    try:
        model = build(config, weights)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{folder / 'config.json'}: not a supported {what} config ({e})") from None
    model.set_dtype(dtype)
    if "quantization" in config:
        _quantize_as_stored(model, config["quantization"], weights, folder / "config.json")
    return load_into(model, weights, origin, what=what)


def _quantize_as_stored(model: nn.Module, entry: dict, weights: dict, config_path: Path) -> None:
    """mlx-lm's rule: a Linear is quantized if the file stores its scales, with its own entry's
    settings if the config has one (layers kept at 8 bits in a 4-bit model), else the main ones."""
    try:
        main = Quantization.from_config(entry)
        layers = {k: Quantization.from_config(v).to_config() for k, v in entry.items() if isinstance(v, dict)}
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{config_path}: bad quantization entry ({e})") from None

    def predicate(path: str, m: nn.Module):
        return isinstance(m, nn.Linear) and f"{path}.scales" in weights and layers.get(path, True)

    nn.quantize(model, main.group_size, main.bits, class_predicate=predicate)


def load_converted(folder: str | os.PathLike, dtype: mx.Dtype, *, load_t5: bool = True) -> PipelineParts:
    """Load a folder written by `convert`, computing in `dtype`.

    Float tensors stored in another dtype are cast on load (a bfloat16 conversion loaded in float32
    computes in float32 with bfloat16-rounded weights); quantized weights stay packed, their scales
    and biases are cast. T5 never runs in float16 (it overflows): bfloat16 instead, with a warning.
    """
    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    version = (index.get(FORMAT_KEY) or {}).get("format")
    if version != FORMAT_VERSION:
        raise WeightsError(
            f"{folder}: converted-weights format {version!r} is not supported by this sd35m-mlx "
            f"(it reads format {FORMAT_VERSION}); convert the original weights again"
        )

    def transformer(config, _):
        return SD3Transformer2DModel(MMDiTConfig.from_dict(config))

    def clip(config, weights):
        return CLIPTextModel(CLIPTextConfig.from_dict(config), projection="text_projection.weight" in weights)

    encoders = {
        slot: _load_component(folder / slot, dtype, clip, f"CLIP text encoder {slot}")
        for slot in ("text_encoder", "text_encoder_2")
    }
    tokenizers = {
        slot: load_tokenizer(folder / slot, _tokenizer_class(folder, slot, _CLIP_TOKENIZERS))
        for slot in ("tokenizer", "tokenizer_2")
    }
    if load_t5:
        if not (folder / "text_encoder_3").is_dir():
            raise WeightsError(f"{folder}: converted without T5 (no text_encoder_3/); load it with load_t5=False")
        t5_dtype = dtype
        if dtype == mx.float16:
            warnings.warn("T5 overflows in float16; loading the T5 text encoder in bfloat16 instead", stacklevel=2)
            t5_dtype = mx.bfloat16
        encoders["text_encoder_3"] = _load_component(
            folder / "text_encoder_3", t5_dtype, lambda c, _: T5EncoderModel(T5Config.from_dict(c)), "T5 encoder"
        )
        tokenizers["tokenizer_3"] = load_tokenizer(
            folder / "tokenizer_3", _tokenizer_class(folder, "tokenizer_3", _T5_TOKENIZERS)
        )
    mmdit = _load_component(folder / "transformer", dtype, transformer, "transformer")
    return PipelineParts(
        transformer=mmdit,
        vae=_load_component(folder / "vae", dtype, lambda c, _: AutoencoderKL(VAEConfig.from_dict(c)), "vae"),
        prompt_encoder=PromptEncoder(**encoders, **tokenizers, joint_attention_dim=mmdit.config.joint_attention_dim),
        schedule=load_schedule(folder / "scheduler"),
    )
