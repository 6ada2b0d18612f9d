"""Timing and memory probes shared by both sides of the benchmarks.

Every time is a wall-clock minimum over runs (the least disturbed by other work on the machine).
MLX reports its own peak memory (`mx.get_peak_memory` after `mx.reset_peak_memory`); PyTorch's is
the CUDA allocator's or the process's resident-set peak. mlx and torch are imported only inside their
probes, so either side can use this module in a process of its own.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")  # compute dtypes by name, for both sides (`mlx_dtype`, torch)

# ---------------------------------------------------------------------------------------------
# Timing


def time_runs(fn: Callable[[], object], runs: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds of `runs` calls of `fn` (each followed by `sync`)."""
    times = []
    for _ in range(max(runs, 1)):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def time_once_or_warm(
    fn: Callable[[], object], runs: int, long_s: float, sync: Callable[[], None] = lambda: None
) -> tuple[float, int, bool]:
    """(best seconds, timed runs, warm) for work done once per image (text encoding, VAE decode).

    The first call is a warm-up; when it alone takes longer than `long_s`, it is the measurement
    (warm False): first-call costs are then a small part, and a slow backend is spared a rerun.
    """
    first = time_runs(fn, 1, sync)[0]
    if first > long_s:
        return first, 1, False
    return min(time_runs(fn, runs, sync)), runs, True


def mlx_once(fn: Callable[[], object], runs: int, long_s: float, modules, fresh: bool = False) -> dict:
    """`time_once_or_warm` of `fn` inside an MLXPeak: seconds, runs, warm, and peak, work and the weights of
    `modules` in GiB (the speed benchmarks' once-per-image figures)."""
    with MLXPeak(fresh) as peak:
        s, runs, warm = time_once_or_warm(fn, runs, long_s)
    weights = sum(mlx_param_bytes(m) for m in modules)
    return dict(s=s, runs=runs, warm=warm, peak_gib=gib(peak.peak), work_gib=gib(peak.work), weights_gib=gib(weights))


# ---------------------------------------------------------------------------------------------
# Memory


def proc_status_bytes(field_name: str, pid: int | str = "self") -> int | None:
    """A size field (VmRSS, VmHWM) of /proc/PID/status in bytes; without /proc (macOS) VmRSS from `ps`, others None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        if field_name == "VmRSS":
            ps = ["ps", "-o", "rss=", "-p", str(os.getpid() if pid == "self" else pid)]
            return int(subprocess.run(ps, capture_output=True, text=True).stdout) * 1024
    return None


def reset_rss_peak() -> bool:
    """Reset VmHWM to the current resident size (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class MLXPeak:
    """MLX's peak allocation over a `with` block; `work` excludes what was allocated before it.

    `fresh`: first free Python garbage and MLX's buffer cache, and also record the process's resident-set
    peak (VmHWM, reset through /proc/self/clear_refs; Linux), for honesty about what MLX does not count.
    """

    fresh: bool = False
    base: int = 0
    peak: int = 0
    active_after: int = 0
    seconds: float = 0.0
    rss_before: int | None = None
    rss_peak: int | None = None
    method: str = "mx.get_peak_memory after mx.reset_peak_memory"
    _rss_reset: bool = field(default=False, repr=False)

    @property
    def work(self) -> int:
        return self.peak - self.base

    def __enter__(self) -> MLXPeak:
        import mlx.core as mx

        if self.fresh:
            gc.collect()
            mx.clear_cache()
            self._rss_reset = reset_rss_peak()
            self.rss_before = proc_status_bytes("VmRSS")
        self.base = mx.get_active_memory()
        mx.reset_peak_memory()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import mlx.core as mx

        self.seconds = time.perf_counter() - self._t0
        self.peak = mx.get_peak_memory()
        self.active_after = mx.get_active_memory()
        if self._rss_reset and self.rss_before is not None:
            self.rss_peak = proc_status_bytes("VmHWM")

    def as_dict(self) -> dict:
        return dict(seconds=self.seconds, active_before=self.base, active_after=self.active_after, peak=self.peak,
                    work=self.work, rss_before=self.rss_before, rss_peak=self.rss_peak)  # fmt: skip


@dataclass
class TorchPeak:
    """Peak memory of PyTorch work over a `with` block, above what was in use at its start.

    CUDA: torch.cuda.max_memory_allocated. CPU on Linux: the process's resident-set peak (VmHWM)
    minus its resident size at the start. Elsewhere (macOS, MPS) no reliable resettable peak
    exists: `work` stays None.
    """

    device: str = "cpu"
    base: int = 0
    peak: int | None = None
    method: str = "n/a"
    _armed: bool = field(default=False, repr=False)

    @property
    def work(self) -> int | None:
        return None if self.peak is None else self.peak - self.base

    def __enter__(self) -> TorchPeak:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method, self._armed = "torch.cuda.max_memory_allocated", True
        elif self.device == "cpu" and sys.platform.startswith("linux") and reset_rss_peak():
            self.base = proc_status_bytes("VmRSS")
            self.method, self._armed = "process RSS peak (VmHWM) minus RSS before", True
        return self

    def __exit__(self, *exc) -> None:
        if not self._armed:
            return
        if self.device.startswith("cuda"):
            import torch

            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = proc_status_bytes("VmHWM")


# ---------------------------------------------------------------------------------------------
# Weights


def gib(n: int | None) -> float | None:
    return None if n is None else n / 2**30


def mlx_dtype(name: str):
    """The MLX dtype of one of `DTYPES`."""
    import mlx.core as mx

    return getattr(mx, name)


def mlx_param_bytes(module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def lazy_quantize(model, bits: int | None, group_size: int = 64, policy=None):
    """What `quantize_model` makes of `model` (same plan and layers) without evaluating anything: on a lazy
    model, the bytes of the quantized weights are known from shapes alone."""
    import mlx.nn as nn

    from sd35m_mlx.quantize import module_at, quantization_plan, set_module

    if bits:
        for path, b in quantization_plan(model, bits, group_size, policy).items():
            set_module(model, path, nn.QuantizedLinear.from_linear(module_at(model, path), group_size, b))
    return model


# ---------------------------------------------------------------------------------------------
# Built weights


def build_once(path: Path, build: Callable[[Path], object]) -> bool:
    """Run build(path) unless an earlier build there finished (a `.complete` file inside says so); an
    interrupted build is removed and redone. Returns whether it built."""
    if (path / ".complete").exists():
        return False
    if path.exists():
        shutil.rmtree(path)
    build(path)
    (path / ".complete").write_text("")
    return True


# ---------------------------------------------------------------------------------------------
# Inputs and results


def guided_inputs(config, size: int, ctx_len: int, seed: int = 0):
    """Random float32 inputs of one guided (CFG) step, as numpy arrays: latents (1, size/8, size/8, C),
    context (2, ctx_len, joint width) and pooled text (2, pooled width); `config` an MMDiTConfig."""
    import numpy as np

    rng, lat = np.random.default_rng(seed), size // 8
    x = rng.standard_normal((1, lat, lat, config.in_channels), dtype=np.float32)
    ctx = rng.standard_normal((2, ctx_len, config.joint_attention_dim), dtype=np.float32)
    return x, ctx, rng.standard_normal((2, config.pooled_projection_dim), dtype=np.float32)


def machine() -> str:
    """One line naming what the figures were measured on: platform, MLX and its device, OpenBLAS, load."""
    import mlx.core as mx

    from sd35m_mlx._blas import loaded_openblas

    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"
    return (f"{platform.platform()} mlx {mx.__version__} device {mx.default_device()} "
            f"openblas {loaded_openblas or 'no'}, load average {load}")  # fmt: skip


def log(msg: str) -> None:
    """Progress on stderr, with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parser(doc: str, json=None, dtype: str | None = None, repeats: int | None = None, quick: str | None = None):
    """Every script's argument parser with the options they share: --json, and where a default is given
    --dtype, --repeats, --quick (its help)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=json, help="write the results here (default %(default)s)")
    if dtype:
        p.add_argument("--dtype", choices=DTYPES, default=dtype, help="compute dtype (default %(default)s)")
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats, help="timed runs, the best kept (default %(default)s)")
    if quick:
        p.add_argument("--quick", action="store_true", help=quick)
    return p


def write_json(path: str | Path | None, results) -> None:
    """Write `results` to `path` (folders made as needed; nothing when `path` is None)."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=1, default=str) + "\n")


def table(title: str, headers: list[str], rows: list[list]) -> str:
    """A titled plain-text table, first column left-aligned, the others right (every report's)."""
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
    return "\n".join([f"\n## {title}", line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])
