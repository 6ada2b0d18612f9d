"""`sd35m-mlx convert`: load any source the loader takes, quantize as asked, write it in the converted MLX
format (loading/mlx_format.py). Above the loader, as mlx-lm keeps convert.py: the loader reads converted
folders, and converting needs the loader."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from .loading.mlx_format import DTYPE_NAMES, write_converted
from .loading.sources import load_pipeline_parts
from .quantize import DEFAULT_GROUP_SIZE, Quantization, quantize_parts


def check_destination(destination: str | os.PathLike) -> Path:
    """The destination as a Path if it is absent or an empty folder; else a one-line error."""
    dst = Path(os.path.expanduser(str(destination)))
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst}: exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()):
        raise FileExistsError(f"{dst}: exists and is not empty")
    return dst


def convert(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    dtype: mx.Dtype = mx.bfloat16,
    transformer_bits: int | None = None,
    t5_bits: int | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    load_t5: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Load `source` (anything `load_pipeline_parts` accepts) in `dtype`, quantize as asked, and write
    it to `destination` (absent or empty). All or nothing: written beside it, then renamed."""
    say = progress or (lambda _: None)
    for bits in (transformer_bits, t5_bits):
        if bits is not None:
            Quantization(bits, group_size)  # validates before any work
    dst = check_destination(destination)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the model from a service user reading it
    try:
        say(f"Loading {source} ({DTYPE_NAMES.get(dtype, dtype)}{'' if load_t5 else ', no T5'})")
        parts = load_pipeline_parts(source, dtype, load_t5=load_t5)
        for what, bits in (("the transformer", transformer_bits), ("T5", t5_bits if load_t5 else None)):
            if bits is not None:
                say(f"Quantizing {what} to {bits} bits (group size {group_size})")
        quantize_parts(parts, transformer_bits=transformer_bits, t5_bits=t5_bits, group_size=group_size)
        write_converted(parts, tmp, dtype, say)
        del parts
        check_destination(dst)  # still absent or empty after the (long) conversion
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
