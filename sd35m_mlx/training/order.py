"""Data order and per-step randomness as pure functions of (seed, step): a resumed run replays them exactly
without storing generator states."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np


def epoch_batches(buckets: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Item indices per batch for one epoch: items shuffled within their aspect-ratio bucket, cut into
    batches of one bucket each (the last of a bucket may be smaller), batches shuffled."""
    rng = np.random.default_rng([seed, epoch])
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(buckets):
        groups.setdefault(b, []).append(i)
    batches = []
    for b in sorted(groups):
        items = [groups[b][j] for j in rng.permutation(len(groups[b]))]
        batches += [items[k : k + batch_size] for k in range(0, len(items), batch_size)]
    return [batches[j] for j in rng.permutation(len(batches))]


def batches_per_epoch(buckets: Sequence[int], batch_size: int) -> int:
    counts: dict[int, int] = {}
    for b in buckets:
        counts[b] = counts.get(b, 0) + 1
    return sum(-(-n // batch_size) for n in counts.values())


def batch_for_step(buckets: Sequence[int], batch_size: int, seed: int, step: int) -> list[int]:
    n = batches_per_epoch(buckets, batch_size)
    return epoch_batches(buckets, batch_size, seed, step // n)[step % n]


def step_key(seed: int, step: int) -> mx.array:
    """The PRNG key of step `step` (timestep density draw and noise)."""
    return mx.random.key(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
