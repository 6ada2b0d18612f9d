"""TAESD3 vs the SD3 VAE: decode time and peak memory (ours, MLX), and diffusers' AutoencoderTiny, one run.

    python benchmarks/bench_taesd.py                          # 512 and 1024 px, float32
    python benchmarks/bench_taesd.py --quick                  # 256 px: checks the script in seconds
    python benchmarks/bench_taesd.py --sizes 1024 --skip-vae --json out.json

Random weights in the real configs (scripts/build_fixture.py `TAESD3`, `VAE_FULL`), each read by its own
side's loader; each decode is the pipeline's last step (unscale, decode, to [0, 1], batch 1) under
generate()'s work budget; work above the weights. diffusers runs in a process of its own (torch_side.py).
On Linux CPU unset OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE. Method and figures: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

# As bench_speed.py: the repo root, not benchmarks/, goes first on sys.path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import sd35m_mlx  # noqa: E402,F401  (loads OpenBLAS before mlx on Linux)

# isort: split
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import measure, torch_side  # noqa: E402
from sd35m_mlx.images import decode_latents  # noqa: E402
from sd35m_mlx.loading.taesd import load_taesd  # noqa: E402
from sd35m_mlx.loading.vae import load_vae  # noqa: E402
from sd35m_mlx.sampling.memory import DEFAULT_WORK_BUDGET, bounded_work  # noqa: E402

LONG_S = 30.0


def _measure(decode, model, repeats: int) -> tuple[dict, np.ndarray]:
    out: list = []

    def run():
        with bounded_work(DEFAULT_WORK_BUDGET):  # as generate()'s decode step
            out.append(decode())
            mx.eval(out[-1])

    return measure.mlx_once(run, repeats, LONG_S, [model], fresh=True), np.array(out[-1])


def _vae_decode(vae, z: mx.array, dtype: mx.Dtype):
    return lambda: decode_latents(vae, z, dtype)  # generate()'s step 5


def bench_size(size: int, taesd, vae, folders: dict[str, Path], args, torch_run) -> dict:
    dtype = measure.mlx_dtype(args.dtype)
    z = np.random.default_rng(args.seed).standard_normal((1, size // 8, size // 8, 16), dtype=np.float32)
    zm = mx.array(z)
    r: dict = {"size": size}
    measure.log(f"{size} px: TAESD3 (ours)")
    r["taesd"], img = _measure(lambda: decode_latents(taesd, zm, taesd.dtype), taesd, args.repeats)
    if vae is not None:
        measure.log(f"{size} px: VAE (ours)")
        r["vae"], _ = _measure(_vae_decode(vae, zm, dtype), vae, args.repeats)
        r["taesd_over_vae_s"] = r["taesd"]["s"] / r["vae"]["s"]
        r["taesd_over_vae_work"] = r["taesd"]["work_gib"] / r["vae"]["work_gib"]
    if torch_run is not None:
        measure.log(f"{size} px: AutoencoderTiny (diffusers)")
        d, ref_img = torch_run(
            torch_side.decode_tiny, str(folders["taesd"]), z, args.dtype, args.device, args.repeats, LONG_S
        )
        r["diffusers_taesd"] = d
        r["taesd_over_diffusers_s"] = r["taesd"]["s"] / d["s"]
        r["max_abs_pixel_err"] = float(np.abs(img - ref_img).max())
    return r


def print_report(results: dict) -> None:
    print(f"TAESD3 vs SD3 VAE decode, {results['dtype']}, batch 1 ({results['device']})")
    head = f"{'px':>5} | {'TAESD3 s':>9} {'work GiB':>8} | {'VAE s':>8} {'work GiB':>8} | "
    print(head + f"{'time':>6} {'memory':>6} | {'diffusers tiny s':>16} {'ours/diff':>9} | {'max err':>8}")
    for r in results["sizes"]:
        t, v, d = r["taesd"], r.get("vae"), r.get("diffusers_taesd")
        vae_cells = f"{v['s']:8.3f} {v['work_gib']:8.3f}" if v else f"{'-':>8} {'-':>8}"
        ratio = f"{r['taesd_over_vae_s']:6.3f} {r['taesd_over_vae_work']:6.3f}" if v else f"{'-':>6} {'-':>6}"
        diff = f"{d['s']:16.3f} {r['taesd_over_diffusers_s']:9.2f}" if d else f"{'-':>16} {'-':>9}"
        err = f"{r['max_abs_pixel_err']:8.1e}" if d else f"{'-':>8}"
        print(f"{r['size']:>5} | {t['s']:9.3f} {t['work_gib']:8.3f} | {vae_cells} | {ratio} | {diff} | {err}")
    t = results["sizes"][0]["taesd"]
    v = results["sizes"][0].get("vae")
    print(f"weights: TAESD3 {t['weights_gib'] * 1024:.1f} MiB" + (f", VAE {v['weights_gib']:.2f} GiB" if v else ""))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes in px (default 512 1024)")
    p.add_argument("--dtype", choices=measure.DTYPES, default="float32", help="default float32")
    p.add_argument("--repeats", type=int, default=2, help="timed runs after the warm-up, best kept (default 2)")
    p.add_argument("--skip-vae", action="store_true", help="no full-VAE decode (slow on CPU: minutes at 1024 px)")
    p.add_argument("--skip-diffusers", action="store_true", help="time ours only")
    p.add_argument("--torch-device", default="auto", help="diffusers device: auto (cuda, mps, cpu) or a name")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs (default 0)")
    p.add_argument("--cache", type=Path, default=None, help="build the random weights here once and reuse them")
    p.add_argument("--quick", action="store_true", help="256 px only")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/taesd.json"), help="where the JSON goes")
    args = p.parse_args(argv)
    args.sizes = args.sizes or ([256] if args.quick else [512, 1024])
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from scripts.build_fixture import build_taesd, build_vae

    torch_run = None if args.skip_diffusers else torch_side.TorchRunner()
    try:
        args.device = torch_run(torch_side.resolve_device, args.torch_device) if torch_run else None
        with tempfile.TemporaryDirectory() as tmp:
            root = args.cache or Path(tmp)
            folders = {"taesd": root / f"taesd3-s{args.seed}"}
            measure.build_once(folders["taesd"], lambda d: build_taesd(d, seed=args.seed))
            if not args.skip_vae:
                folders["vae"] = root / f"vae-s{args.seed}"
                measure.build_once(folders["vae"], lambda d: build_vae(d, seed=args.seed))
            dtype = measure.mlx_dtype(args.dtype)
            taesd = load_taesd(folders["taesd"], dtype)
            vae = None if args.skip_vae else load_vae(folders["vae"], dtype)
            mx.eval(taesd.parameters(), *([vae.parameters()] if vae is not None else []))
            sizes = [bench_size(s, taesd, vae, folders, args, torch_run) for s in args.sizes]
    finally:
        if torch_run is not None:
            torch_run.close()
    results = {"dtype": args.dtype, "device": str(mx.default_device()), "mlx": mx.__version__, "sizes": sizes}
    results["torch_device"] = args.device
    print_report(results)
    measure.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
