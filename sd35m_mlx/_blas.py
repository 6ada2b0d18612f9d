"""Load the system OpenBLAS before MLX on Linux.

MLX's Linux CPU wheel links a reference BLAS (~6 GFLOP/s float32). When Debian's
OpenBLAS is present, loading it with RTLD_GLOBAL before `mlx.core` makes MLX's
sgemm calls resolve to it (120-450 GFLOP/s). Set SD35M_MLX_NO_OPENBLAS=1 to opt out.
macOS uses Accelerate/Metal and never takes this path.
"""

from __future__ import annotations

import ctypes
import os
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

loaded_openblas: str | None = None


def load_openblas() -> str | None:
    global loaded_openblas
    if loaded_openblas or not sys.platform.startswith("linux"):
        return loaded_openblas
    if os.environ.get("SD35M_MLX_NO_OPENBLAS", "") not in ("", "0"):
        return None
    if "mlx.core" in sys.modules:
        # Too late: MLX already bound its BLAS symbols.
        return None
    for path in _CANDIDATES:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded_openblas = path
            return path
    return None
