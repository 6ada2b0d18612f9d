"""Load SD3's text encoders (CLIP-L, OpenCLIP-G, T5-XXL) and their transformers tokenizers from a
diffusers-layout folder (text_encoder{,_2,_3}/ and tokenizer{,_2,_3}/)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mlx.core as mx

from ..models.clip import CLIPTextConfig, CLIPTextModel
from ..models.prompt_encoder import PromptEncoder
from ..models.t5 import T5Config, T5EncoderModel
from .safetensors_io import WeightsError, load_into, load_safetensors, read_config_as, read_json

# tokenizer classes a diffusers model_index.json may name for each slot (first: the default)
_CLIP_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
_T5_TOKENIZERS = ("T5TokenizerFast", "T5Tokenizer")


def sanitize_clip_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    # transformers derives position ids; some exports still carry the buffer
    return {k: v for k, v in weights.items() if not k.endswith("embeddings.position_ids")}


def sanitize_t5_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """`encoder.embed_tokens.weight` is tied to `shared.weight`: keep one, named `shared.weight`."""
    weights = dict(weights)
    embed = weights.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in weights and embed is not None:
        weights["shared.weight"] = embed
    return weights


def load_clip_encoder(
    source: str | os.PathLike, dtype: mx.Dtype = mx.float32, config: CLIPTextConfig | None = None
) -> CLIPTextModel:
    """A CLIP text tower from a `text_encoder/` folder (or a safetensors file, with `config` given).

    `text_projection` is used when the checkpoint has it, identity otherwise.
    """
    source = Path(source)
    config = config or read_config_as(source, CLIPTextConfig, "CLIP text")
    weights, origin = load_safetensors(source, dtype)
    weights = sanitize_clip_weights(weights)
    model = CLIPTextModel(config, projection="text_projection.weight" in weights)
    model.set_dtype(dtype)
    return load_into(model, weights, origin, what=f"CLIP text encoder {source.name}")


def load_t5_encoder(
    source: str | os.PathLike, dtype: mx.Dtype = mx.float32, config: T5Config | None = None
) -> T5EncoderModel:
    """The T5 encoder from a `text_encoder_3/` folder (or a safetensors file, with `config` given).

    float16 is not used for T5 (its activations overflow float16's range): it loads in bfloat16,
    which has float32's range at float16's size, with a warning.
    """
    if dtype == mx.float16:
        warnings.warn("T5 overflows in float16; loading the T5 text encoder in bfloat16 instead", stacklevel=2)
        dtype = mx.bfloat16
    source = Path(source)
    config = config or read_config_as(source, T5Config, "T5 encoder")
    weights, origin = load_safetensors(source, dtype)
    model = T5EncoderModel(config)
    model.set_dtype(dtype)
    return load_into(model, sanitize_t5_weights(weights), origin, what=f"T5 encoder {source.name}")


def load_tokenizer(folder: str | os.PathLike, class_name: str):
    import transformers  # heavy: only when a tokenizer is actually loaded

    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: tokenizer folder missing")
    return getattr(transformers, class_name).from_pretrained(folder)


def _tokenizer_class(folder: Path, slot: str, allowed: tuple[str, ...]) -> str:
    """The class model_index.json names for `slot` when it is one we accept, else the default."""
    index = folder / "model_index.json"
    if index.exists():
        content = read_json(index)
        entry = (content.get(slot) if isinstance(content, dict) else None) or [None, None]
        if entry[-1] in allowed:
            return entry[-1]
    return allowed[0]


def _joint_attention_dim(folder: Path) -> int:
    """Width of the zeros standing in for T5 when it is skipped (diffusers reads the transformer's)."""
    for sub, key in (("transformer", "joint_attention_dim"), ("text_encoder_3", "d_model")):
        path = folder / sub / "config.json"
        if path.exists():
            content = read_json(path)
            value = content.get(key) if isinstance(content, dict) else None
            if value:
                return int(value)
    return T5Config.d_model


def load_text_encoders(
    folder: str | os.PathLike, dtype: mx.Dtype = mx.float32, *, load_t5: bool = True
) -> PromptEncoder:
    """The three encoders and tokenizers of a diffusers-layout SD3 folder, ready to `encode_prompt`.

    With `load_t5=False` T5 is neither loaded nor run: zeros take its place, as in diffusers
    (saves ~9.5 GB, at some cost in prompt following). float16 T5 runs in bfloat16 instead.
    """
    folder = Path(folder)
    kwargs = {}
    for suffix in ("", "_2"):
        kwargs[f"text_encoder{suffix}"] = load_clip_encoder(folder / f"text_encoder{suffix}", dtype)
        cls = _tokenizer_class(folder, f"tokenizer{suffix}", _CLIP_TOKENIZERS)
        kwargs[f"tokenizer{suffix}"] = load_tokenizer(folder / f"tokenizer{suffix}", cls)
    if load_t5:
        if not (folder / "text_encoder_3").is_dir():
            raise WeightsError(f"{folder}: no text_encoder_3/ (T5); pass load_t5=False to run without it")
        kwargs["text_encoder_3"] = load_t5_encoder(folder / "text_encoder_3", dtype)
        cls = _tokenizer_class(folder, "tokenizer_3", _T5_TOKENIZERS)
        kwargs["tokenizer_3"] = load_tokenizer(folder / "tokenizer_3", cls)
    return PromptEncoder(**kwargs, joint_attention_dim=_joint_attention_dim(folder))
