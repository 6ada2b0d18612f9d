"""Timing and memory probes shared by both sides of the benchmarks.

Every time is a wall-clock minimum over runs (the least disturbed by other work on the machine).
MLX reports its own peak memory (`mx.get_peak_memory` after `mx.reset_peak_memory`). mlx is
imported only inside the MLX probes, so the PyTorch side can use this module in a process of its own.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


def time_kernel(fn: Callable[[], object], min_s: float = 0.3, max_runs: int = 5, min_runs: int = 1) -> float:
    """Best of evaluated MLX calls after one warm-up: at least `min_runs`, more while under `min_s`."""
    import mlx.core as mx

    mx.eval(fn())
    best, spent, runs = float("inf"), 0.0, 0
    while runs < min_runs or (runs < max_runs and spent < min_s):
        t0 = time.perf_counter()
        mx.eval(fn())
        dt = time.perf_counter() - t0
        best, spent, runs = min(best, dt), spent + dt, runs + 1
    return best


# ---------------------------------------------------------------------------------------------
# Memory


@dataclass
class MLXPeak:
    """MLX's peak allocation over a `with` block; `work` excludes what was allocated before it."""

    base: int = 0
    peak: int = 0
    method: str = "mx.get_peak_memory after mx.reset_peak_memory"

    @property
    def work(self) -> int:
        return self.peak - self.base

    def __enter__(self) -> MLXPeak:
        import mlx.core as mx

        mx.reset_peak_memory()
        self.base = mx.get_active_memory()
        return self

    def __exit__(self, *exc) -> None:
        import mlx.core as mx

        self.peak = mx.get_peak_memory()


def mlx_param_bytes(module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def proc_status_bytes(field_name: str) -> int:
    """A size field (VmRSS, VmHWM) of /proc/self/status, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def reset_rss_peak() -> bool:
    """Reset VmHWM to the current resident size (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
