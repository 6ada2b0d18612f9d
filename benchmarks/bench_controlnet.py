"""What one ControlNet costs per denoising step: time relative to a plain step, and memory.

    python benchmarks/bench_controlnet.py                      # depth 2, 512 and 1024 px, float32
    python benchmarks/bench_controlnet.py --depth 24 --controlnet-depth 23 --dtype bfloat16   # a GPU, full depth

Method and figures: benchmarks/README.md.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sd35m_mlx  # noqa: E402,F401  (loads OpenBLAS before mlx on Linux)

# isort: split
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from benchmarks.measure import (  # noqa: E402
    build_once,
    guided_inputs,
    lazy_quantize,
    machine,
    mlx_dtype,
    mlx_param_bytes,
    parser,
    write_json,
)
from scripts.build_fixture import (  # noqa: E402
    FULL_WIDTH_CONTROLNET,
    FULL_WIDTH_TRANSFORMER,
    build_full_width_controlnet,
    build_full_width_transformer,
)
from sd35m_mlx.editing.control import ControlNetResiduals, ControlUnit  # noqa: E402
from sd35m_mlx.loading.controlnet import QUANTIZATION_POLICY, load_controlnet  # noqa: E402
from sd35m_mlx.loading.transformer import load_transformer  # noqa: E402
from sd35m_mlx.models.controlnet import ControlNetConfig, SD3ControlNetModel  # noqa: E402
from sd35m_mlx.models.mmdit import MMDiTConfig, SD3Transformer2DModel  # noqa: E402
from sd35m_mlx.quantize import quantize_model  # noqa: E402
from sd35m_mlx.sampling.guidance import GuidanceConfig, GuidedDenoiser  # noqa: E402
from sd35m_mlx.sampling.loop import Step  # noqa: E402
from sd35m_mlx.sampling.schedule import FlowMatchSchedule  # noqa: E402

FULL_TRANSFORMER_DEPTH, FULL_CONTROLNET_DEPTH = 24, 23


def _alternating(depth: int) -> tuple[int, ...]:
    return tuple(range(0, depth, 2))


def build(folder: Path, depth: int, cn_depth: int) -> tuple[Path, Path]:
    t, c = folder / f"transformer-{depth}", folder / f"controlnet-{cn_depth}"
    build_once(t, lambda p: build_full_width_transformer(p, depth=depth, dual_attention_layers=_alternating(depth)))
    build_once(c, lambda p: build_full_width_controlnet(p, depth=cn_depth, seed=1,
                                                        dual_attention_layers=_alternating(cn_depth)))  # fmt: skip
    return t, c


def weight_bytes(model: nn.Module, bits: int | None, dtype: mx.Dtype, policy=None) -> int:
    """Bytes of a (lazy) model's parameters in `dtype`, after quantization to `bits` if given (nothing evaluated)."""
    model.set_dtype(dtype)
    return mlx_param_bytes(lazy_quantize(model, bits, 64, policy))


def full_depth_weights(bits: int | None, dtype: mx.Dtype) -> dict:
    t = MMDiTConfig(**{**FULL_WIDTH_TRANSFORMER, "dual_attention_layers": tuple(range(13))})
    c = ControlNetConfig.from_dict(
        {**FULL_WIDTH_CONTROLNET, "num_layers": FULL_CONTROLNET_DEPTH, "dual_attention_layers": list(range(13))}
    )
    return {
        "transformer_bytes": weight_bytes(SD3Transformer2DModel(t), bits, dtype),
        "controlnet_bytes": weight_bytes(SD3ControlNetModel(c), bits, dtype, QUANTIZATION_POLICY),
    }


def bench(
    t_folder: Path, c_folder: Path, size: int, dtype: mx.Dtype, bits: int | None, ctx_len: int, warmup: int, rep: int
) -> dict:
    transformer = load_transformer(t_folder, dtype)
    net = load_controlnet(c_folder, dtype)
    if bits is not None:
        quantize_model(transformer, bits)
        quantize_model(net, bits, policy=QUANTIZATION_POLICY)
    mx.eval(transformer.parameters(), net.parameters())
    cfg, lat = transformer.config, size // 8
    x, context, pooled = map(mx.array, guided_inputs(cfg, size, ctx_len))
    control = mx.random.normal((2, lat, lat, 16), key=mx.random.key(1)).astype(dtype)
    timesteps = FlowMatchSchedule().timesteps(28)
    velocity = GuidedDenoiser(transformer, context, pooled, timesteps, GuidanceConfig(scale=4.5), 0, dtype)
    extra = ControlNetResiduals([ControlUnit(net, control, 1.0, 0.0, 1.0)], context, pooled, timesteps, 0, True, dtype)
    step = Step(3, 4, 28, 0.9, 0.8)
    mx.eval(x)

    def plain():
        return velocity(3, x)

    def controlled():
        return velocity(3, x, **extra.model_inputs(step, x))

    base = mx.get_active_memory()
    runs = {"plain": [], "controlnet": []}
    peaks = {}
    for r in range(warmup + rep):  # interleaved, so load from other work on the machine hits both alike
        for name, fn in (("plain", plain), ("controlnet", controlled)):
            mx.reset_peak_memory()
            wall, cpu = time.perf_counter(), time.process_time()
            mx.eval(fn())
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            peaks[name] = max(peaks.get(name, 0), mx.get_peak_memory() - base)
            if r >= warmup:
                runs[name].append((wall, cpu))
    plain_s, cn_s = (min(w for w, _ in runs[k]) for k in ("plain", "controlnet"))
    plain_cpu, cn_cpu = (min(c for _, c in runs[k]) for k in ("plain", "controlnet"))
    full_plain = plain_s / transformer.config.num_layers * FULL_TRANSFORMER_DEPTH
    full_cn = full_plain + (cn_s - plain_s) / net.config.num_layers * FULL_CONTROLNET_DEPTH
    full_plain_cpu = plain_cpu / transformer.config.num_layers * FULL_TRANSFORMER_DEPTH
    full_cn_cpu = full_plain_cpu + (cn_cpu - plain_cpu) / net.config.num_layers * FULL_CONTROLNET_DEPTH
    tokens = (lat // 2) ** 2
    residual_bytes = FULL_CONTROLNET_DEPTH * 2 * tokens * cfg.hidden_size * mx.zeros((), dtype).itemsize
    return {
        "size": size,
        "dtype": str(dtype),
        "quantize": bits,
        "depth": transformer.config.num_layers,
        "controlnet_depth": net.config.num_layers,
        "plain_step_s": plain_s,
        "controlnet_step_s": cn_s,
        "measured_ratio": cn_s / plain_s,
        "plain_step_cpu_s": plain_cpu,
        "controlnet_step_cpu_s": cn_cpu,
        "measured_cpu_time_ratio": cn_cpu / plain_cpu,
        "extrapolated_plain_step_s": full_plain,
        "extrapolated_controlnet_step_s": full_cn,
        "extrapolated_ratio": full_cn / full_plain,
        "extrapolated_cpu_time_ratio": full_cn_cpu / full_plain_cpu,
        "weights_bytes_measured": base,
        "plain_step_work_bytes": peaks["plain"],
        "controlnet_step_work_bytes": peaks["controlnet"],
        "residuals_bytes_23_blocks": residual_bytes,
    }


def main() -> None:
    p = parser(__doc__, dtype="float32", repeats=2)
    p.add_argument("--depth", type=int, default=2, help="transformer blocks built and run (default 2)")
    p.add_argument("--controlnet-depth", type=int, default=None, help="ControlNet blocks (default: --depth)")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--quantize", type=int, choices=(4, 8), default=None, help="both models' linear layers")
    p.add_argument("--ctx-len", type=int, default=333)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each step first (default 1)")
    p.add_argument("--cache", type=Path, default=None, help="build the weights here once and reuse them")
    args = p.parse_args()
    dtype = mlx_dtype(args.dtype)
    cn_depth = args.controlnet_depth or args.depth

    print(f"# {machine()}", flush=True)
    weights = {q: full_depth_weights(q, mx.bfloat16) for q in (None, 8, 4)}
    for q, w in weights.items():
        print(
            f"full depth, bfloat16{f', {q}-bit' if q else ''}: transformer {w['transformer_bytes'] / 2**30:.2f} GiB, "
            f"ControlNet (23 blocks) {w['controlnet_bytes'] / 2**30:.2f} GiB",
            flush=True,
        )
    results = {"full_depth_weights_bf16": {str(q): w for q, w in weights.items()}, "steps": []}
    with tempfile.TemporaryDirectory() as tmp:
        t_folder, c_folder = build(args.cache or Path(tmp), args.depth, cn_depth)
        for size in args.sizes:
            r = bench(t_folder, c_folder, size, dtype, args.quantize, args.ctx_len, args.warmup, args.repeats)
            results["steps"].append(r)
            print(
                f"{size}px {args.dtype}{f' q{args.quantize}' if args.quantize else ''} depth {r['depth']}+"
                f"{r['controlnet_depth']}: plain {r['plain_step_s']:.3f}s, "
                f"with ControlNet {r['controlnet_step_s']:.3f}s "
                f"(x{r['measured_ratio']:.2f}; CPU time x{r['measured_cpu_time_ratio']:.2f}) | "
                f"24+23 blocks: plain {r['extrapolated_plain_step_s']:.2f}s, "
                f"with ControlNet {r['extrapolated_controlnet_step_s']:.2f}s (x{r['extrapolated_ratio']:.2f}; CPU time "
                f"x{r['extrapolated_cpu_time_ratio']:.2f}) | "
                f"step work {r['plain_step_work_bytes'] / 2**30:.2f} -> {r['controlnet_step_work_bytes'] / 2**30:.2f} "
                f"GiB, 23 residuals {r['residuals_bytes_23_blocks'] / 2**30:.2f} GiB",
                flush=True,
            )
    write_json(args.json, results)


if __name__ == "__main__":
    main()
