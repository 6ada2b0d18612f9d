"""Facts about this machine that decide how sd35m-mlx runs: versions, MLX's device, memory, and what to use."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from dataclasses import dataclass

from .. import __version__

SD3_FAMILY = re.compile(r"stable-diffusion-3", re.IGNORECASE)
GB = 1e9


@dataclass(frozen=True)
class Check:
    """One line of the report: `ok` False means FAILED (the reason in `detail`); None is information."""

    name: str
    ok: bool | None
    detail: str


def _chip() -> str:
    if sys.platform == "darwin":
        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _os() -> str:
    mac = platform.mac_ver()[0]
    return f"macOS {mac}" if mac else f"{platform.system()} {platform.release()}"


def _nax(mx, device: dict) -> str:
    """MLX uses the M5's GPU neural accelerators (NAX) for matmul and attention when the GPU is Apple's
    generation 17 or later and macOS is 26.2 or later (what mlx's is_nax_available checks)."""
    if not mx.metal.is_available():
        return "no (no Metal GPU)"
    arch = str(device.get("architecture", ""))
    m = re.search(r"g(\d+)", arch)
    generation = int(m.group(1)) if m else 0
    mac = tuple(int(p) for p in (platform.mac_ver()[0] or "0").split(".")[:2] if p.isdigit())
    if generation < 17:
        return f"no ({arch or 'GPU'} predates M5)"
    if mac < (26, 2):
        return f"no (GPU {arch} has them; needs macOS 26.2 or later)"
    return f"yes (GPU {arch})"


def memory_bytes() -> int:
    from ..sampling.memory import physical_memory

    return physical_memory()


def environment() -> list[Check]:
    import mlx.core as mx

    from .._blas import loaded_openblas

    device = mx.device_info() if hasattr(mx, "device_info") else {}
    cuda = hasattr(mx, "cuda") and mx.cuda.is_available()
    backend = "Metal" if mx.metal.is_available() else "CUDA" if cuda else "CPU"
    memory = device.get("memory_size") or memory_bytes()
    lines = [
        Check("sd35m-mlx", None, __version__),
        Check("mlx", None, mx.__version__),
        Check("python", None, f"{platform.python_version()} ({sys.executable})"),
        Check("system", None, f"{_os()}, {platform.machine()}, {_chip()}"),
        Check("device", None, f"{mx.default_device()} ({backend}: {device.get('device_name', 'unknown')})"),
        Check("memory", None, f"{memory / GB:.1f} GB" + (" unified" if backend == "Metal" else "")),
        Check("Metal", None, "available" if mx.metal.is_available() else "not available"),
        Check("CUDA", None, "available" if cuda else "not available"),
        Check("M5 neural accelerators", None, _nax(mx, device)),
    ]
    if sys.platform.startswith("linux"):
        blas = loaded_openblas or "not loaded: MLX's reference BLAS (slow float32 matmul; see DEVELOPERS.md)"
        lines.append(Check("OpenBLAS", None, blas))
    return lines


def cached_models() -> list[Check]:
    """SD3-family models in the Hugging Face cache (what `--model` can load without a download)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return [Check("cached models", None, "none (no Hugging Face cache yet)")]
    except (OSError, ValueError) as e:  # an unreadable cache: information, not a failure
        return [Check("cached models", None, f"unreadable cache ({e})")]
    repos = [r for r in info.repos if r.repo_type == "model" and SD3_FAMILY.search(r.repo_id)]
    if not repos:
        return [Check("cached models", None, "none (the first run downloads stabilityai/stable-diffusion-3.5-medium)")]
    return [Check("cached model", None, f"{r.repo_id} ({r.size_on_disk / GB:.1f} GB)") for r in repos]


def recommendations(memory: int | None = None) -> list[Check]:
    """Settings for this machine's memory (the peaks in benchmarks/README.md: 1024 px needs about 3.2 GB with
    --quantize 8 --t5-quantize 4 --low-memory, about 16 GB of weights in bfloat16 without)."""
    gb = (memory if memory is not None else memory_bytes()) / GB
    if gb >= 48:
        flags, size = "(defaults: bfloat16, everything resident)", 2048
    elif gb >= 32:
        flags, size = "--t5-quantize 8", 2048
    elif gb >= 24:
        flags, size = "--quantize 8 --t5-quantize 4", 1536
    elif gb >= 16:
        flags, size = "--quantize 8 --t5-quantize 4 --low-memory", 1440
    else:
        flags, size = "--quantize 4 --t5-quantize 4 --low-memory", 1024
    return [
        Check("recommended", None, f"{flags} for {gb:.0f} GB"),
        Check("largest size", None, f"about {size} px (--width/--height); beyond it, expect swapping"),
    ]
