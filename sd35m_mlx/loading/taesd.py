"""Load TAESD (diffusers `AutoencoderTiny`) from a Hub repo id, a diffusers folder or one .safetensors file.

    madebyollin/taesd3                      Hub id: fetches config.json + diffusion_pytorch_model.safetensors
    ./taesd3/                               the same files in a local folder
    diffusion_pytorch_model.safetensors     diffusers keys; a config.json beside it is used when present
    taesd3_decoder.safetensors              madebyollin's raw decoder (keys of a plain nn.Sequential: `1.weight`)

Pickle checkpoints (.pth, .bin) are never loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx

from ..defaults import TAESD3_REPO
from ..models.taesd import AutoencoderTiny, TAESDConfig
from . import hub
from .safetensors_io import WeightsError, load_into, load_safetensors, read_config_as
from .vae import sanitize_vae_weights

_HUB_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")
_WHAT = "AutoencoderTiny"
# TAESD's way out without the Hub: the CLI's --taesd and the API's taesd= take a local copy
_LOCAL = "or pass a local TAESD3 folder or .safetensors file instead (--taesd PATH, taesd=PATH)"


def load_taesd(
    source: str | os.PathLike = TAESD3_REPO, dtype: mx.Dtype = mx.float32, *, revision: str | None = None
) -> AutoencoderTiny:
    """TAESD from a Hub repo id, a diffusers-layout folder, or a .safetensors file (diffusers or raw keys)."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"taesd must be a Hub repo id, a folder or a .safetensors file, got {type(source).__name__}")
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        return _load_folder(path, dtype)
    if path.is_file():
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise WeightsError(f"{path}: pickle checkpoints are never loaded; use the .safetensors file")
        return _load_file(path, dtype)
    if hub.is_hub_id(source):  # a local path of the same name has won above
        folder = hub.download_component(str(source), _HUB_FILES, revision=revision, local=_LOCAL)
        if not all((folder / name).exists() for name in _HUB_FILES):
            raise hub.ModelSourceError(
                f"{source}: not a diffusers AutoencoderTiny repo (needs {' and '.join(_HUB_FILES)} at its root)"
            )
        return _load_folder(folder, dtype)
    raise FileNotFoundError(f"{source}: no such TAESD folder or file")


def _load_folder(folder: Path, dtype: mx.Dtype) -> AutoencoderTiny:
    if not (folder / "config.json").exists():
        raise WeightsError(
            f"{folder}: no config.json (a diffusers AutoencoderTiny folder has config.json and "
            "diffusion_pytorch_model.safetensors; pass a raw taesd3_decoder.safetensors as a file path)"
        )
    config = read_config_as(folder, TAESDConfig, _WHAT)
    weights, origin = load_safetensors(folder, dtype)
    return _build(config, weights, origin, dtype)


def _load_file(path: Path, dtype: mx.Dtype) -> AutoencoderTiny:
    weights, origin = load_safetensors([path], dtype)
    if not any(k.startswith(("decoder.", "encoder.")) for k in weights):
        weights = _map_raw(path, weights)
        origin = {k: path for k in weights}
    if "decoder.layers.0.weight" not in weights:
        raise WeightsError(f"{path}: not a TAESD checkpoint (no decoder.layers.0.weight)")
    if (path.parent / "config.json").exists():
        config = read_config_as(path.parent, TAESDConfig, _WHAT)
    else:  # TAESD3's architecture; the latent width from the first decoder conv (O, I, kH, kW)
        config = TAESDConfig(latent_channels=weights["decoder.layers.0.weight"].shape[1])
    return _build(config, weights, origin, dtype)


def _map_raw(path: Path, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """madebyollin's raw files hold one nn.Sequential each: the decoder starts at `1.` (0 is the
    parameter-free Clamp), the encoder at `0.`."""
    if "0.weight" in weights:
        raise WeightsError(
            f"{path}: a raw TAESD encoder file; pass the decoder (taesd3_decoder.safetensors), "
            "or a diffusers AutoencoderTiny folder for both"
        )
    try:
        return dict(pair for key, value in weights.items() for pair in map_raw_decoder_weights(key, value))
    except KeyError as e:
        raise WeightsError(f"{path}: not a TAESD checkpoint (unexpected key {e.args[0]})") from None


def map_raw_decoder_weights(key: str, value: mx.array) -> list[tuple[str, mx.array]]:
    """One tensor of madebyollin's raw decoder (`3.conv.0.weight`) -> ours (`decoder.layers.2.conv.0.weight`).

    Raises KeyError for a key that is not `<index>.<rest>` with index >= 1.
    """
    index, _, rest = key.partition(".")
    if not index.isdigit() or int(index) < 1 or not rest:
        raise KeyError(key)
    return [(f"decoder.layers.{int(index) - 1}.{rest}", value)]


def _build(config: TAESDConfig, weights: dict[str, mx.array], origin, dtype: mx.Dtype) -> AutoencoderTiny:
    model = AutoencoderTiny(config, encoder=any(k.startswith("encoder.") for k in weights))
    if dtype != mx.float32:
        model.set_dtype(dtype)
    # PyTorch convs are OIHW, MLX's OHWI (every TAESD tensor of rank 4 is a conv weight)
    return load_into(model, sanitize_vae_weights(weights), origin, what=_WHAT)
