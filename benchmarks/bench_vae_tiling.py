"""Tiled vs untiled VAE decode on the full-size SD3 VAE (random weights): peak memory, time, difference.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_vae_tiling.py --sizes 1024 2048
    python benchmarks/bench_vae_tiling.py --quick        # toy VAE, 256 px: checks the script

Each decode (untiled; tiled with shared GroupNorm statistics, the pipeline's; tiled per tile) runs in a
process of its own (clean MLX peak, weights included) and writes its image; each tiled image is compared
with the untiled one (PSNR over its range, max abs difference, raw decoder output).
Method and figures: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.measure import parser, write_json  # noqa: E402  (no mlx: the parent process stays small)

MODES = ("untiled", "tiled", "tiled-per-tile")


def child(folder: str, size: int, mode: str, tile: int, dtype: str, out: str) -> dict:
    import sd35m_mlx  # noqa: F401  (OpenBLAS before mlx.core)

    # isort: split
    import mlx.core as mx
    import numpy as np

    from benchmarks.measure import MLXPeak, mlx_dtype
    from sd35m_mlx.loading.vae import load_vae
    from sd35m_mlx.models import vae_tiling

    dt = mlx_dtype(dtype)
    vae = load_vae(folder, dt)
    mx.eval(vae.parameters())
    f = vae.config.downscale
    z = mx.random.normal((1, size // f, size // f, vae.config.latent_channels), key=mx.random.key(0)).astype(dt)
    mx.eval(z)
    mx.reset_peak_memory()
    with MLXPeak() as peak:
        t0 = time.perf_counter()
        if mode == "untiled":
            img = vae.decode(z)
        else:
            img = vae_tiling.decode_tiled(vae, z, tile // f, tile // f // 4, shared_statistics=mode == "tiled")
        img = img.astype(mx.float32)
        mx.eval(img)
        seconds = time.perf_counter() - t0
    np.save(out, np.array(img))
    return dict(size=size, mode=mode, tile=tile, dtype=dtype, seconds=seconds, peak=peak.peak, work=peak.work)


def compare(a, ref) -> dict:
    import numpy as np

    mse = float(np.mean((a - ref) ** 2))
    rng = float(ref.max() - ref.min())
    return dict(psnr_db=10 * np.log10(rng**2 / mse) if mse else float("inf"), max_abs=float(np.abs(a - ref).max()))


def main(argv=None) -> None:
    p = parser(
        __doc__,
        json="benchmarks/results/vae_tiling.json",
        dtype="float32",
        quick="toy-width VAE at 256 px, 64 px tiles",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="image sides (default 1024 2048)")
    p.add_argument("--tile", type=int, default=512, help="tile size in px (default 512, 25%% overlap)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="default: all")
    p.add_argument("--skip-untiled-above", type=int, default=1024, help="no untiled decode above this side")
    p.add_argument("--fixtures", default="benchmarks/results/vae-fixture", help="where the VAE is built once")
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        folder, size, mode, tile, dtype, out = args.child
        print(json.dumps(child(folder, int(size), mode, int(tile), dtype, out)))
        return

    from benchmarks.fixtures import FULL, TOY
    from benchmarks.measure import build_once
    from scripts.build_fixture import build_vae

    sizes, fixtures = (TOY, Path(args.fixtures + "-quick")) if args.quick else (FULL, Path(args.fixtures))
    if args.quick:
        args.sizes, args.tile = [256], 64
    build_once(fixtures, lambda d: build_vae(d / "vae", sizes=sizes.vae))
    work = fixtures / "outputs"
    work.mkdir(exist_ok=True)
    import numpy as np

    results = []
    for size in args.sizes:
        ref = None
        for mode in args.modes:
            if mode == "untiled" and size > args.skip_untiled_above:
                continue
            out = work / f"{size}-{mode}.npy"
            cmd = [sys.executable, __file__, "--child", str(fixtures / "vae"), str(size), mode, str(args.tile)]
            proc = subprocess.run(cmd + [args.dtype, str(out)], capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                sys.exit(f"{size} {mode} failed:\n{proc.stderr[-2000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            img = np.load(out)
            if mode == "untiled":
                ref = img
            elif ref is not None:
                r.update(compare(img, ref))
            results.append(r)
            print(
                f"{size:5d} px {mode:15s} peak {r['peak'] / 1e9:6.2f} GB  {r['seconds']:7.1f} s"
                + (f"  PSNR {r['psnr_db']:.1f} dB  max abs {r['max_abs']:.2e}" if "psnr_db" in r else ""),
                flush=True,
            )
    write_json(args.json, results)


if __name__ == "__main__":
    main()
