"""Live preview cost per step: "rgb" (latent RGB map) and "taesd" (TAESD3 decode), as a fraction of
a guided denoising step of the full-width transformer at reduced depth, per size.

    python benchmarks/bench_preview.py --sizes 512 1024 --dtype bfloat16 --cache /tmp/bench-cache

Method and figures: benchmarks/README.md.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import sd35m_mlx  # noqa: E402,F401  (loads OpenBLAS before mlx on Linux)

# isort: split
import mlx.core as mx  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.fixtures import MEDIUM_DEPTH, build_medium_transformer  # noqa: E402
from benchmarks.measure import build_once, guided_inputs, mlx_dtype, parser, time_runs  # noqa: E402
from sd35m_mlx.loading.transformer import load_transformer  # noqa: E402
from sd35m_mlx.models.taesd import AutoencoderTiny, TAESDConfig  # noqa: E402
from sd35m_mlx.sampling.guidance import GuidanceConfig, GuidedDenoiser  # noqa: E402
from sd35m_mlx.sampling.memory import DEFAULT_WORK_BUDGET, bounded_work  # noqa: E402
from sd35m_mlx.sampling.preview import latent_rgb, taesd_rgb, to_pil  # noqa: E402

CTX_LEN = 333  # CLIP 77 + T5 256 tokens, as the pipeline's default


def _best(fn, runs: int) -> float:
    fn()  # warm-up (kernels, compile caches)
    return min(time_runs(fn, runs))


def random_taesd(dtype):
    """TAESD3's architecture with MLX's default init."""
    taesd = AutoencoderTiny(TAESDConfig(), encoder=False)
    taesd.set_dtype(dtype)
    mx.eval(taesd.parameters())
    return taesd


def bench(size: int, model, taesd, dtype, runs: int) -> dict:
    x, ctx, pooled = map(mx.array, guided_inputs(model.config, size, CTX_LEN))
    den = GuidedDenoiser(model, ctx, pooled, [500.0], GuidanceConfig(scale=4.5), 0, dtype)

    def step():
        mx.eval(den(0, x))

    with bounded_work(DEFAULT_WORK_BUDGET):
        step_s = _best(step, runs)
    x0 = x - 0.7 * den(0, x)  # a denoised estimate, as StepResult.denoised
    mx.eval(x0)

    def rgb():
        return to_pil(latent_rgb(x0[:1])[0])

    def rgb_cli():
        image = rgb().resize((size, size), Image.Resampling.BILINEAR)
        with tempfile.NamedTemporaryFile(suffix=".png") as f:
            image.save(f, format="PNG", compress_level=1)

    row = {"size": size, "step_s": step_s, "rgb_s": _best(rgb, runs * 3), "rgb_cli_s": _best(rgb_cli, runs * 3)}
    if taesd is not None:  # None: no TAESD timing (the test's tiny run)
        render = taesd_rgb(taesd, dtype)
        row["taesd_s"] = _best(lambda: to_pil(render(x0[:1])[0]), runs)
    return row


def main(argv=None) -> None:
    p = parser(__doc__, dtype="float32")
    p.add_argument("--sizes", type=int, nargs="+", default=[512], help="image sizes in px (default: 512)")
    p.add_argument("--depth", type=int, default=3, help="transformer blocks built (default: 3)")
    p.add_argument("--runs", type=int, default=3, help="timed runs, best taken (default: 3)")
    p.add_argument("--cache", type=Path, default=None, help="keep the built weights here across runs")
    args = p.parse_args(argv)
    dtype = mlx_dtype(args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        folder = (args.cache or Path(tmp)) / f"transformer-d{args.depth}"
        build_once(folder, lambda d: build_medium_transformer(d, args.depth))
        model = load_transformer(folder, dtype)
        mx.eval(model.parameters())
        taesd = random_taesd(dtype)
        print(f"mlx {mx.__version__}, {mx.default_device()}, {args.dtype}, depth {args.depth}")
        print("| size | step | rgb | rgb/step | rgb + --preview file | taesd | taesd/step | taesd/step (24 blocks) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for size in args.sizes:
            r = bench(size, model, taesd, dtype, args.runs)
            full = r["step_s"] * MEDIUM_DEPTH / args.depth
            t = r["taesd_s"]
            taesd_cols = f"{t * 1e3:.1f} ms | {t / r['step_s']:.2%} | {t / full:.2%}"
            print(
                f"| {size} | {r['step_s'] * 1e3:.0f} ms | {r['rgb_s'] * 1e3:.2f} ms | {r['rgb_s'] / r['step_s']:.4%} "
                f"| {r['rgb_cli_s'] * 1e3:.1f} ms | {taesd_cols} |"
            )


if __name__ == "__main__":
    main()
