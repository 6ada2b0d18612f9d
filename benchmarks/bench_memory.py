"""Memory of SD3.5 Medium in MLX: peak memory per stage at 1024 x 1024.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_memory.py     # ~12 min, 2-core CPU
    python benchmarks/bench_memory.py --quick                                          # toy sizes, ~30 s

Each measurement runs in a process of its own (--parallel at a time); memory_report.py derives the
full-size stage peaks and the verdict from them. Method and figures: benchmarks/README.md. GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Run as a file, the script's own folder heads sys.path, where sibling modules would shadow installed
# packages of the same name: put the repository root there instead.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

import sd35m_mlx  # noqa: E402,F401  (loads OpenBLAS before mlx on Linux)

# isort: split
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from benchmarks.measure import (  # noqa: E402
    MLXPeak,
    build_once,
    machine,
    mlx_dtype,
    mlx_param_bytes,
    parser,
    write_json,
)
from benchmarks.memory_report import (  # noqa: E402
    CLIP_TOKENS,
    GB,
    derive_results,
    modulation_bytes,
    print_report,
)

PROMPT = "a photo of a cat sitting on a wooden table next to a window with soft morning light"


# ---------------------------------------------------------------------------------------------
# Probes (worker side)


def install_fused_attention_emulation(chunk: int) -> None:
    """Make `mx.fast.scaled_dot_product_attention` hold at most `chunk` query rows of scores at a time
    (exact: softmax is per query row), as Metal's fused kernel holds none. Each chunk is evaluated
    before the next: chunks built into one lazy graph are scheduled together and hold all their scores
    at once (measured: more memory than no chunking)."""
    original = mx.fast.scaled_dot_product_attention

    def sdpa(q, k, v, *, scale, mask=None, **kwargs):
        n = q.shape[2]
        if n <= chunk or mask is not None or kwargs:
            return original(q, k, v, scale=scale, mask=mask, **kwargs)
        outs = []
        for i in range(0, n, chunk):
            o = original(q[:, :, i : i + chunk], k, v, scale=scale)
            mx.eval(o)
            outs.append(o)
        return mx.concatenate(outs, axis=2)

    mx.fast.scaled_dot_product_attention = sdpa


# ---------------------------------------------------------------------------------------------
# Measurements, one per worker process

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


@case
def text(folder: str, t5_folder: str | None, dtype: str, max_sequence_length: int) -> dict:
    """encode_prompt with CFG (prompt + empty negative), weights evaluated beforehand."""
    from sd35m_mlx.loading.text_encoders import load_t5_encoder, load_text_encoders

    dt = mlx_dtype(dtype)
    enc = load_text_encoders(folder, dt, load_t5=t5_folder is not None)
    if t5_folder is not None:
        enc.text_encoder_3 = load_t5_encoder(t5_folder, dt)  # the folder's own T5 stays unread
    encoders = [m for m in (enc.text_encoder, enc.text_encoder_2, enc.text_encoder_3) if m is not None]
    mx.eval([m.parameters() for m in encoders])
    weights = sum(mlx_param_bytes(m) for m in encoders)
    with MLXPeak(fresh=True) as w:
        out = enc.encode_prompt(PROMPT, max_sequence_length=max_sequence_length, do_classifier_free_guidance=True)
        mx.eval(out)
    outputs = sum(a.nbytes for a in out if a is not None)
    t5_layers = len(enc.text_encoder_3.encoder.block) if enc.text_encoder_3 is not None else 0
    return dict(w.as_dict(), weights=weights, outputs=outputs, t5_layers=t5_layers)


@case
def denoise(folder: str, dtype: str, size: int, attention: str, steps: int, ctx_len: int, chunk: int) -> dict:
    """One guided step as `generate` runs it: GuidedDenoiser (context embedded, adaLN modulations for the
    whole schedule), the low_memory release of the adaLN weights, then one CFG step (batch 2)."""
    from sd35m_mlx.loading.transformer import load_transformer
    from sd35m_mlx.sampling.guidance import GuidanceConfig, GuidedDenoiser
    from sd35m_mlx.sampling.schedule import FlowMatchSchedule

    if attention == "fused" and mx.default_device() == mx.cpu:  # a GPU runs the real fused kernel
        install_fused_attention_emulation(chunk)
    dt = mlx_dtype(dtype)
    model = load_transformer(folder, dt)
    mx.eval(model.parameters())
    cfg = model.config
    weights = mlx_param_bytes(model)
    modulation_weights = modulation_bytes(model)
    keys = mx.random.split(mx.random.key(0), 3)
    context = mx.random.normal((2, ctx_len, cfg.joint_attention_dim), key=keys[0]).astype(dt)
    pooled = mx.random.normal((2, cfg.pooled_projection_dim), key=keys[1]).astype(dt)
    x = mx.random.normal((1, size // 8, size // 8, cfg.in_channels), key=keys[2])
    mx.eval(context, pooled, x)
    timesteps = FlowMatchSchedule().timesteps(steps)
    with MLXPeak(fresh=True) as wi:
        den = GuidedDenoiser(model, context, pooled, timesteps, GuidanceConfig(scale=4.5), 0, dt)
    kept = sum(a.nbytes for _, a in tree_flatten(den.modulations)) + den.context.nbytes
    released = model.release_modulation_weights() if hasattr(model, "release_modulation_weights") else 0
    with MLXPeak(fresh=True) as ws:
        v = den(0, x)
        mx.eval(v)
    return dict(
        depth=cfg.num_layers,
        weights=weights,
        modulation_weights=modulation_weights,
        released=released,
        init=wi.as_dict(),
        modulations_and_context=kept,
        init_transient=wi.work - kept,
        step=ws.as_dict(),
    )


def _decode_case(folder: str, dtype: str, size: int, decode) -> dict:
    """Load the VAE, then measure `decode(model)`'s decode as `generate` runs it (images.decode_latents)."""
    from sd35m_mlx.images import decode_latents
    from sd35m_mlx.loading.vae import load_vae

    dt = mlx_dtype(dtype)
    model = load_vae(folder, dt)
    mx.eval(model.parameters())
    z = mx.random.normal((1, size // 8, size // 8, model.config.latent_channels), key=mx.random.key(0))
    mx.eval(z)
    with MLXPeak(fresh=True) as w:
        img = decode_latents(model, z, dt, decode(model))
        mx.eval(img)
    return dict(w.as_dict(), weights=mlx_param_bytes(model), output=img.nbytes)


@case
def vae(folder: str, dtype: str, size: int) -> dict:
    """The decode of `generate`: unscale, decode stage by stage, clip to [0, 1] in float32; batch 1."""
    return _decode_case(folder, dtype, size, lambda model: model.decode)


@case
def vae_tiled(folder: str, dtype: str, size: int) -> dict:
    """The decode `generate` runs in low_memory: tiled (512 px tiles, 25% overlap, shared statistics)."""
    from sd35m_mlx.models.vae_tiling import decode_tiled

    return _decode_case(folder, dtype, size, lambda model: lambda z: decode_tiled(model, z, 64, 16))


@case
def qcheck(rows: int, dims: tuple[int, int], group_size: int) -> dict:
    """Work of one Linear call in bfloat16 vs the same layer quantized (T5's FFN shape)."""
    lin = nn.Linear(*dims)
    lin.set_dtype(mx.bfloat16)
    mx.eval(lin.parameters())
    x = mx.random.normal((rows, dims[0]), key=mx.random.key(0)).astype(mx.bfloat16)
    mx.eval(x)
    out = {"output_bytes": rows * dims[1] * 2}
    for name, layer in [("bfloat16", lin)] + [
        (f"{b} bit", nn.QuantizedLinear.from_linear(lin, group_size, b)) for b in (8, 4)
    ]:
        mx.eval(layer.parameters())
        with MLXPeak(fresh=True) as w:
            mx.eval(layer(x))
        out[name] = w.work
    return out


def worker_main(spec: str, out: str) -> None:
    job = json.loads(spec)
    result = CASES[job["case"]](**job["args"])
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    result["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    Path(out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Orchestration


@dataclass
class Job:
    name: str
    case: str
    args: dict
    mem_gb: float  # rough peak RSS, to keep parallel jobs within --mem-budget-gb
    est_s: float  # rough duration on a 2-core CPU, longest first
    result: dict | None = None
    error: str | None = None


def run_jobs(jobs: list[Job], parallel: int, mem_budget_gb: float, tmp: Path) -> None:
    pending = sorted(jobs, key=lambda j: -j.est_s)
    running: dict[str, tuple[Job, subprocess.Popen, Path, float]] = {}
    t_start = time.perf_counter()
    while pending or running:
        for job in list(pending):
            used = sum(j.mem_gb for j, *_ in running.values())
            if len(running) >= parallel or (running and used + job.mem_gb > mem_budget_gb):
                continue
            out, log = tmp / f"{job.name}.json", tmp / f"{job.name}.log"
            spec = json.dumps({"case": job.case, "args": job.args})
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", spec, "--worker-out", str(out)]
            with open(log, "w") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
            running[job.name] = (job, proc, out, time.perf_counter())
            pending.remove(job)
        for name, (job, proc, out, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            log = (tmp / f"{name}.log").read_text(errors="replace")
            if proc.returncode == 0 and out.exists():
                job.result = json.loads(out.read_text())
                job.result["wall_s"] = time.perf_counter() - t0
            else:
                job.error = f"exit {proc.returncode}: " + log[-2000:]
            status = "ok" if job.error is None else "FAILED"
            elapsed = time.perf_counter() - t_start
            print(f"#  [{elapsed:6.0f}s] {name:32s} {status} in {time.perf_counter() - t0:.0f}s", flush=True)
            if job.error:
                print(job.error, flush=True)
        time.sleep(0.2)


def build_fixtures(root: Path, args) -> dict[str, Path]:
    import torch

    from benchmarks import fixtures as mf
    from scripts.build_fixture import build_full_width_transformer, build_t5

    sizes = mf.TOY if args.quick else mf.FULL

    def transformer(path, depth):
        return build_full_width_transformer(path, depth=depth, width=sizes.transformer, dtype=torch.float32)

    d_lo, t_lo, t_hi = min(args.depths), *args.t5_layers
    wanted = {
        "pipeline": lambda p: mf.build_pipeline(p, depth=d_lo, t5_layers=t_hi, sizes=sizes),
        f"t5_l{t_lo}": lambda p: build_t5(p, t_lo, sizes=sizes.t5),
    }
    for d in set(args.depths) - {d_lo}:
        wanted[f"transformer_d{d}"] = lambda p, d=d: transformer(p, d)
    folders = {}
    for name, build in wanted.items():
        path = root / name
        t0 = time.perf_counter()
        if build_once(path, build):
            gb = sum(p.stat().st_size for p in path.rglob("*.safetensors")) / GB
            print(f"#  built {name} ({gb:.2f} GB) in {time.perf_counter() - t0:.0f}s", flush=True)
        folders[name] = path
    folders[f"transformer_d{d_lo}"] = folders["pipeline"] / "transformer"
    folders[f"t5_l{t_hi}"] = folders["pipeline"] / "text_encoder_3"
    return folders


def make_jobs(f: dict[str, Path], args) -> list[Job]:
    q = 0.05 if args.quick else 1.0  # scale of the rough memory and time estimates
    jobs: list[Job] = []

    def add(name: str, case: str, mem_gb: float, est_s: float, **case_args) -> None:
        jobs.append(Job(name, case, case_args, mem_gb * q, est_s * q))

    pipe, gs = str(f["pipeline"]), args.group_size
    if "denoise" in args.sections:
        add("qcheck", "qcheck", 1 / q, 10, rows=16, dims=(4096, 10240), group_size=gs)
    if "text" in args.sections:
        t_lo, tokens = min(args.t5_layers), args.t5_tokens
        for n in args.t5_layers:
            add(f"text f32 t5 l{n}", "text", 6, 20, folder=pipe, t5_folder=str(f[f"t5_l{n}"]), dtype="float32",
                max_sequence_length=tokens)  # fmt: skip
        add(f"text bf16 t5 l{t_lo}", "text", 4, 90, folder=pipe, t5_folder=str(f[f"t5_l{t_lo}"]), dtype="bfloat16",
            max_sequence_length=tokens)  # fmt: skip
        add("text bf16 no t5", "text", 3, 45, folder=pipe, t5_folder=None, dtype="bfloat16", max_sequence_length=tokens)
    if "denoise" in args.sections:
        per_block = (args.size / 1024) ** 2
        mem = max(per_block, 0.3)
        d1 = min(args.depths)

        def denoise(d: int, dtype: str, attention: str, mem_gb: float, est_s: float) -> None:
            add(f"denoise {dtype} {attention} d{d}", "denoise", mem_gb * mem, est_s * per_block,
                folder=str(f[f"transformer_d{d}"]), dtype={"f32": "float32", "bf16": "bfloat16"}[dtype],
                attention=attention, size=args.size, steps=args.steps, ctx_len=CLIP_TOKENS + args.t5_tokens,
                chunk=args.chunk)  # fmt: skip

        for d in sorted(set(args.depths)):
            denoise(d, "f32", "fused", 3 + 0.7 * d, 45 * d)
        if not args.no_cpu_attention:
            denoise(d1, "f32", "cpu", 10, 45)
        if not args.skip_bf16_step:
            denoise(d1, "bf16", "fused", 3, 220)
        if not (args.skip_cpu_bf16 or args.skip_bf16_step or args.no_cpu_attention):
            denoise(d1, "bf16", "cpu", 5.5, 220)
    if "vae" in args.sections:
        area = (args.vae_size / 1024) ** 2
        vae = dict(folder=str(f["pipeline"] / "vae"), dtype="bfloat16", size=args.vae_size)
        add("vae bf16", "vae", 6.5 * area, 240 * area, **vae)
        add("vae tiled bf16", "vae_tiled", 2, 480 * area, **vae)
    return jobs


def parse_args(argv=None):
    p = parser(
        __doc__,
        json=ROOT / "benchmarks" / "results" / "memory.json",
        quick="toy widths, 256 px: checks the script in about a minute",
    )
    p.add_argument("--size", type=int, default=None, help="image side for denoising (default 1024; quick 256)")
    p.add_argument("--vae-size", type=int, default=None, help="image side for the VAE decode (default --size)")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2], help="transformer depths of the step check")
    p.add_argument("--t5-layers", type=int, nargs=2, default=[1, 2], help="T5 layers of the text check")
    p.add_argument("--t5-tokens", type=int, default=256, help="T5 tokens (context = 77 + this)")
    p.add_argument("--steps", type=int, default=40, help="schedule length (adaLN modulations precomputed)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--chunk", type=int, default=128, help="query rows per chunk of the fused-attention emulation")
    p.add_argument("--skip-cpu-bf16", action="store_true", help="skip the bfloat16 step with CPU attention (~4 min)")
    p.add_argument(
        "--no-cpu-attention",
        action="store_true",
        help="only the fused-attention (Metal) step: the CPU's materialised scores need 2 x 24 x N^2 x 4 bytes "
        "(53 GB at 2048 px)",
    )
    p.add_argument(
        "--skip-bf16-step",
        action="store_true",
        help="no bfloat16 step (CPU bfloat16 matmul ~6 GFLOP/s): the float32 step's work stands in, an upper bound",
    )
    p.add_argument("--sections", nargs="+", default=["text", "denoise", "vae"], choices=["text", "denoise", "vae"])
    p.add_argument("--parallel", type=int, default=2, help="measurement processes at a time")
    p.add_argument("--mem-budget-gb", type=float, default=14.0, help="rough RSS budget of parallel measurements")
    p.add_argument("--fixtures", type=Path, default=None, help="keep (and reuse) the built weights here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size = args.size or (256 if args.quick else 1024)
    args.vae_size = args.vae_size or args.size
    if args.quick:
        args.depths, args.t5_layers = [1, 2], [1, 2]
    args.t5_layers = sorted(args.t5_layers)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.worker_out)
        return
    t0 = time.perf_counter()
    print(f"# {machine()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    fixtures = args.fixtures or tmp / "fixtures"
    try:
        folders = build_fixtures(fixtures, args)
        jobs = make_jobs(folders, args)
        run_jobs(jobs, args.parallel, args.mem_budget_gb, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = dict(
        platform=platform.platform(),
        mlx=mx.__version__,
        device=str(mx.default_device()),
        sizes="toy (--quick): figures are not SD3.5 Medium's" if args.quick else "full width, reduced depth",
        size=args.size,
        vae_size=args.vae_size,
        ctx_len=CLIP_TOKENS + args.t5_tokens,
        steps=args.steps,
        group_size=args.group_size,
        chunk=args.chunk,
        openblas_env={k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
        seconds=None,
    )
    results = derive_results({j.name: j.result for j in jobs}, args, meta)
    results["errors"] = {j.name: j.error for j in jobs if j.error}
    results["meta"]["seconds"] = time.perf_counter() - t0
    print_report(results)
    print(f"\n# total {results['meta']['seconds']:.0f}s", flush=True)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
