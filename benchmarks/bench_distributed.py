"""Several ranks (mx.distributed, ring backend on 127.0.0.1): bytes exchanged, time per image, projection.

    python benchmarks/bench_distributed.py              # 512 px, full-width MMDiT at depth 3, ~10 min on 2 cores
    python benchmarks/bench_distributed.py --quick      # toy sizes: checks the script in ~2 min

1. one process, then 2 ranks under `mlx.launch` (`--split seeds`, `--split cfg`) on the real-width MMDiT
   at reduced depth with the tiny fixture's VAE (random prompt embeddings of the real shapes): seconds per
   image and the bytes each rank sent (Ranks.sent_bytes); 2. the guided forward at batch 2 and 1 and the
   SLG pass at batch 1, in one process; 3. the speed-up projected for two Macs at 1024 px from those
   ratios and the exchanged bytes over 10 GbE and Thunderbolt. Method and figures: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import sd35m_mlx  # noqa: E402,F401  (OpenBLAS before mlx.core)

# isort: split
from benchmarks.measure import write_json  # noqa: E402

# effective payload bandwidths (bytes/s) and per-collective latency (s) assumed for the projection
LINKS = {
    "10 GbE": (1.1e9, 100e-6),
    "Thunderbolt 4 bridge (~20 Gb/s)": (2.5e9, 50e-6),
    "Thunderbolt 5 bridge (~60 Gb/s)": (7.0e9, 50e-6),
}

WORKER = r"""
import json, sys, time
import sd35m_mlx
import mlx.core as mx
from sd35m_mlx import StableDiffusion35
from sd35m_mlx.distributed import Ranks, gather_images, rounds, my_index, split_cfg

folder, mode, n, size, steps, ctx_len = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
ranks = Ranks.join()
pipe = StableDiffusion35.from_pretrained(folder, dtype="float32")
cfg = pipe.transformer_config
key = mx.random.key(0)
embeds = dict(
    prompt_embeds=mx.random.normal((1, ctx_len, cfg.joint_attention_dim), key=key),
    negative_prompt_embeds=mx.random.normal((1, ctx_len, cfg.joint_attention_dim), key=mx.random.key(1)),
    pooled_prompt_embeds=mx.random.normal((1, cfg.pooled_projection_dim), key=mx.random.key(2)),
    negative_pooled_prompt_embeds=mx.random.normal((1, cfg.pooled_projection_dim), key=mx.random.key(3)),
)
kw = dict(height=size, width=size, num_inference_steps=steps, skip_guidance_layers=[1], **embeds)
if mode == "cfg":
    split_cfg(pipe, ranks)
ranks.exchange({}, "loading")  # start the clock together
t0 = time.perf_counter()
if mode == "cfg" or ranks.size == 1:
    for seed in range(n):
        out = pipe.generate(seed=seed, output_type="pil" if ranks.rank == 0 else "latent", **kw)
else:
    for r in rounds(n, ranks.size):
        i = my_index(r, ranks.rank)
        image = pipe.generate(seed=i, **kw)[0] if i is not None else None
        gather_images(ranks, image, (size, size), len(r), "collecting")
seconds = time.perf_counter() - t0
sent = [rec["sent"] for rec in ranks.exchange({"sent": ranks.sent_bytes}, "totals")]
if ranks.rank == 0:
    print(json.dumps({"mode": mode, "ranks": ranks.size, "images": n, "s_per_image": seconds / n, "sent": sent}))
ranks.close()
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="image side in px for the end-to-end runs")
    p.add_argument("--depth", type=int, default=3, help="MMDiT blocks (full width)")
    p.add_argument("--steps", type=int, default=6, help="steps per image in the end-to-end runs")
    p.add_argument("--images", type=int, default=2, help="images per end-to-end run")
    p.add_argument("--ctx-len", type=int, default=333, help="context tokens (77 CLIP + 256 T5)")
    p.add_argument("--mac-step-s", type=float, nargs="+", default=[0.25, 1.0],
                   help="one-Mac guided step times (batch 2, 1024 px) to project for")  # fmt: skip
    p.add_argument(
        "--batch1-ratio",
        type=float,
        nargs="+",
        default=[0.5, 0.6],
        help="batch-1 over batch-2 forward times to project for, besides the one measured here",
    )
    p.add_argument("--projection-only", metavar="JSON", help="only the projection, from an earlier run's JSON")
    p.add_argument("--quick", action="store_true", help="toy sizes: the tiny fixture's transformer, 64 px")
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "distributed.json"))
    return p.parse_args(argv)


def build_folder(tmp: Path, args) -> Path:
    from scripts.build_fixture import build_tiny_pipeline

    folder = build_tiny_pipeline(tmp / "pipeline")
    if not args.quick:
        from benchmarks.fixtures import build_medium_transformer

        shutil.rmtree(folder / "transformer")
        build_medium_transformer(folder / "transformer", args.depth)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_to_end(folder: Path, mode: str, nranks: int, args) -> dict:
    worker = [str(a) for a in (folder, mode, args.images, args.size, args.steps, args.ctx_len)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if nranks == 1:
        cmd = [sys.executable, "-c", WORKER, *worker]
    else:
        env["OPENBLAS_NUM_THREADS"] = "1"  # one core each: the two ranks share the machine's 2 cores
        launcher = shutil.which("mlx.launch") or str(Path(sys.executable).with_name("mlx.launch"))
        cmd = [launcher, "-n", str(nranks), "--backend", "ring", "--starting-port", str(free_port()),
               "--", sys.executable, "-c", WORKER, *worker]  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines or "WARN" in p.stderr:
        raise RuntimeError(f"{mode} on {nranks} rank(s) failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1])


def step_parts(folder: Path, args) -> dict:
    """Seconds for the guided forward at batch 2 and 1 and the SLG pass at batch 1 (one process)."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from benchmarks.measure import time_kernel
    from sd35m_mlx.loading.transformer import load_transformer
    from sd35m_mlx.sampling.guidance import GuidanceConfig, GuidedDenoiser

    tr = load_transformer(folder / "transformer", mx.float32)
    cfg = tr.config
    ctx = mx.random.normal((2, args.ctx_len, cfg.joint_attention_dim))
    pooled = mx.random.normal((2, cfg.pooled_projection_dim))
    d = GuidedDenoiser(tr, ctx, pooled, [1000.0, 500.0], GuidanceConfig(), 0, mx.float32)
    lat = args.size // 8
    x = mx.random.normal((1, lat, lat, cfg.in_channels))
    mods = d.modulations[0]
    half = tree_map(lambda a: a[1:], mods)
    return {
        "batch2_s": time_kernel(lambda: d._denoise(mx.concatenate([x, x]), d.context, mods)),
        "batch1_s": time_kernel(lambda: d._denoise(x, d.context[1:], half)),
        "skip1_s": time_kernel(lambda: d._denoise(x, d.context[1:], half, [1])),
        "depth": cfg.num_layers,
    }


def projection(batch1_ratios: list[float], mac_steps: list[float]) -> list[dict]:
    """SD3.5 Medium, 1024 px, bfloat16, 40 steps with SLG (layers 7-9 of 24) on steps 1-7.

    `batch1_ratios`: a batch-1 forward's time over the guided batch-2 forward's (0.5 is perfect
    scaling; a GPU at 1024 px, 4429 tokens, is near it). The exchange is one velocity per rank per
    step (two in SLG steps) plus one collective's latency.
    """
    steps, slg_steps = 40, 7
    velocity = 128 * 128 * 16 * 2  # one (1, 128, 128, 16) bfloat16 velocity
    image = 1024 * 1024 * 3  # uint8 RGB, gathered once per image in --split seeds
    rows = []
    for b1 in batch1_ratios:
        skip = b1 * 21 / 24  # the SLG pass runs 21 of 24 blocks at batch 1
        for t2 in mac_steps:
            one = (steps + slg_steps * skip) * t2  # one Mac: guided step, plus the SLG pass on SLG steps
            for link, (bw, lat) in LINKS.items():
                x_plain, x_slg = lat + velocity / bw, lat + 2 * velocity / bw
                # the cond rank runs the SLG pass; the uncond rank waits for it
                cfg = (steps - slg_steps) * (b1 * t2 + x_plain) + slg_steps * ((b1 + skip) * t2 + x_slg)
                dp = one / 2 + lat + image / bw  # each rank half the images, one gather per image pair
                rows.append({"batch1_ratio": b1, "mac_step_s": t2, "link": link, "cfg_speedup": one / cfg,
                             "seeds_speedup": one / dp, "exchange_ms_per_step": 1e3 * x_plain,
                             "uncond_rank_idle": slg_steps * skip * t2 / cfg})  # fmt: skip
    return rows


def print_projection(rows: list[dict]) -> None:
    print("\nProjected for two Macs: SD3.5 Medium 1024 px bf16, 40 steps (SLG on 7); text encoding, decode aside")
    print("| batch-1/batch-2 | one-Mac step | link | exchange/step | --split cfg | uncond rank idle | --split seeds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cells = [f"{r['batch1_ratio']:.2f}", f"{r['mac_step_s']:.2f} s", r["link"],
                 f"{r['exchange_ms_per_step']:.2f} ms", f"{r['cfg_speedup']:.2f}x",
                 f"{100 * r['uncond_rank_idle']:.0f}%", f"{r['seeds_speedup']:.2f}x"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")


def _ratios(parts: dict, args) -> list[float]:
    measured = parts["batch1_s"] / parts["batch2_s"]
    if measured < 0.5:
        print(f"(measured batch-1 ratio {measured:.2f} is below perfect scaling: timing noise; using 0.5)")
    return sorted({round(max(measured, 0.5), 2), *args.batch1_ratio})


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.projection_only:
        print_projection(projection(_ratios(json.loads(Path(args.projection_only).read_text())["parts"], args),
                                    args.mac_step_s))  # fmt: skip
        return
    if args.quick:
        args.size, args.steps, args.images, args.ctx_len = 64, 3, 2, 16
    load = os.getloadavg()[0]
    print(f"# bench_distributed: {os.cpu_count()} cores, load average {load:.1f}; size {args.size}, "
          f"depth {'tiny' if args.quick else args.depth}, {args.steps} steps, {args.images} images")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(Path(tmp), args)
        runs = [end_to_end(folder, "seeds", 1, args)]
        runs += [end_to_end(folder, mode, 2, args) for mode in ("seeds", "cfg")]
        parts = step_parts(folder, args)

    print("\n| run | s/image | speed-up | bytes sent (all ranks) per image | per step |")
    print("| --- | --- | --- | --- | --- |")
    base = runs[0]["s_per_image"]
    for r in runs:
        name = "1 process" if r["ranks"] == 1 else f"2 ranks, --split {r['mode']}"
        per_image = sum(r["sent"]) / r["images"]
        per_step = f"{per_image / args.steps / 1e6:.3f} MB" if r["mode"] == "cfg" and r["ranks"] > 1 else "-"
        print(f"| {name} | {r['s_per_image']:.2f} | {base / r['s_per_image']:.2f} | {per_image / 1e6:.3f} MB | "
              f"{per_step} |")  # fmt: skip
    print(f"\nstep parts (depth {parts['depth']}, {args.size} px, float32): batch 2 {parts['batch2_s']:.3f} s, "
          f"batch 1 {parts['batch1_s']:.3f} s ({parts['batch1_s'] / parts['batch2_s']:.2f}), "
          f"SLG pass at batch 1 {parts['skip1_s']:.3f} s")  # fmt: skip
    rows = projection(_ratios(parts, args), args.mac_step_s)
    print_projection(rows)
    write_json(args.json, {"args": vars(args), "load": load, "runs": runs, "parts": parts, "projection": rows})


if __name__ == "__main__":
    main()
