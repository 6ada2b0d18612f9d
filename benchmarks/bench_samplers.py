"""What each sampler costs: model calls per step and time per step relative to euler.

    python benchmarks/bench_samplers.py                    # the tiny fixture, 8 steps, 64 px

`generate(sampler=...)` end to end (CFG batch 2, latents out), best wall and process CPU time of `--runs`
interleaved runs after a warm-up; model calls counted at the velocity function. Figures: benchmarks/README.md.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sd35m_mlx  # noqa: E402,F401  (loads OpenBLAS before mlx on Linux)

# isort: split
import numpy as np  # noqa: E402

from benchmarks.measure import parser, write_json  # noqa: E402
from sd35m_mlx import StableDiffusion35  # noqa: E402
from sd35m_mlx.sampling.guidance import GuidedDenoiser  # noqa: E402
from sd35m_mlx.sampling.samplers import SAMPLERS  # noqa: E402


class _Counting(GuidedDenoiser):
    calls = 0

    def __call__(self, *args, **kwargs):
        type(self).calls += 1
        return super().__call__(*args, **kwargs)


def bench(pipe, samplers, steps: int, size: int, runs: int) -> dict:
    pipe.velocity_factory = _Counting
    noise = np.random.default_rng(0).standard_normal((1, size // 8, size // 8, 16), dtype=np.float32)
    kw = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=4.5, output_type="latent")
    wall, cpu, calls = {}, {}, {}
    try:
        for r in range(runs + 1):  # run 0: warm-up (and the call count)
            for name in samplers:
                _Counting.calls = 0
                t0, c0 = time.perf_counter(), time.process_time()
                pipe.generate("a lighthouse at dusk", latents=noise, seed=1, sampler=name, **kw)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if r == 0:
                    calls[name] = _Counting.calls
                else:
                    wall[name], cpu[name] = min(wall.get(name, dt), dt), min(cpu.get(name, dc), dc)
    finally:
        pipe.velocity_factory = GuidedDenoiser
    return {
        name: {
            "model_calls": calls[name],
            "calls_per_step": calls[name] / steps,
            "s_per_step": wall[name] / steps,
            "relative_to_euler": wall[name] / wall["euler"],
            "cpu_s_per_step": cpu[name] / steps,
            "cpu_relative_to_euler": cpu[name] / cpu["euler"],
        }
        for name in samplers
    }


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", help="model folder or hub id (default: the tiny random-weight fixture)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--samplers", nargs="*", default=list(SAMPLERS))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from scripts.build_fixture import build_tiny_pipeline

            model = build_tiny_pipeline(Path(tmp) / "tiny")
        pipe = StableDiffusion35.from_pretrained(model, dtype="float32")
        samplers = ["euler"] + [s for s in args.samplers if s != "euler"]
        results = bench(pipe, samplers, args.steps, args.size, args.runs)
    print(f"{args.steps} steps, {args.size} px, best of {args.runs}")
    print("| sampler | model calls | per step | wall per step | vs euler | CPU per step | vs euler |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        print(
            f"| {name} | {r['model_calls']} | {r['calls_per_step']:.2f} | {r['s_per_step'] * 1e3:.1f} ms "
            f"| {r['relative_to_euler']:.2f} | {r['cpu_s_per_step'] * 1e3:.1f} ms | {r['cpu_relative_to_euler']:.2f} |"
        )
    write_json(args.json, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
