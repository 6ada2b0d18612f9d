"""Read safetensors files (single or sharded) straight into lazy MLX arrays."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# Highest priority first: what diffusers and transformers write, then anything else.
_INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
_SINGLE_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


class WeightsError(ValueError):
    """A checkpoint that cannot be used as asked; the message names file and key."""


def read_header(path: str | os.PathLike) -> dict:
    """Parse and validate a safetensors header (catches truncated and corrupt files)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightsError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise WeightsError(f"{path}: corrupt or truncated safetensors header")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path}: corrupt safetensors header ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end})")
    return header


def find_weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of one component folder, following a shard index if present."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise WeightsError(f"{folder}: no such folder")
    for name in _INDEX_NAMES:
        index = folder / name
        if index.exists():
            content = read_json(index)
            weight_map = content.get("weight_map") if isinstance(content, dict) else None
            if not isinstance(weight_map, dict):
                raise WeightsError(f"{index}: no weight_map")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (folder / f).exists()]
            if missing:
                raise WeightsError(f"{index}: shard {missing[0]} is missing")
            return [folder / f for f in files]
    for name in _SINGLE_NAMES:
        if (folder / name).exists():
            return [folder / name]
    files = sorted(p for p in folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder}: no .safetensors weights found (pickle checkpoints are never loaded)")
    return files


def _is_float(dtype: mx.Dtype) -> bool:
    return mx.issubdtype(dtype, mx.floating)


def load_safetensors(
    source: str | os.PathLike | Iterable[str | os.PathLike], dtype: mx.Dtype | None = None
) -> tuple[dict[str, mx.array], dict[str, Path]]:
    """Lazily load every tensor of a file, a list of files or a component folder.

    Returns (weights, origin) where origin maps each key to its file, for error messages.
    Floating tensors are cast to `dtype` (lazily, so no full-precision copy is held);
    float8 e4m3fn tensors (read by MLX as uint8) are decoded to `dtype` or float32.
    """
    files = find_weight_files(source) if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
    weights: dict[str, mx.array] = {}
    origin: dict[str, Path] = {}
    for path in files:
        header = read_header(path)
        try:
            arrays = mx.load(str(path))
        except Exception as e:  # MLX raises a bare RuntimeError/ValueError without the path
            raise WeightsError(f"{path}: cannot read safetensors ({e})") from None
        for key, value in arrays.items():
            stored = header.get(key, {}).get("dtype", "")
            if stored.startswith("F8_E4M3"):
                value = mx.from_fp8(value, dtype=dtype or mx.float32)
            elif dtype is not None and _is_float(value.dtype) and value.dtype != dtype:
                value = value.astype(dtype)
            if key in weights:
                raise WeightsError(f"{path}: key {key} also appears in {origin[key]}")
            weights[key] = value
            origin[key] = path
    return weights, origin


def read_json(path: str | os.PathLike):
    """A JSON file's content; a one-line WeightsError naming the file when it is unreadable or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: invalid JSON ({e})") from None
    except OSError as e:
        raise WeightsError(f"{path}: cannot be read ({e.strerror or e})") from None


def read_config(folder: str | os.PathLike, name: str = "config.json") -> dict:
    path = Path(folder) / name
    if not path.exists():
        raise WeightsError(f"{path}: missing (is {folder} a diffusers-layout component folder?)")
    config = read_json(path)
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def materialize(*modules: nn.Module | None) -> None:
    """Read (and cast) lazily loaded weights one tensor at a time, largest first. Evaluated together (at
    a first forward or one mx.eval), a float32 file's casts to bfloat16 are all in flight at once.

    Each floating tensor is checked to be finite as it is read (one reduction, evaluated with it): a damaged
    file or a broken conversion is refused here, naming the file and tensor, instead of giving black images."""
    arrays = [(m, k, v) for m in modules if m is not None for k, v in tree_flatten(m.parameters())]
    for m, name, v in sorted(arrays, key=lambda a: a[2].nbytes, reverse=True):
        if not _is_float(v.dtype):
            mx.eval(v)
            continue
        finite = mx.isfinite(v).all()
        mx.eval(v, finite)
        if not finite.item():
            origins = getattr(m, "_weight_origins", {})
            stem = name.rsplit(".", 1)[0]  # a quantized layer's scales/biases come from its weight
            where = origins.get(name) or origins.get(f"{stem}.weight") or f"the {type(m).__name__} weights"
            raise WeightsError(
                f"{where}: tensor {name} has NaN or infinite values (a damaged download or a broken conversion; "
                "fetch the file again)"
            )


def read_config_as(folder: str | os.PathLike, cls, what: str):
    """`cls.from_dict(config.json)`, with a one-line WeightsError naming the file when it does not fit."""
    try:
        return cls.from_dict(read_config(folder))
    except WeightsError:
        raise
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{Path(folder) / 'config.json'}: not a supported {what} config ({e})") from None


def load_component(folder, config_cls, model_cls, dtype: mx.Dtype, what: str, sanitize=lambda w: w) -> nn.Module:
    """A diffusers component folder: `config.json` into `config_cls`, weights strictly into `model_cls`."""
    config = read_config_as(folder, config_cls, what)
    weights, origin = load_safetensors(folder, dtype)
    model = model_cls(config)
    if dtype != mx.float32:
        model.set_dtype(dtype)
    return load_into(model, sanitize(weights), origin, what=what)


def load_into(
    module: nn.Module,
    weights: Mapping[str, mx.array],
    origin: Mapping[str, Path] | None = None,
    what: str = "",
) -> nn.Module:
    """Strictly load `weights` into `module`: every parameter present, nothing extra, shapes equal."""
    origin = origin or {}
    expected = dict(tree_flatten(module.parameters()))
    where = f" ({what})" if what else ""
    missing = [k for k in expected if k not in weights]
    if missing:
        files = sorted({str(p) for p in origin.values()}) or ["the given weights"]
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise WeightsError(f"missing key {missing[0]}{more}{where} in {', '.join(files)}")
    unexpected = [k for k in weights if k not in expected]
    if unexpected:
        k = unexpected[0]
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise WeightsError(f"unexpected key {k}{more}{where} in {origin.get(k, 'the given weights')}")
    for k, v in expected.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            raise WeightsError(
                f"wrong shape for {k}{where} in {origin.get(k, 'the given weights')}: "
                f"{tuple(weights[k].shape)}, expected {tuple(v.shape)}"
            )
    module.load_weights(list(weights.items()), strict=True)
    object.__setattr__(module, "_weight_origins", dict(origin))  # for materialize's messages; not a parameter
    return module
