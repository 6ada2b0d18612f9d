"""Where a guided SD3.5 Medium step spends its time: ours (MLX) vs diffusers (PyTorch), one run.

    python benchmarks/bench_speed.py                       # depth 3, 512 and 1024 px, text, VAE
    python benchmarks/bench_speed.py --quick               # toy sizes: checks the script in ~1 min

Ours (the sampler's real guided step, prompt encoding, VAE decode) vs diffusers on the same random
weights, inputs and dtype. How to run it on each platform, what each section measures, and figures:
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# Run as a script, Python puts benchmarks/ first on sys.path, where our helper modules would shadow
# installed packages of the same names (transformers probes for one called "kernels"): the repo
# root goes there instead, and the helpers are imported as `benchmarks.*`.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import sd35m_mlx  # noqa: E402,F401  (loads OpenBLAS before mlx on Linux)

# isort: split
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import torch_side  # noqa: E402
from benchmarks.measure import (  # noqa: E402
    MLXPeak,
    build_once,
    gib,
    guided_inputs,
    log,
    mlx_dtype,
    mlx_once,
    mlx_param_bytes,
    parser,
    time_once_or_warm,
    time_runs,
    write_json,
)
from benchmarks.speed_report import print_report  # noqa: E402
from benchmarks.torch_side import TorchRunner  # noqa: E402
from sd35m_mlx._blas import loaded_openblas  # noqa: E402
from sd35m_mlx.images import decode_latents  # noqa: E402
from sd35m_mlx.loading.text_encoders import load_text_encoders  # noqa: E402
from sd35m_mlx.loading.transformer import load_transformer  # noqa: E402
from sd35m_mlx.loading.vae import load_vae  # noqa: E402
from sd35m_mlx.models.mmdit import MMDiTConfig  # noqa: E402
from sd35m_mlx.sampling.guidance import GuidanceConfig, GuidedDenoiser  # noqa: E402
from sd35m_mlx.sampling.memory import DEFAULT_WORK_BUDGET, bounded_work  # noqa: E402

PROMPT, GUIDANCE, TIMESTEP = torch_side.PROMPT, torch_side.GUIDANCE, torch_side.TIMESTEP
LONG_S = 20.0  # text/VAE: a first run longer than this is the measurement (see time_once_or_warm)
ONCE_RUNS = 3  # text/VAE runs shorter than LONG_S are cheap enough to take the best of at least this many


def _kind(dual: bool, pre_only: bool) -> str:
    return {(True, False): "dual", (False, False): "plain", (False, True): "pre_only"}.get((dual, pre_only), "dual_pre")


def block_kinds(config: MMDiTConfig) -> list[tuple[bool, bool]]:
    """(dual attention, context pre-only) of every block."""
    n = config.num_layers
    return [(i in config.dual_attention_layers, i == n - 1) for i in range(n)]


def _err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / (ref.std() + 1e-12))


def _once_runs(args) -> int:
    return max(args.repeats, ONCE_RUNS)


def _free() -> None:
    gc.collect()
    mx.clear_cache()


def extrapolate(step_s, block_s: dict[str, float], built: list[str], target: list[str]) -> float | None:
    """Step time with `target`'s blocks: the measured step plus (or minus) whole blocks by kind."""
    delta = Counter(target)
    delta.subtract(Counter(built))
    total = step_s
    for kind, n in delta.items():
        if n:
            if kind not in block_s:
                return None
            total += n * block_s[kind]
    return total


# ---------------------------------------------------------------------------------------------
# 1: the transformer step


class OurStep:
    """Our guided step at one size: random inputs, the sampler's own denoiser, and timers."""

    def __init__(self, model, size: int, ctx_len: int, dtype, seed: int):
        self.model, self.dtype = model, dtype
        self.x, self.ctx, self.pooled = guided_inputs(model.config, size, ctx_len, seed)
        self.xm = mx.array(self.x)
        mx.eval(self.xm)
        self.den = None
        self.v = None

    def per_block(self) -> list[dict]:
        """Each block on the step's real activations, evaluated alone (also the first warm-up)."""
        m, dtype = self.model, self.dtype
        h = m.pos_embed(mx.concatenate([self.xm] * 2).astype(dtype))
        c = m.context_embedder(mx.array(self.ctx).astype(dtype))
        mods = m.schedule_modulations(mx.array([TIMESTEP]), mx.array(self.pooled).astype(dtype))[0]
        mx.eval(h, c, mods)
        blocks = []
        for i, (block, kind) in enumerate(zip(m.transformer_blocks, block_kinds(m.config), strict=True)):
            t0 = time.perf_counter()
            h, new_c = block(h, c, mods[i])
            mx.eval(h, new_c if new_c is not None else h)
            blocks.append({"index": i, "kind": _kind(*kind), "s": time.perf_counter() - t0})
            c = c if new_c is None else new_c
        return blocks

    def _step(self) -> None:
        self.v = self.den(0, self.xm)
        mx.eval(self.v)

    def warm(self) -> float:
        """Build the sampler's denoiser (context embedded, modulations precomputed) and run it once."""
        ctx, pooled = mx.array(self.ctx), mx.array(self.pooled)
        self.den = GuidedDenoiser(self.model, ctx, pooled, [TIMESTEP], GuidanceConfig(scale=GUIDANCE), 0, self.dtype)
        return time_runs(self._step, 1)[0]

    def timed(self, runs: int) -> list[float]:
        with bounded_work(DEFAULT_WORK_BUDGET):  # as the pipeline's loop runs it
            return time_runs(self._step, runs)


def _mean_by_kind(kinds: list[str], seconds: list[float]) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for k, s in zip(kinds, seconds, strict=True):
        acc.setdefault(k, []).append(s)
    return {k: sum(v) / len(v) for k, v in acc.items()}


def bench_transformer(folder: Path, sizes: list[int], args, torch_run: TorchRunner | None, device: str) -> list[dict]:
    """Section 1 at every size: ours, then diffusers (same inputs)."""
    dtype = mlx_dtype(args.dtype)
    ours = load_transformer(folder, dtype)
    mx.eval(ours.parameters())
    cfg = ours.config
    built = [_kind(*k) for k in block_kinds(cfg)]
    target = [_kind(*k) for k in block_kinds(MMDiTConfig())]

    results, velocities, inputs = [], [], []
    for size in sizes:
        log(f"transformer {size}x{size}: ours")
        step = OurStep(ours, size, args.ctx_len, dtype, args.seed)
        blocks = step.per_block()
        _free()
        first = step.warm()  # includes any compilation
        with MLXPeak() as peak:
            times = step.timed(args.repeats)
        velocities.append(np.array(step.v.astype(mx.float32)))
        inputs.append((step.x, step.ctx, step.pooled))

        del step
        _free()

        o = {
            "step_s": min(times),
            "step_runs_s": times,
            "first_step_s": first,
            "blocks": blocks,
            "block_s": _mean_by_kind(built, [b["s"] for b in blocks]),
            "peak_gib": gib(peak.peak),
            "work_gib": gib(peak.work),
            "weights_gib": gib(mlx_param_bytes(ours)),
            "peak_method": peak.method,
        }
        o["step_24_s"] = extrapolate(o["step_s"], o["block_s"], built, target)
        results.append({"size": size, "batch": 2, "context_tokens": args.ctx_len, "depth": cfg.num_layers, "ours": o})
    del ours
    _free()

    if torch_run is not None:
        log("transformer: diffusers, every size")
        for r, v, (d, v_ref) in zip(
            results,
            velocities,
            torch_run(torch_side.transformer_steps, str(folder), inputs, args.dtype, device, args.repeats),
            strict=True,
        ):
            d["block_s"] = _mean_by_kind(built, d["blocks_s"])
            d["step_24_s"] = extrapolate(d["step_s"], d["block_s"], built, target)
            r["diffusers"] = d
            r["ratio"] = r["ours"]["step_s"] / d["step_s"]
            if r["ours"]["step_24_s"] and d["step_24_s"]:
                r["ratio_24"] = r["ours"]["step_24_s"] / d["step_24_s"]
            r["max_abs_err_over_std"] = _err(v, v_ref)
    return results


# ---------------------------------------------------------------------------------------------
# 2: prompt encoding and VAE decode


def _ours_text(folder: Path, args) -> tuple[dict, np.ndarray, np.ndarray, int]:
    dtype = mlx_dtype(args.dtype)
    enc = load_text_encoders(folder, dtype)
    encoders = [enc.text_encoder, enc.text_encoder_2, enc.text_encoder_3]
    mx.eval([e.parameters() for e in encoders])
    ids = enc.tokenizer_3([PROMPT, ""], padding="max_length", max_length=256, truncation=True, return_tensors="np")
    ids = ids.input_ids.astype(np.int32)
    ids_mx = mx.array(ids)
    out: list = []
    r = mlx_once(lambda: out.append(enc.encode_prompt(PROMPT)), _once_runs(args), LONG_S, encoders)
    r["t5_s"] = time_once_or_warm(lambda: mx.eval(enc.text_encoder_3(ids_mx)), _once_runs(args), LONG_S)[0]
    return r, np.array(out[-1][0].astype(mx.float32)), ids, enc.text_encoder_3.config.num_layers


def bench_text(folder: Path, args, torch_run: TorchRunner | None, device: str, full_size: bool) -> dict:
    ours, embeds, ids, t5_layers = _ours_text(folder, args)
    _free()
    r = {"full_size": full_size, "t5_layers": t5_layers, "max_sequence_length": 256, "ours": ours}
    if torch_run is not None:
        d, ref_embeds = torch_run(
            torch_side.encode_text, str(folder), ids, args.dtype, device, _once_runs(args), LONG_S
        )
        r["diffusers"] = d
        r["ratio"] = ours["s"] / d["s"]
        r["max_abs_err_over_std"] = _err(embeds, ref_embeds)
    if full_size and t5_layers != 24:  # T5 time scales with its layers; CLIP is at full size already
        for side in ("ours", "diffusers"):
            if side in r:
                r[side]["s_t5_24"] = r[side]["s"] + (24 / t5_layers - 1) * r[side]["t5_s"]
        if "diffusers" in r:
            r["ratio_t5_24"] = r["ours"]["s_t5_24"] / r["diffusers"]["s_t5_24"]
    return r


def _ours_vae(folder: Path, z: np.ndarray, args) -> tuple[dict, np.ndarray]:
    dtype = mlx_dtype(args.dtype)
    vae = load_vae(folder, dtype)
    mx.eval(vae.parameters())
    zm = mx.array(z)
    out: list = []

    def decode():  # as the pipeline's step 5
        out.append(decode_latents(vae, zm, dtype))
        mx.eval(out[-1])

    return mlx_once(decode, _once_runs(args), LONG_S, [vae]), np.array(out[-1])


def bench_vae(folder: Path, size: int, args, torch_run: TorchRunner | None, device: str, full_size: bool) -> dict:
    z = np.random.default_rng(args.seed).standard_normal((1, size // 8, size // 8, 16), dtype=np.float32)
    ours, img = _ours_vae(folder, z, args)
    _free()
    r = {"full_size": full_size, "size": size, "ours": ours}
    if torch_run is not None:
        d, ref_img = torch_run(torch_side.decode_vae, str(folder), z, args.dtype, device, _once_runs(args), LONG_S)
        r["diffusers"] = d
        r["ratio"] = ours["s"] / d["s"]
        r["max_abs_err_over_std"] = _err(img, ref_img)
    return r


# ---------------------------------------------------------------------------------------------


def _meta(args, torch_info: dict) -> dict:
    from benchmarks.fixtures import medium_dual_layers

    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_device": str(mx.default_device()),
        "openblas": loaded_openblas,
        "openblas_env": env,
        **torch_info,
        "dtype": args.dtype,
        "depth": args.depth,
        "dual_attention_layers": list(medium_dual_layers(args.depth)),
        "sizes": args.sizes,
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _guarded(fn, *args) -> dict:
    """A failing later section is reported, not allowed to discard the transformer's minutes of results."""
    try:
        return fn(*args)
    except Exception as e:
        log(f"{fn.__name__} failed: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(
        __doc__,
        json=Path(__file__).parent / "results" / "speed.json",
        dtype="float32",
        repeats=1,
        quick="toy run: depth 1, 256 px, tiny text encoders and VAE",
    )
    p.add_argument("--depth", type=int, default=None, help="transformer blocks built (default 3; --quick: 1)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes in px (default 512 1024)")
    p.add_argument("--ctx-len", type=int, default=333, help="context tokens: 77 CLIP + 256 T5 (default 333)")
    p.add_argument("--vae-size", type=int, default=None, help="VAE decode px (default 1024; 512 on a CPU device)")
    p.add_argument("--t5-layers", type=int, default=2, help="T5-XXL layers built (default 2; 24 extrapolated)")
    p.add_argument("--skip-diffusers", action="store_true", help="time ours only")
    p.add_argument("--skip-text", action="store_true", help="no prompt-encoding benchmark")
    p.add_argument("--skip-vae", action="store_true", help="no VAE benchmark")
    p.add_argument("--torch-device", default="auto", help="diffusers device: auto (cuda, mps, cpu) or a name")
    p.add_argument(
        "--torch-in-process",
        action="store_true",
        help="run diffusers in this process (faster start; on Linux CPU its attention is then slowed by our OpenBLAS)",
    )
    p.add_argument("--seed", type=int, default=0, help="weights and inputs (default 0)")
    p.add_argument("--cache", type=Path, default=None, help="build the random weights here once and reuse them")
    args = p.parse_args(argv)
    args.depth = args.depth or (1 if args.quick else 3)
    args.sizes = args.sizes or ([256] if args.quick else [512, 1024])
    if args.vae_size is None:
        args.vae_size = 256 if args.quick else (512 if mx.default_device() == mx.cpu else 1024)
    return args


def _cached(path: Path, build) -> Path:
    """The folder build(path) writes, built once (under --cache, reused by later runs)."""
    if not build_once(path, build):
        log(f"reusing {path}")
    return path


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from benchmarks.fixtures import build_medium_transformer, build_text
    from scripts.build_fixture import build_vae

    torch_run = None if args.skip_diffusers else TorchRunner(isolate=not args.torch_in_process)
    try:
        info = torch_run(torch_side.process_info, args.torch_device) if torch_run else {}
        device = info.get("torch_device", "cpu")
        results: dict = {"meta": _meta(args, info)}
        if results["meta"]["openblas_env"]:
            log("note: benchmark with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE` (OpenBLAS kernel choice)")
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            log(f"building a full-width transformer, depth {args.depth}")
            root = args.cache or tmp
            name = f"transformer-d{args.depth}-s{args.seed}"
            folder = _cached(root / name, lambda d: build_medium_transformer(d, args.depth, args.seed))
            results["transformer"] = bench_transformer(folder, args.sizes, args, torch_run, device)
            _free()
            if args.quick and not (args.skip_text and args.skip_vae):
                from scripts.build_fixture import build_tiny_pipeline

                log("building the tiny fixture pipeline")
                text = build_tiny_pipeline(tmp / "pipe", seed=args.seed)
                vae_folder = text / "vae"
            else:
                if not args.skip_text:
                    log(f"building full-width text encoders (T5 with {args.t5_layers} layers)")
                    name = f"text-t5x{args.t5_layers}-s{args.seed}"
                    text = _cached(root / name, lambda d: build_text(d, args.t5_layers, seed=args.seed))
                if not args.skip_vae:
                    vae_folder = _cached(root / f"vae-s{args.seed}", lambda d: build_vae(d, seed=args.seed))
            if not args.skip_text:
                log("prompt encoding")
                results["text"] = _guarded(bench_text, text, args, torch_run, device, not args.quick)
            if not args.skip_vae:
                log(f"VAE decode {args.vae_size}x{args.vae_size}")
                results["vae"] = _guarded(bench_vae, vae_folder, args.vae_size, args, torch_run, device, not args.quick)
    finally:
        if torch_run is not None:
            torch_run.close()
    print_report(results)
    write_json(args.json, results)
    log(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
