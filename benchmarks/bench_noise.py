"""Initial-noise speed of each source (`sd35m_mlx.sampling.noise`) for one SD3 latent, with torch.randn for scale.

    python benchmarks/bench_noise.py                  # 1024 and 2048 px latents, best of 10
    python benchmarks/bench_noise.py --sizes 512 --runs 3

torch runs in this process (randn uses no BLAS, so MLX's OpenBLAS threads do not disturb it); torch's MT19937 and
Box-Muller are C++ and AVX2, ours NumPy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd35m_mlx.sampling.noise import RNG_SOURCES, randn  # noqa: E402

LATENT_CHANNELS, VAE_FACTOR = 16, 8


def best_ms(fn, runs: int) -> tuple[float, float]:
    """(wall, CPU) milliseconds, each the minimum over `runs` calls: on a shared machine the CPU time of this
    process is the steadier figure; on a quiet one the two agree (all sources run on one thread)."""
    fn()  # warm-up (imports, first allocations)
    wall, cpu = [], []
    for _ in range(runs):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return 1000 * min(wall), 1000 * min(cpu)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="image side in pixels")
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
    sources = {rng: lambda shape, rng=rng: randn(shape, 7, rng) for rng in RNG_SOURCES}
    if torch is not None:
        sources["torch"] = lambda shape: torch.randn(shape, generator=torch.Generator().manual_seed(7))
    print("milliseconds, CPU (wall) for one latent")
    print(f"{'px':>5} {'latent':>18} " + " ".join(f"{name:>15}" for name in sources))
    for px in args.sizes:
        shape = (1, LATENT_CHANNELS, px // VAE_FACTOR, px // VAE_FACTOR)
        cells = []
        for draw in sources.values():
            wall, cpu = best_ms(lambda draw=draw, shape=shape: draw(shape), args.runs)
            cells.append(f"{cpu:6.1f} ({wall:6.1f})")
        print(f"{px:5} {str(shape):>18} " + " ".join(f"{c:>15}" for c in cells))


if __name__ == "__main__":
    main()
