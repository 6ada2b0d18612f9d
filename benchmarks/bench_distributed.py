"""Several ranks (mx.distributed, ring backend on 127.0.0.1): bytes exchanged and time per image.

    python benchmarks/bench_distributed.py              # 512 px, full-width MMDiT at depth 3, ~10 min on 2 cores
    python benchmarks/bench_distributed.py --quick      # toy sizes: checks the script in ~2 min

One process, then 2 ranks under `mlx.launch` (`--split seeds`, `--split cfg`). Method and figures:
benchmarks/README.md.
"""

from __future__ import annotations

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
from benchmarks.measure import parser, write_json  # noqa: E402

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
    p = parser(
        __doc__,
        json=str(REPO / "benchmarks" / "results" / "distributed.json"),
        quick="toy sizes: the tiny fixture's transformer, 64 px",
    )
    p.add_argument("--size", type=int, default=512, help="image side in px for the end-to-end runs")
    p.add_argument("--depth", type=int, default=3, help="MMDiT blocks (full width)")
    p.add_argument("--steps", type=int, default=6, help="steps per image in the end-to-end runs")
    p.add_argument("--images", type=int, default=2, help="images per end-to-end run")
    p.add_argument("--ctx-len", type=int, default=333, help="context tokens (77 CLIP + 256 T5)")
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


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.size, args.steps, args.images, args.ctx_len = 64, 3, 2, 16
    load = os.getloadavg()[0]
    print(f"# bench_distributed: {os.cpu_count()} cores, load average {load:.1f}; size {args.size}, "
          f"depth {'tiny' if args.quick else args.depth}, {args.steps} steps, {args.images} images")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(Path(tmp), args)
        runs = [end_to_end(folder, "seeds", 1, args)]
        runs += [end_to_end(folder, mode, 2, args) for mode in ("seeds", "cfg")]

    print("\n| run | s/image | speed-up | bytes sent (all ranks) per image | per step |")
    print("| --- | --- | --- | --- | --- |")
    base = runs[0]["s_per_image"]
    for r in runs:
        name = "1 process" if r["ranks"] == 1 else f"2 ranks, --split {r['mode']}"
        per_image = sum(r["sent"]) / r["images"]
        per_step = f"{per_image / args.steps / 1e6:.3f} MB" if r["mode"] == "cfg" and r["ranks"] > 1 else "-"
        print(f"| {name} | {r['s_per_image']:.2f} | {base / r['s_per_image']:.2f} | {per_image / 1e6:.3f} MB | "
              f"{per_step} |")  # fmt: skip
    write_json(args.json, {"args": vars(args), "load": load, "runs": runs})


if __name__ == "__main__":
    main()
