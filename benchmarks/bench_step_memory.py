"""Peak memory and time of one guided step under different evaluation schedules (GPU backends).

    python benchmarks/bench_step_memory.py --depth 24 --size 1024 --dtype bfloat16

Modes: `step` one mx.eval per step (the sampler's default); `block` mx.eval after every block (a host sync);
`async` mx.async_eval after every block; `limit` one eval under sampling.memory.bounded_work(--margin-gib);
`async_limit` both. Random full-width weights. Why and figures: benchmarks/README.md (H200 section).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import sd35m_mlx  # noqa: E402,F401

# isort: split
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from benchmarks.measure import build_once, guided_inputs, mlx_dtype, parser, write_json  # noqa: E402
from sd35m_mlx.loading.transformer import load_transformer  # noqa: E402
from sd35m_mlx.sampling.guidance import GuidanceConfig, GuidedDenoiser  # noqa: E402
from sd35m_mlx.sampling.memory import bounded_work  # noqa: E402

MODES = ("step", "block", "async", "limit", "async_limit")


class _EvalAfter(nn.Module):
    """A transformer block followed by an evaluation of its outputs."""

    def __init__(self, block, evaluate):
        super().__init__()
        self.block = block
        self._evaluate = evaluate

    def __call__(self, x, context, mods):
        x, new_context = self.block(x, context, mods)
        self._evaluate(x, *(() if new_context is None else (new_context,)))
        return x, new_context


def _timed_steps(den, x, repeats: int) -> tuple[list[float], list[int]]:
    times, peaks = [], []
    for _ in range(repeats):
        mx.synchronize()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        mx.eval(den(0, x))
        times.append(time.perf_counter() - t0)
        peaks.append(mx.get_peak_memory() - base)
    return times, peaks


def run_mode(model, mode: str, x, ctx, pooled, dtype, repeats: int, margin: int) -> dict:
    blocks = list(model.transformer_blocks)
    den = GuidedDenoiser(model, ctx, pooled, [750.0], GuidanceConfig(scale=4.5), 0, dtype)
    if mode in ("block", "async", "async_limit"):
        model.transformer_blocks = [_EvalAfter(b, mx.eval if mode == "block" else mx.async_eval) for b in blocks]
    try:
        mx.eval(den(0, x))  # warm-up
        with bounded_work(margin if mode in ("limit", "async_limit") else None):
            times, peaks = _timed_steps(den, x, repeats)
    finally:
        model.transformer_blocks = blocks
    return {"mode": mode, "step_s": min(times), "work_gib": max(peaks) / 2**30, "runs_s": times}


def main(argv=None) -> list[dict]:
    p = parser(__doc__, dtype="bfloat16", repeats=3)
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--margin-gib", type=float, default=1.0, help="'limit' mode: headroom above the weights")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--cache", type=Path, default=None, help="folder for the random weights (built once)")
    args = p.parse_args(argv)
    from benchmarks.fixtures import build_medium_transformer

    with tempfile.TemporaryDirectory() as tmp:
        folder = (args.cache or Path(tmp)) / f"transformer-d{args.depth}-s0"
        build_once(folder, lambda d: build_medium_transformer(d, args.depth, 0))
        dtype = mlx_dtype(args.dtype)
        model = load_transformer(folder, dtype)
        mx.eval(model.parameters())
        x, ctx, pooled = map(mx.array, guided_inputs(model.config, args.size, 333))
        print(f"# mlx {mx.__version__} {mx.default_device()} {args.dtype} depth {args.depth} {args.size}px batch 2")
        results = []
        for mode in args.modes:
            r = run_mode(model, mode, x, ctx, pooled, dtype, args.repeats, int(args.margin_gib * 2**30))
            results.append(r)
            ms, work = r["step_s"] * 1e3, r["work_gib"]
            print(f"{mode:>11} (margin {args.margin_gib} GiB): step {ms:9.2f} ms   work {work:6.2f} GiB", flush=True)
    write_json(args.json, {"args": vars(args), "results": results})
    return results


if __name__ == "__main__":
    main()
