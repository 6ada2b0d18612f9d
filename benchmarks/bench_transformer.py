"""One MMDiT forward, ours (MLX) vs diffusers (PyTorch), same weights, same dtype, one run.

    python benchmarks/bench_transformer.py --depth 2 --sizes 512 1024

Full SD3.5 Medium width (hidden 1536, 24 heads, 384x384 positional table, dual attention);
diffusers runs in a child process without the system OpenBLAS preload (see torch_side). Depth is
reduced on small machines (time scales linearly with depth: the script also prints
the per-block time and the 24-block extrapolation). On Linux unset OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE for this command only (see DEVELOPERS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sd35m_mlx  # noqa: E402,F401  (loads OpenBLAS before mlx on Linux)

# isort: split
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from scripts.build_fixture import build_full_width_transformer  # noqa: E402
from sd35m_mlx._blas import loaded_openblas  # noqa: E402
from sd35m_mlx.loading.transformer import load_transformer  # noqa: E402


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _inputs(cfg: dict, size: int, batch: int, ctx_len: int):
    rng = np.random.default_rng(0)
    lat = size // 8
    x = rng.standard_normal((batch, lat, lat, cfg["in_channels"]), dtype=np.float32)
    ctx = rng.standard_normal((batch, ctx_len, cfg["joint_attention_dim"]), dtype=np.float32)
    pooled = rng.standard_normal((batch, cfg["pooled_projection_dim"]), dtype=np.float32)
    t = np.full((batch,), 500.0, dtype=np.float32)
    return x, ctx, pooled, t


def torch_side(folder: Path, size: int, batch: int, ctx_len: int, repeats: int, out: Path) -> None:
    """diffusers' forward, timed in a process that never loaded the system OpenBLAS: once MLX has used
    it, its spinning worker threads slow torch's own CPU kernels (attention ~60x) in the same process."""
    import torch
    from diffusers import SD3Transformer2DModel as TorchModel

    ref = TorchModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    x, ctx, pooled, t = _inputs(dict(ref.config), size, batch, ctx_len)
    th_in = (torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), *map(torch.from_numpy, (ctx, pooled, t)))
    with torch.inference_mode():
        seconds = _time(lambda: ref(*th_in), repeats)
        sample = ref(*th_in).sample.permute(0, 2, 3, 1).numpy()
    np.save(out, sample)
    out.with_suffix(".json").write_text(json.dumps({"seconds": seconds}))


def bench(folder: Path, size: int, batch: int, ctx_len: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ref.npy"
        env = {**os.environ, "SD35M_MLX_NO_OPENBLAS": "1"}
        cmd = [sys.executable, __file__, "--torch-side", str(folder), str(size), str(batch), str(ctx_len)]
        subprocess.run([*cmd, str(repeats), str(out)], check=True, env=env)
        ref_s = json.loads(out.with_suffix(".json").read_text())["seconds"]
        out_ref = np.load(out)

    ours = load_transformer(folder, mx.float32)
    mx.eval(ours.parameters())
    cfg = ours.config
    mx_in = [mx.array(a) for a in _inputs(vars(cfg), size, batch, ctx_len)]
    mx.eval(mx_in)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    ours_s = _time(lambda: mx.eval(ours(*mx_in)), repeats)
    peak = mx.get_peak_memory()
    out = np.array(ours(*mx_in))
    err = float(np.abs(out - out_ref).max() / out_ref.std())
    return {
        "size": size,
        "batch": batch,
        "depth": cfg.num_layers,
        "ours_s": ours_s,
        "diffusers_s": ref_s,
        "ratio_ours_over_diffusers": ours_s / ref_s,
        "ours_per_block_s": ours_s / cfg.num_layers,
        "ours_peak_bytes": peak,
        "ours_weights_bytes": base,
        "max_abs_err_over_std": err,
    }


def main() -> None:
    if sys.argv[1:2] == ["--torch-side"]:
        folder, size, batch, ctx_len, repeats, out = sys.argv[2:8]
        return torch_side(Path(folder), int(size), int(batch), int(ctx_len), int(repeats), Path(out))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ctx-len", type=int, default=333)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="write results here")
    args = p.parse_args()

    print(
        f"# {platform.platform()} mlx {mx.__version__} device {mx.default_device()} openblas {loaded_openblas or 'no'}",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_full_width_transformer(Path(tmp) / "transformer", depth=args.depth)
        for size in args.sizes:
            r = bench(folder, size, args.batch, args.ctx_len, args.repeats)
            results.append(r)
            print(
                f"{size}x{size} batch {r['batch']} depth {r['depth']}: ours {r['ours_s']:.3f}s "
                f"diffusers {r['diffusers_s']:.3f}s ratio {r['ratio_ours_over_diffusers']:.2f} | "
                f"ours peak {r['ours_peak_bytes'] / 2**30:.2f} GiB "
                f"(weights {r['ours_weights_bytes'] / 2**30:.2f} GiB) | "
                f"24-block extrapolation {r['ours_per_block_s'] * 24:.1f}s | "
                f"err/std {r['max_abs_err_over_std']:.1e}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
