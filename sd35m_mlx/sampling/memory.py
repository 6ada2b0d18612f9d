"""Memory: how much this machine has, and bounding what a denoising step may hold in flight on GPU backends.

MLX builds a step's whole graph lazily, and on a GPU the host encodes work far ahead of the device;
a buffer is released only when the work that used it completes. So one SD3.5 Medium step keeps the
intermediates of many blocks alive at once (about 28x diffusers' at 1024 px on CUDA). MLX's memory
limit makes the host wait for scheduled work before allocating past it, which bounds that for a few
percent of step time; per-block host syncs cost more, `mx.async_eval` per block bounds nothing
(benchmarks/bench_step_memory.py; the figures are in benchmarks/README.md, bench_speed.py section).
The CPU backend holds only one block's work (its attention scores dominate): the limit never binds there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx

GIB = 1 << 30
DEFAULT_WORK_BUDGET = 3 * GIB  # +3% step time on CUDA at 1024 px (benchmarks/README.md)
LOW_MEMORY_WORK_BUDGET = 1 * GIB  # +18% step time on CUDA at 1024 px


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


def default_cache_bytes() -> int:
    """Bytes of LoRAs (and of the server's ControlNets) kept loaded between calls by default: 1/16 of physical
    memory (1 GiB on a 16 GB Mac, 5-50 SD3.5 Medium LoRAs of 20-200 MB), small beside the model they serve."""
    return physical_memory() // 16


def least_recent_over_budget(sizes: dict, budget: int, keep) -> list:
    """The keys of `sizes` (key -> bytes, least recently used first) to unload so the rest fit in `budget`:
    oldest first, stopping at the first key in `keep` (it and all after it are in use or more recent, and
    stay even alone over the budget)."""
    held, out = sum(sizes.values()), []
    for key, size in sizes.items():
        if held <= budget or key in keep:
            break
        out.append(key)
        held -= size
    return out
