"""What every rank must agree on before generating: the settings, field by field, and the weights' identity.

Weights are identified by their files, not read whole (16 GB would take a minute at every start):
each `*.safetensors` and `*.json` file of the model (for a single-file checkpoint: the file and its
`text_encoders/` folder), by relative path, size and a SHA-256 of its first and last MiB. The first
MiB holds a safetensors header (every tensor's name, dtype, shape and offset), so another
checkpoint, dtype, quantization or conversion shows; the last MiB samples tensor bytes. Hugging
Face cache snapshots and copies (rsync, scp) of the same files give the same identity; file times
are left out because copies do not keep them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx

SAMPLE_BYTES = 1 << 20
_T5_PARTS = ("text_encoder_3", "tokenizer_3")


def digest(value) -> str:
    """A short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_identity(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]


def weight_files(source: Path, *, load_t5: bool = True) -> list[Path]:
    """The files whose identity stands for the model at `source` (a folder or a .safetensors file)."""
    source = Path(source)
    if source.is_file():
        root, files = source.parent, [source]
        if (source.parent / "text_encoders").is_dir():
            files += sorted(p for p in (root / "text_encoders").iterdir() if p.suffix == ".safetensors")
    else:
        root, files = source, []
        for folder, _, names in os.walk(source, followlinks=True):
            files += [Path(folder) / n for n in names if n.endswith((".safetensors", ".json"))]
    files = [p for p in files if not p.name.startswith(".")]
    if not load_t5:
        files = [p for p in files if not any(part in _T5_PARTS or part.startswith("t5") for part in p.parts)]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def weights_identity(source: Path, *, load_t5: bool = True) -> str:
    source = Path(source)
    root = source.parent if source.is_file() else source
    return digest([(str(p.relative_to(root)), file_identity(p)) for p in weight_files(source, load_t5=load_t5)])


def fingerprint(settings: Mapping, model_source: Path, *, load_t5: bool = True, files: Mapping = ()) -> dict:
    """One hash per thing the ranks must share: each setting, the weights, input files, the versions.

    `files`: other inputs by name (an img2img image), hashed by content.
    """
    from sd35m_mlx import __version__

    out = {f"setting {name}": digest(value) for name, value in settings.items()}
    out["model files"] = weights_identity(model_source, load_t5=load_t5)
    for name, path in dict(files).items():
        out[name] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    out["sd35m-mlx version"] = digest(__version__)
    out["mlx version"] = digest(mx.__version__)
    return out


def differences(mine: Mapping, theirs: Mapping) -> list[str]:
    """The names whose hashes differ (or that only one side has)."""
    return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
