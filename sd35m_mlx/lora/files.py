"""Finding and reading LoRA files: local `.safetensors` paths or Hugging Face Hub ids, never pickles."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import mlx.core as mx

from ..loading import hub
from ..loading.safetensors_io import WeightsError, read_header
from .adapter import LoraError

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes


def resolve(source: str | os.PathLike, weight_name: str | None = None, revision: str | None = None) -> Path:
    """A local LoRA file for `source`: a path (file, or folder with one .safetensors / diffusers' name),
    `owner/repo` with `weight_name`, or `owner/repo/path/file.safetensors`, through the HF cache."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        path = _pick(path, weight_name, str(source))
    if path.is_file():
        return _check_suffix(path)
    text = str(source)
    if text.lower().endswith(PICKLE_SUFFIXES) or (weight_name or "").lower().endswith(PICKLE_SUFFIXES):
        _check_suffix(Path(weight_name or text))
    parts = text.split("/")
    if len(parts) >= 3 and text.endswith(".safetensors") and not text.startswith(("/", ".", "~")):
        return _download("/".join(parts[:2]), "/".join(parts[2:]), revision)
    if hub.is_hub_id(text):
        if weight_name is None:
            return _pick(_snapshot(text, revision), None, text)
        return _download(text, weight_name, revision)
    raise LoraError(f"LoRA {text}: no such file (give a .safetensors path, a Hub id owner/repo, or owner/repo/file)")


def _check_suffix(path: Path) -> Path:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(f"LoRA {path}: pickle files ({path.suffix}) can run code and are never loaded; use safetensors")
    return path


def _pick(folder: Path, weight_name: str | None, what: str) -> Path:
    if weight_name is not None:
        return _check_suffix(folder / weight_name)
    files = sorted(folder.rglob("*.safetensors"))
    preferred = [f for f in files if f.name == DIFFUSERS_WEIGHT_NAME]
    if len(preferred) == 1 or len(files) == 1:
        return (preferred or files)[0]
    if not files:
        raise LoraError(f"LoRA {what}: no .safetensors file in it")
    names = ", ".join(str(f.relative_to(folder)) for f in files[:5])
    raise LoraError(f"LoRA {what}: several .safetensors files ({names}); name one with weight_name")


def _snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.safetensors"]))
    except Exception as e:
        message = hub.explain(e, repo_id, revision, load_t5=False)
        if message is None:
            raise
        raise LoraError(_for_lora(message)) from e


def _for_lora(message: str) -> str:
    return "LoRA " + message.replace("a local diffusers-layout folder", "a local LoRA .safetensors file")


def _download(repo_id: str, filename: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    _check_suffix(Path(filename))
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except Exception as e:
        if type(e).__name__ == "EntryNotFoundError":
            raise LoraError(f"LoRA {repo_id}: no file {filename} in the repo") from e
        message = hub.explain(e, repo_id, revision, load_t5=False)
        if message is None:
            raise
        raise LoraError(_for_lora(message)) from e


def read(path: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """(tensors, header metadata) of a LoRA safetensors file, float8 decoded, everything else as stored."""
    try:
        header = read_header(path)
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except WeightsError as e:
        raise LoraError(f"LoRA {e}") from None
    except Exception as e:
        raise LoraError(f"LoRA {path}: cannot read safetensors ({e})") from None
    for key, info in header.items():
        if isinstance(info, dict) and str(info.get("dtype", "")).startswith("F8_E4M3"):
            tensors[key] = mx.from_fp8(tensors[key], dtype=mx.float32)
    return tensors, dict(metadata or {})


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
