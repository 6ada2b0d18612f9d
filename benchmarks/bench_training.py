"""LoRA training step: time and peak memory at the real SD3.5 Medium width, reduced depth, extrapolated
linearly to 24 blocks; bfloat16 / 8-bit / 4-bit frozen base, with and without per-block checkpointing.

    python -m benchmarks.bench_training                                  # 512 and 1024 px, depths 2 and 4
    python -m benchmarks.bench_training --sizes 512 --bases bf16 q8 --json training.json

A step is what `Trainer.train_step` does: the flow-matching loss (batch 1, 333 context tokens as T5 + CLIP
give), LoRA gradients (rank 16, alpha 16, attention of both streams and attn2: the default targets), gradient
clipping and the AdamW update, evaluated. Random weights (speed and memory do not depend on their values),
blocks in SD3.5 Medium's proportion of kinds (speed_fixtures.medium_dual_layers). Peak: mx.get_peak_memory over
the second step (weights, LoRA, optimizer state and activations: what the machine must hold); both grow
linearly with depth, so 24 blocks = value(d2) + (24 - d2) * (value(d2) - value(d1)) / (d2 - d1).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

import sd35m_mlx  # noqa: E402,F401  (loads OpenBLAS before mlx on Linux)

# isort: split
import mlx.core as mx  # noqa: E402

from benchmarks.speed_fixtures import MEDIUM_DEPTH, medium_dual_layers  # noqa: E402
from sd35m_mlx.models.mmdit import MMDiTConfig, SD3Transformer2DModel  # noqa: E402
from sd35m_mlx.quantize import quantize_model  # noqa: E402
from sd35m_mlx.sampling.schedule import FlowMatchSchedule  # noqa: E402
from sd35m_mlx.training import Recipe, TrainableLora, resolve_targets, sample_sigmas  # noqa: E402
from sd35m_mlx.training.lora_params import checkpoint_blocks  # noqa: E402
from sd35m_mlx.training.optim import clip_gradients, make_optimizer  # noqa: E402
from sd35m_mlx.training.step import Batch, loss_and_grads  # noqa: E402

BASES = {"bf16": None, "q8": 8, "q4": 4}


def measure(depth: int, size: int, base: str, checkpointing: bool, rank: int) -> tuple[float, int]:
    """(seconds, peak bytes) of the second training step of a fresh model."""
    config = MMDiTConfig(num_layers=depth, dual_attention_layers=medium_dual_layers(depth))
    model = SD3Transformer2DModel(config)
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    if BASES[base] is not None:
        quantize_model(model, BASES[base])
    lora = TrainableLora(model, resolve_targets(model), rank, rank)
    if checkpointing:
        checkpoint_blocks(model)
    optimizer = make_optimizer(1e-4, 1000)
    lat = size // 8
    batch = Batch(
        mx.random.normal((1, lat, lat, 16)).astype(mx.bfloat16),
        mx.random.normal((1, 333, config.joint_attention_dim)).astype(mx.bfloat16),
        mx.random.normal((1, config.pooled_projection_dim)).astype(mx.bfloat16),
    )
    noise = mx.random.normal(batch.latents.shape).astype(mx.bfloat16)
    sigmas, timesteps = sample_sigmas([0.5], FlowMatchSchedule())
    mx.eval(batch.latents, batch.prompt_embeds, batch.pooled_prompt_embeds, noise)

    def step():
        loss, grads = loss_and_grads(lora, model, batch, noise, sigmas, timesteps, Recipe())
        grads, _ = clip_gradients(grads, 1.0)
        lora.params = optimizer.apply_gradients(grads, lora.params)
        mx.eval(loss, lora.params, optimizer.state)
        lora.bind(lora.params)

    step()  # warm-up: optimizer state allocated, kernels ready
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    return seconds, mx.get_peak_memory()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="image sides in px")
    ap.add_argument("--depths", type=int, nargs=2, default=[2, 4], help="two depths to extrapolate from")
    ap.add_argument("--bases", nargs="+", choices=BASES, default=list(BASES), help="frozen base precision")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--checkpointing", choices=("off", "on", "both"), default="both")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    d1, d2 = args.depths
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    load = open("/proc/loadavg").read().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"{platform.node()} {mx.default_device()} depths {d1},{d2} -> {MEDIUM_DEPTH}, load {load}", flush=True)
    results = []
    for size in args.sizes:
        mx.clear_cache()
        for base in args.bases:
            for ckpt in modes:
                (t1, p1), (t2, p2) = (measure(d, size, base, ckpt, args.rank) for d in (d1, d2))
                t24 = t2 + (MEDIUM_DEPTH - d2) * (t2 - t1) / (d2 - d1)
                p24 = p2 + (MEDIUM_DEPTH - d2) * (p2 - p1) / (d2 - d1)
                row = dict(size=size, base=base, checkpointing=ckpt, step_s=[t1, t2], peak_bytes=[p1, p2])
                row.update(step_24_s=t24, peak_24_gb=p24 / 2**30)
                results.append(row)
                print(
                    f"{size} px, {base}, checkpointing {'on ' if ckpt else 'off'}: step {t1:.2f}/{t2:.2f} s at "
                    f"depth {d1}/{d2} -> {t24:.1f} s at 24; peak {p1 / 2**30:.2f}/{p2 / 2**30:.2f} GB "
                    f"-> {p24 / 2**30:.2f} GB",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
