"""Bounding the memory a denoising step may hold in flight on GPU backends.

MLX builds a step's whole graph lazily, and on a GPU the host encodes work far ahead of the device;
a buffer is released only when the work that used it completes. So one SD3.5 Medium step keeps the
intermediates of many blocks alive at once: measured on MLX's CUDA backend (H200, bfloat16,
1024x1024, batch 2, all 24 blocks; benchmarks/bench_step_memory.py), 9.47 GiB above the weights for
a 74 ms step, where diffusers needs 0.34 GiB. MLX's memory limit makes the host wait for scheduled
work before allocating past it: with the limit at (memory in use + 3 GiB) the same step held
3.04 GiB at +3% time, with + 1 GiB 1.14 GiB at +18%. A host sync after every block held 0.70 GiB at
+26%; `mx.async_eval` after every block gave no bound (8.96 GiB). The CPU backend is unaffected:
it holds only one block's work (its attention scores dominate), and the limit never binds there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx

GIB = 1 << 30
DEFAULT_WORK_BUDGET = 3 * GIB  # measured: +3% step time on CUDA at 1024 px
LOW_MEMORY_WORK_BUDGET = 1 * GIB  # measured: +18% step time on CUDA at 1024 px


@contextmanager
def bounded_work(budget: int | None) -> Iterator[None]:
    """Within the block, let MLX hold at most `budget` bytes above the memory in use on entry.

    Only ever lowers MLX's memory limit (restored on exit). The limit is relaxed: past it MLX first
    waits for scheduled work to finish and free its buffers, then allocates anyway, so it can slow
    a step but never fail one. None or 0: no bound.
    """
    if not budget:
        yield
        return
    previous = mx.get_memory_limit()
    mx.set_memory_limit(min(previous, mx.get_active_memory() + budget))
    try:
        yield
    finally:
        mx.set_memory_limit(previous)


def physical_memory() -> int:
    """Bytes of RAM in this machine (16 GiB where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * GIB
