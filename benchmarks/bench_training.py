"""LoRA training step: time and peak memory at the real SD3.5 Medium width, reduced depth, extrapolated
linearly to 24 blocks, for bf16 / 8-bit / 4-bit frozen bases, with and without checkpointing.

    python -m benchmarks.bench_training --sizes 512 --bases bf16 q8 --json training.json

Method and figures: benchmarks/README.md.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

import sd35m_mlx  # noqa: E402,F401  (loads OpenBLAS before mlx on Linux)

# isort: split
import mlx.core as mx  # noqa: E402

from benchmarks.fixtures import MEDIUM_DEPTH, medium_dual_layers  # noqa: E402
from benchmarks.measure import machine, mlx_dtype, mlx_param_bytes, parser, write_json  # noqa: E402
from sd35m_mlx.models.mmdit import MMDiTConfig, SD3Transformer2DModel  # noqa: E402
from sd35m_mlx.quantize import quantize_model  # noqa: E402
from sd35m_mlx.sampling.schedule import FlowMatchSchedule  # noqa: E402
from sd35m_mlx.training import Recipe, TrainableLora, resolve_targets, sample_sigmas  # noqa: E402
from sd35m_mlx.training.lora_params import checkpoint_blocks, uncheckpoint_blocks  # noqa: E402
from sd35m_mlx.training.optim import make_optimizer  # noqa: E402
from sd35m_mlx.training.step import Batch, make_update  # noqa: E402

BASES = {"full": None, "q8": 8, "q4": 4}


def measure(
    depth: int, size: int, base: str, checkpointing: str, rank: int, dtype, compiled: bool = False, warmup: bool = True
) -> dict:
    """Seconds and peak bytes of one training step of a fresh model (after a warm-up step unless `warmup` is
    off: the optimizer state exists either way, so the peak is the same; the time then includes tracing), and
    the frozen base's weight bytes as measured and as 8-bit / 4-bit (for the derived quantized rows)."""
    config = MMDiTConfig(num_layers=depth, dual_attention_layers=medium_dual_layers(depth))
    model = SD3Transformer2DModel(config)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    if BASES[base] is not None:
        quantize_model(model, BASES[base])
    weights = mlx_param_bytes(model)
    lora = TrainableLora(model, resolve_targets(model), rank, rank)
    if checkpointing == "blocks":
        checkpoint_blocks(model)
    optimizer = make_optimizer(1e-4, 1000)
    optimizer.init(lora.params)
    update = make_update(lora, model, optimizer, Recipe(), 1.0, compiled, staged=checkpointing == "staged")
    lat = size // 8
    batch = Batch(
        mx.random.normal((1, lat, lat, 16)).astype(dtype),
        mx.random.normal((1, 333, config.joint_attention_dim)).astype(dtype),
        mx.random.normal((1, config.pooled_projection_dim)).astype(dtype),
    )
    noise = mx.random.normal(batch.latents.shape).astype(dtype)
    sigmas, timesteps = sample_sigmas([0.5], FlowMatchSchedule())
    mx.eval(batch.latents, batch.prompt_embeds, batch.pooled_prompt_embeds, noise)

    def step():
        loss = update(batch, noise, sigmas, timesteps)
        mx.eval(loss, lora.params, optimizer.state)
        lora.bind(lora.params)

    if warmup:
        step()
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    peak = mx.get_peak_memory()
    lora.detach()
    uncheckpoint_blocks(model)
    quantized = {}
    if BASES[base] is None:
        for name, bits in (("q8", 8), ("q4", 4)):
            quantize_model(model, bits)  # weight bytes only: the step's work is the same for QuantizedLinear
            quantized[name] = mlx_param_bytes(model)
            model = SD3Transformer2DModel(config)
            model.set_dtype(dtype)
    return dict(seconds=seconds, peak=peak, weights=weights, quantized_weights=quantized)


def extrapolate(v1: float, v2: float, d1: int, d2: int) -> float:
    return v2 + (MEDIUM_DEPTH - d2) * (v2 - v1) / (d2 - d1)


def main() -> None:
    ap = parser(__doc__, dtype="bfloat16")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="image sides in px")
    ap.add_argument("--depths", type=int, nargs=2, default=[2, 4], help="two depths to extrapolate from")
    ap.add_argument("--bases", nargs="+", choices=BASES, default=list(BASES), help="frozen base precision")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--checkpointing",
        nargs="+",
        choices=("off", "staged", "blocks"),
        default=["off", "staged"],
        help="off; staged: block-by-block backward (the trainer's --gradient-checkpointing); blocks: "
        "mx.checkpoint around each block in one graph",
    )
    ap.add_argument("--compile", choices=("off", "on", "both"), default="off", help="mx.compile the update")
    ap.add_argument("--memory-only", action="store_true", help="no warm-up step (peak only; halves the time)")
    ap.add_argument(
        "--derive-quantized",
        action="store_true",
        help="for a full-precision base, also print q8 / q4 rows derived as peak - (weight bytes saved)",
    )
    args = ap.parse_args()
    d1, d2 = args.depths
    modes = {"off": [False], "on": [True], "both": [False, True]}
    print(f"{machine()}; {args.dtype}, depths {d1},{d2} -> {MEDIUM_DEPTH}; GB = 1e9 bytes", flush=True)
    results = []
    for size, base in itertools.product(args.sizes, args.bases):
        for ckpt, compiled in itertools.product(args.checkpointing, modes[args.compile]):
            mx.clear_cache()
            r1, r2 = (
                measure(d, size, base, ckpt, args.rank, mlx_dtype(args.dtype), compiled, not args.memory_only)
                for d in (d1, d2)
            )
            t, p = (r1["seconds"], r2["seconds"]), (r1["peak"], r2["peak"])
            row = dict(size=size, base=base, checkpointing=ckpt, compiled=compiled, step_s=t, peak_bytes=p)
            row.update(step_24_s=extrapolate(*t, d1, d2), peak_24_gb=extrapolate(*p, d1, d2) / 1e9)
            results.append(row)
            what = f"{size} px, {base}, checkpointing {ckpt}, compile {'on ' if compiled else 'off'}"
            print(
                f"{what}: step {t[0]:.2f}/{t[1]:.2f} s at depth {d1}/{d2} -> {row['step_24_s']:.1f} s at 24; "
                f"peak {p[0] / 1e9:.2f}/{p[1] / 1e9:.2f} GB -> {row['peak_24_gb']:.2f} GB",
                flush=True,
            )
            if args.derive_quantized and BASES[base] is None:
                for name in ("q8", "q4"):
                    q = [r["peak"] - r["weights"] + r["quantized_weights"][name] for r in (r1, r2)]
                    derived = extrapolate(*q, d1, d2) / 1e9
                    results.append(dict(row, base=f"{name} (derived)", peak_bytes=q, peak_24_gb=derived))
                    print(f"  {name} base (derived): peak {q[0] / 1e9:.2f}/{q[1] / 1e9:.2f} GB -> {derived:.2f} GB")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
