"""Memory of SD3.5 Medium in MLX: streaming load, and peak memory per stage at 1024 x 1024.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_memory.py     # ~12 min, 2-core CPU
    python benchmarks/bench_memory.py --quick                                          # toy sizes, ~30 s

Weights are random, written locally in the real diffusers layout (benchmarks/memory_fixtures.py).
Every measurement runs in a process of its own (up to --parallel at a time): MLX peak =
`mx.get_peak_memory()` after `mx.reset_peak_memory()` (active buffers, not MLX's cache), and the
process's resident-set peak (VmHWM, reset through /proc/self/clear_refs; Linux) for honesty.
GB = 1e9 bytes throughout.

1. Streaming load. Transformer at SD3.5 Medium width with 2 and 4 blocks, T5 at XXL width with 1 and 2
   layers, from float32 files (every tensor cast: the worst case for transient buffers) and from files
   in the published dtypes (bfloat16 MMDiT, float16 T5), loaded as the pipeline loads them (lazy
   `mx.load`, cast, `quantize_model` streaming the quantized layers) to bfloat16 / 8 / 4 bit, the rest
   evaluated by a first forward (as on first use in the pipeline), by one `mx.eval`, or tensor by
   tensor, largest first, before quantizing (a proposed fix). Peak / loaded bytes, per phase; each
   phase's transient (peak above what stays resident) is measured at two depths, extrapolated linearly
   when it grows, and added to the full-size bytes resident after that phase: the full-size ratio.
   Also `StableDiffusion35.from_pretrained(quantize=8, t5_quantize=4, low_memory=True)`: what is
   resident right after loading.
2. Peak per stage (text encoding, denoising, VAE decode) for the full SD3.5 Medium architecture at
   1024 x 1024, batch 2 (CFG), 77 + 256 = 333 context tokens, 40-step schedule. Full depth is far too
   slow on this CPU (bfloat16 matmul ~7 GFLOP/s, quantized ~0.35 GFLOP/s), so:
       stage peak = resident weights (exact bytes of the full-size modules as the pipeline holds them
                    in that stage, quantized per sd35m_mlx.quantize's plan; computed from shapes, nothing
                    allocated) + adaLN modulations for the schedule (exact) + activation work,
   where the activation work (peak above what was allocated before the stage) is measured at full
   width with reduced depth at the real resolution, in bfloat16: one guided transformer step (depth 1;
   that it does not grow with depth is checked in float32 at depths 1 and 2), prompt encoding with
   full CLIP-L/G and T5 at XXL width (1 layer; 1 vs 2 layers checked in float32), VAE decode at 1024.
   Quantized layers produce the same activations as bfloat16 ones; a check measures that a
   QuantizedLinear call allocates no more than a Linear one.
   Attention: MLX on Metal runs `mx.fast.scaled_dot_product_attention` as a fused kernel that never
   holds the (B, heads, N, N) score matrix; MLX's CPU backend materialises it (2 x 24 x 4429^2 scores
   in bfloat16 = 1.9 GB, twice that in float32). The step is measured both ways: "Metal" with the
   kernel emulated by exact query chunks of 128 evaluated one at a time (an upper bound: it still
   holds one chunk's scores, counted in the figure), and "this CPU" as MLX's CPU backend runs it.
   On a GPU the emulation is off and both are the real kernel. The VAE's attention (head width 512)
   has no fused Metal kernel: it materialises its scores on Metal too.
3. Verdict: the quantized staged configuration (T5 4 bit, MMDiT 8 bit, low_memory) under 6 GB at
   every stage, so it fits an 8 GB Mac; and what the low_memory release of the adaLN weights saves.

Not counted in the MLX figures: the Python process itself (interpreter, MLX, tokenizers; its
resident size before loading is printed), and MLX's buffer cache (freed by `mx.clear_cache`, which
low_memory calls between stages; MLX also reuses it instead of allocating more).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
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

from benchmarks.measure import build_once, mlx_param_bytes, reset_rss_peak  # noqa: E402
from sd35m_mlx.quantize import module_at, set_module  # noqa: E402

GB = 1e9
TARGET_GB = 3.5  # issue 16: 1024 px on an 8 GB Mac (was 6 GB)
LOAD_TARGET = 1.15
PROMPT = "a photo of a cat sitting on a wooden table next to a window with soft morning light"
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
CLIP_TOKENS = 77


# ---------------------------------------------------------------------------------------------
# Probes (worker side)


def _proc_status(field_name: str) -> int | None:
    """A size field (VmRSS, VmHWM) of /proc/self/status in bytes; None where there is no /proc (macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Window:
    """MLX peak and process resident-set peak over a `with` block, after freeing MLX's cache."""

    def __enter__(self) -> Window:
        gc.collect()
        mx.clear_cache()
        self.rss_reset = reset_rss_peak()
        self.rss_before = _proc_status("VmRSS")
        self.active_before = mx.get_active_memory()
        mx.reset_peak_memory()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.peak = mx.get_peak_memory()
        self.active_after = mx.get_active_memory()
        self.rss_peak = _proc_status("VmHWM")

    @property
    def work(self) -> int:
        return self.peak - self.active_before

    def as_dict(self) -> dict:
        return dict(
            seconds=self.seconds,
            active_before=self.active_before,
            active_after=self.active_after,
            peak=self.peak,
            work=self.work,
            rss_before=self.rss_before,
            rss_peak=self.rss_peak if self.rss_reset and self.rss_before is not None else None,
        )


def _quantized_bytes(module) -> int:
    return sum(mlx_param_bytes(m) for _, m in module.named_modules() if isinstance(m, nn.QuantizedLinear))


def _folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))


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


EVALUATE_MODES = {
    "first use": "the rest evaluated by a first forward (2 tokens), as the pipeline does",
    "mx.eval": "the rest evaluated at once: mx.eval(model.parameters())",
    "per tensor": "proposed: tensors not quantized evaluated one at a time, largest first, before quantizing",
}


def _tiny_forward(kind: str, model, dt) -> None:
    if kind == "t5":
        mx.eval(model(mx.array([[1, 2]])))
        return
    cfg = model.config
    x = mx.zeros((1, cfg.patch_size, cfg.patch_size, cfg.in_channels), dt)  # one patch, one context token
    ctx = mx.zeros((1, 1, cfg.joint_attention_dim), dt)
    mx.eval(model(x, ctx, mx.zeros((1, cfg.pooled_projection_dim), dt), 500.0))


@case
def load(kind: str, folder: str, dtype: str, bits: int | None, group_size: int, evaluate: str) -> dict:
    """Load lazily (the cast included), quantize as `quantize_model` streams it, then evaluate the rest
    as `evaluate` says (EVALUATE_MODES). Peak and resident bytes are recorded per phase."""
    from sd35m_mlx.loading.text_encoders import load_t5_encoder
    from sd35m_mlx.loading.transformer import load_transformer
    from sd35m_mlx.quantize import quantization_plan, quantize_model

    loader = load_transformer if kind == "transformer" else load_t5_encoder
    dt = DTYPES[dtype]
    phases = []

    def phase(name: str) -> None:  # close a phase: its peak and what stays resident after it
        phases.append(dict(phase=name, peak=mx.get_peak_memory(), end=mx.get_active_memory()))
        mx.reset_peak_memory()

    with Window() as w:
        model = loader(folder, dt)
        if evaluate == "per tensor":
            planned = {f"{p}.weight" for p in (quantization_plan(model, bits, group_size) if bits else {})}
            rest = [v for k, v in tree_flatten(model.parameters()) if k not in planned]
            for v in sorted(rest, key=lambda a: -a.nbytes):
                mx.eval(v)
            phase("not quantized, per tensor")
        if bits:
            quantize_model(model, bits, group_size)
            phase("quantize_model")
        if evaluate == "first use":
            _tiny_forward(kind, model, dt)
        mx.eval(model.parameters())  # a no-op unless something was left unread
        phase("rest")
    loaded = mlx_param_bytes(model)
    peak = max(p["peak"] for p in phases)
    return dict(
        w.as_dict(),
        peak=peak,
        phases=phases,
        loaded=loaded,
        ratio=peak / loaded,
        excess=peak - loaded,
        file_bytes=_folder_bytes(folder),
    )


@case
def pipeline_load(folder: str, quantize: int | None, t5_quantize: int | None, low_memory: bool) -> dict:
    """`from_pretrained` as a user calls it: what is resident after it, then the rest evaluated."""
    from sd35m_mlx.pipeline import StableDiffusion35

    gc.collect()
    rss_process = _proc_status("VmRSS")  # interpreter + MLX + sd35m_mlx, no weights yet
    with Window() as w:
        pipe = StableDiffusion35.from_pretrained(
            folder, "bfloat16", quantize=quantize, t5_quantize=t5_quantize, low_memory=low_memory
        )
    enc = pipe.prompt_encoder  # None in low_memory: the text encoders load for their stage
    modules = dict(
        transformer=pipe.transformer,
        text_encoder=getattr(enc, "text_encoder", None),
        text_encoder_2=getattr(enc, "text_encoder_2", None),
        text_encoder_3=getattr(enc, "text_encoder_3", None),
        vae=pipe.vae,
    )
    quantized = {k: _quantized_bytes(m) for k, m in modules.items() if m is not None}
    after_load = w.as_dict()
    with Window() as w2:
        mx.eval([m.parameters() for m in modules.values() if m is not None])
    loaded = sum(mlx_param_bytes(m) for m in modules.values() if m is not None)
    return dict(
        rss_process_before_load=rss_process,
        after_from_pretrained=after_load,
        resident_after_from_pretrained=after_load["active_after"],
        quantized_layer_bytes=quantized,
        evaluate_rest=w2.as_dict(),
        loaded=loaded,
        ratio=max(w.peak, w2.peak) / loaded,
        low_memory=pipe.low_memory,
    )


@case
def text(folder: str, t5_folder: str | None, dtype: str, max_sequence_length: int) -> dict:
    """encode_prompt with CFG (prompt + empty negative), weights evaluated beforehand."""
    from sd35m_mlx.loading.text_encoders import load_t5_encoder, load_text_encoders

    dt = DTYPES[dtype]
    enc = load_text_encoders(folder, dt, load_t5=t5_folder is not None)
    if t5_folder is not None:
        enc.text_encoder_3 = load_t5_encoder(t5_folder, dt)  # the folder's own T5 stays unread
    encoders = [m for m in (enc.text_encoder, enc.text_encoder_2, enc.text_encoder_3) if m is not None]
    mx.eval([m.parameters() for m in encoders])
    weights = sum(mlx_param_bytes(m) for m in encoders)
    with Window() as w:
        out = enc.encode_prompt(PROMPT, max_sequence_length=max_sequence_length, do_classifier_free_guidance=True)
        mx.eval(out)
    outputs = sum(a.nbytes for a in out if a is not None)
    t5_layers = len(enc.text_encoder_3.encoder.block) if enc.text_encoder_3 is not None else 0
    return dict(w.as_dict(), weights=weights, outputs=outputs, t5_layers=t5_layers)


def _modulation_bytes(model) -> int:
    names = ["time_text_embed", "norm_out"]
    total = sum(mlx_param_bytes(model[n]) for n in names if n in model)
    for block in model.transformer_blocks:
        total += sum(mlx_param_bytes(block[n]) for n in ("norm1", "norm1_context") if n in block)
    return total


@case
def denoise(folder: str, dtype: str, size: int, attention: str, steps: int, ctx_len: int, chunk: int) -> dict:
    """One guided step as `generate` runs it: GuidedDenoiser (context embedded, adaLN modulations for the
    whole schedule), the low_memory release of the adaLN weights, then one CFG step (batch 2)."""
    from sd35m_mlx.loading.transformer import load_transformer
    from sd35m_mlx.sampling.guidance import GuidanceConfig, GuidedDenoiser
    from sd35m_mlx.sampling.schedule import FlowMatchSchedule

    if attention == "fused" and mx.default_device() == mx.cpu:  # a GPU runs the real fused kernel
        install_fused_attention_emulation(chunk)
    dt = DTYPES[dtype]
    model = load_transformer(folder, dt)
    mx.eval(model.parameters())
    cfg = model.config
    weights = mlx_param_bytes(model)
    modulation_weights = _modulation_bytes(model)
    keys = mx.random.split(mx.random.key(0), 3)
    context = mx.random.normal((2, ctx_len, cfg.joint_attention_dim), key=keys[0]).astype(dt)
    pooled = mx.random.normal((2, cfg.pooled_projection_dim), key=keys[1]).astype(dt)
    x = mx.random.normal((1, size // 8, size // 8, cfg.in_channels), key=keys[2])
    mx.eval(context, pooled, x)
    timesteps = FlowMatchSchedule().timesteps(steps)
    with Window() as wi:
        den = GuidedDenoiser(model, context, pooled, timesteps, GuidanceConfig(scale=4.5), 0, dt)
    kept = sum(a.nbytes for _, a in tree_flatten(den.modulations)) + den.context.nbytes
    released = model.release_modulation_weights() if hasattr(model, "release_modulation_weights") else 0
    with Window() as ws:
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
    """Load the VAE, then measure `decode(model, unscaled z)` as `generate` runs it: clip to [0, 1] in float32."""
    from sd35m_mlx.loading.vae import load_vae

    dt = DTYPES[dtype]
    model = load_vae(folder, dt)
    mx.eval(model.parameters())
    z = mx.random.normal((1, size // 8, size // 8, model.config.latent_channels), key=mx.random.key(0))
    mx.eval(z)
    with Window() as w:
        img = decode(model, model.unscale_latents(z).astype(dt))
        img = mx.clip(img.astype(mx.float32) / 2 + 0.5, 0.0, 1.0)
        mx.eval(img)
    return dict(w.as_dict(), weights=mlx_param_bytes(model), output=img.nbytes)


@case
def vae(folder: str, dtype: str, size: int) -> dict:
    """The decode of `generate`: unscale, decode stage by stage, clip to [0, 1] in float32; batch 1."""
    return _decode_case(folder, dtype, size, lambda model, z: model.decode(z))


@case
def vae_tiled(folder: str, dtype: str, size: int) -> dict:
    """The decode `generate` runs in low_memory: tiled (512 px tiles, 25% overlap, shared statistics)."""
    from sd35m_mlx.models.vae_tiling import decode_tiled

    return _decode_case(folder, dtype, size, lambda model, z: decode_tiled(model, z, 64, 16))


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
        with Window() as w:
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
    log: list[str] = field(default_factory=list)


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

    from benchmarks import memory_fixtures as mf

    sizes = mf.TOY if args.quick else mf.FULL
    d_lo, d_hi = args.load_depths
    t_lo, t_hi = args.t5_layers
    depth_check = sorted(set(args.depths))
    wanted = {
        "pipeline": lambda p: mf.build_pipeline(p, depth=d_lo, t5_layers=t_hi, sizes=sizes),
        f"transformer_d{d_hi}": lambda p: mf.build_transformer(p, d_hi, sizes=sizes),
        f"t5_l{t_lo}": lambda p: mf.build_t5(p, t_lo, sizes=sizes),
    }
    for d in depth_check:
        if d != d_lo and d != d_hi:
            wanted[f"transformer_d{d}"] = lambda p, d=d: mf.build_transformer(p, d, sizes=sizes)
    if "load" in args.sections:  # the dtypes of the published checkpoint: no cast for the transformer
        for d in args.load_depths:
            wanted[f"transformer_d{d}_bf16"] = lambda p, d=d: mf.build_transformer(
                p, d, sizes=sizes, dtype=torch.bfloat16
            )
        for n in args.t5_layers:
            wanted[f"t5_l{n}_f16"] = lambda p, n=n: mf.build_t5(p, n, sizes=sizes, dtype=torch.float16)
    folders = {}
    for name, build in wanted.items():
        path = root / name
        t0 = time.perf_counter()
        if build_once(path, build):
            print(f"#  built {name} ({_folder_bytes(path) / GB:.2f} GB) in {time.perf_counter() - t0:.0f}s", flush=True)
        folders[name] = path
    folders[f"transformer_d{d_lo}"] = folders["pipeline"] / "transformer"
    folders[f"t5_l{t_hi}"] = folders["pipeline"] / "text_encoder_3"
    return folders


REAL_FILE = {"transformer": "bf16", "t5": "f16"}  # how the published checkpoint stores them


def load_job_name(kind: str, unit: str, n: int, file: str, bits: int | None, mode: str) -> str:
    return f"load {kind} {unit}{n} {file} file -> {bits or 16} bit, {mode}"


def make_jobs(f: dict[str, Path], args) -> list[Job]:
    q = 0.05 if args.quick else 1.0  # scale of the rough memory and time estimates
    gs = args.group_size
    jobs: list[Job] = []
    if "load" in args.sections:
        for kind, unit, sizes in (("transformer", "d", args.load_depths), ("t5", "l", args.t5_layers)):
            for file in ("f32", REAL_FILE[kind]):
                modes = ("first use", "mx.eval", "per tensor") if file == "f32" else ("first use", "per tensor")
                for n, bits, mode in itertools.product(sizes, (None, 8, 4), modes):
                    if mode == "per tensor" and n != sizes[-1]:
                        continue  # one tensor's transient by construction: the larger size is enough
                    folder = f[f"{kind}_{unit}{n}" + ("" if file == "f32" else f"_{file}")]
                    jobs.append(
                        Job(load_job_name(kind, unit, n, file, bits, mode), "load",
                            dict(kind=kind, folder=str(folder), dtype="bfloat16", bits=bits, group_size=gs,
                                 evaluate=mode), mem_gb=4 * q, est_s=(25 if bits and mode == "first use" else 8) * q)
                    )  # fmt: skip
        jobs.append(
            Job("pipeline load q8 t5q4 staged", "pipeline_load",
                dict(folder=str(f["pipeline"]), quantize=8, t5_quantize=4, low_memory=True), mem_gb=6 * q, est_s=40 * q)
        )  # fmt: skip
        jobs.append(  # float32 files cast to bfloat16 by from_pretrained itself (every tensor cast, nothing quantized)
            Job("pipeline load bf16", "pipeline_load",
                dict(folder=str(f["pipeline"]), quantize=None, t5_quantize=None, low_memory=False),
                mem_gb=8 * q, est_s=40 * q)
        )  # fmt: skip
        jobs.append(Job("qcheck", "qcheck", dict(rows=16, dims=(4096, 10240), group_size=gs), mem_gb=1, est_s=10 * q))
    if "text" in args.sections:
        t_lo = min(args.t5_layers)
        for n in args.t5_layers:
            jobs.append(
                Job(f"text f32 t5 l{n}", "text",
                    dict(folder=str(f["pipeline"]), t5_folder=str(f[f"t5_l{n}"]), dtype="float32",
                         max_sequence_length=args.t5_tokens), mem_gb=6 * q, est_s=20 * q)
            )  # fmt: skip
        jobs.append(
            Job(f"text bf16 t5 l{t_lo}", "text",
                dict(folder=str(f["pipeline"]), t5_folder=str(f[f"t5_l{t_lo}"]), dtype="bfloat16",
                     max_sequence_length=args.t5_tokens), mem_gb=4 * q, est_s=90 * q)
        )  # fmt: skip
        jobs.append(
            Job("text bf16 no t5", "text",
                dict(folder=str(f["pipeline"]), t5_folder=None, dtype="bfloat16", max_sequence_length=args.t5_tokens),
                mem_gb=3 * q, est_s=45 * q)
        )  # fmt: skip
    if "denoise" in args.sections:
        common = dict(size=args.size, steps=args.steps, ctx_len=CLIP_TOKENS + args.t5_tokens, chunk=args.chunk)
        per_block = (args.size / 1024) ** 2
        for d in sorted(set(args.depths)):
            jobs.append(
                Job(f"denoise f32 fused d{d}", "denoise",
                    dict(common, folder=str(f[f"transformer_d{d}"]), dtype="float32", attention="fused"),
                    mem_gb=(3 + 0.7 * d) * q * max(per_block, 0.3), est_s=45 * d * per_block * q)
            )  # fmt: skip
        d1 = min(args.depths)
        if not args.no_cpu_attention:
            jobs.append(
                Job(f"denoise f32 cpu d{d1}", "denoise",
                    dict(common, folder=str(f[f"transformer_d{d1}"]), dtype="float32", attention="cpu"),
                    mem_gb=10 * q * max(per_block, 0.3), est_s=45 * per_block * q)
            )  # fmt: skip
        if not args.skip_bf16_step:
            jobs.append(
                Job(f"denoise bf16 fused d{d1}", "denoise",
                    dict(common, folder=str(f[f"transformer_d{d1}"]), dtype="bfloat16", attention="fused"),
                    mem_gb=3 * q * max(per_block, 0.3), est_s=220 * per_block * q)
            )  # fmt: skip
        if not (args.skip_cpu_bf16 or args.skip_bf16_step or args.no_cpu_attention):
            jobs.append(
                Job(f"denoise bf16 cpu d{d1}", "denoise",
                    dict(common, folder=str(f[f"transformer_d{d1}"]), dtype="bfloat16", attention="cpu"),
                    mem_gb=5.5 * q * max(per_block, 0.3), est_s=220 * per_block * q)
            )  # fmt: skip
    if "vae" in args.sections:
        jobs.append(
            Job("vae bf16", "vae", dict(folder=str(f["pipeline"] / "vae"), dtype="bfloat16", size=args.vae_size),
                mem_gb=6.5 * q * (args.vae_size / 1024) ** 2, est_s=240 * q * (args.vae_size / 1024) ** 2)
        )  # fmt: skip
        jobs.append(
            Job("vae tiled bf16", "vae_tiled",
                dict(folder=str(f["pipeline"] / "vae"), dtype="bfloat16", size=args.vae_size),
                mem_gb=2 * q, est_s=480 * q * (args.vae_size / 1024) ** 2)
        )  # fmt: skip
    return jobs


# ---------------------------------------------------------------------------------------------
# Full-size accounting (main process; lazy modules: shapes only, nothing is allocated)


def lazy_quantize(model, bits: int | None, group_size: int):
    """What `quantize_model` makes of `model` (same plan and layers), without evaluating anything."""
    from sd35m_mlx.quantize import quantization_plan

    if bits:
        for path, b in quantization_plan(model, bits, group_size).items():
            set_module(model, path, nn.QuantizedLinear.from_linear(module_at(model, path), group_size, b))
    return model


def full_size_accounting(group_size: int, steps: int, batch: int = 2, ctx_len: int = 333, size: int = 1024) -> dict:
    from sd35m_mlx.models.clip import CLIPTextConfig, CLIPTextModel
    from sd35m_mlx.models.mmdit import MMDiTConfig, SD3Transformer2DModel
    from sd35m_mlx.models.t5 import T5Config, T5EncoderModel
    from sd35m_mlx.models.vae import AutoencoderKL, VAEConfig

    def bf16(model):
        model.set_dtype(mx.bfloat16)
        return model

    out: dict = {"transformer": {}, "t5": {}}
    for variant, bits in (("bf16", None), ("q8", 8), ("q4", 4)):
        tr = lazy_quantize(bf16(SD3Transformer2DModel(MMDiTConfig())), bits, group_size)
        out["transformer"][variant] = dict(
            total=mlx_param_bytes(tr),
            modulation_weights=_modulation_bytes(tr),
            quantized_layers=_quantized_bytes(tr),
            pos_embed=tr.pos_embed.pos_embed.size * 2,
        )
        t5 = lazy_quantize(bf16(T5EncoderModel(T5Config())), bits, group_size)
        out["t5"][variant] = dict(total=mlx_param_bytes(t5), quantized_layers=_quantized_bytes(t5))
    clip_g = CLIPTextConfig(
        hidden_size=1280,
        intermediate_size=5120,
        projection_dim=1280,
        num_hidden_layers=32,
        num_attention_heads=20,
        hidden_act="gelu",
    )
    out["clip_l"] = mlx_param_bytes(bf16(CLIPTextModel(CLIPTextConfig())))
    out["clip_g"] = mlx_param_bytes(bf16(CLIPTextModel(clip_g)))
    out["vae"] = mlx_param_bytes(bf16(AutoencoderKL(VAEConfig())))
    # adaLN outputs for the whole schedule (GuidedDenoiser keeps them), bfloat16, and the embedded context
    tr = SD3Transformer2DModel(MMDiTConfig())
    chunks = sum(b.norm1.num_chunks + b.norm1_context.num_chunks for b in tr.transformer_blocks)
    chunks += tr.norm_out.num_chunks
    dim = tr.config.hidden_size
    out["modulations"] = chunks * dim * batch * steps * 2
    # prompt embeddings (cond + uncond, 333 x 4096), embedded context, pooled, latents, noise, velocity
    lat = size // 8
    out["inputs"] = 2 * ctx_len * 4096 * batch + 2 * ctx_len * dim * batch + 3 * 4 * lat * lat * 16 * batch
    return out


# ---------------------------------------------------------------------------------------------
# Derivation and report


@dataclass(frozen=True)
class Config:
    name: str
    transformer: str  # bf16 | q8 | q4
    t5: str | None  # None: no T5
    staged: bool


CONFIGS = [
    Config("(a) bfloat16", "bf16", "bf16", False),
    Config("(a) bfloat16, staged", "bf16", "bf16", True),
    Config("(b) T5 4 bit + MMDiT 8 bit, staged", "q8", "q4", True),
    Config("(b) T5 4 bit + MMDiT 8 bit, not staged", "q8", "q4", False),
    Config("(c) no T5", "bf16", None, False),
    Config("(c) no T5, staged", "bf16", None, True),
]


def _r(jobs: dict[str, Job], name: str) -> dict | None:
    job = jobs.get(name)
    return job.result if job is not None else None


def activations(jobs: dict[str, Job], args) -> dict:
    """The measured activation work of each stage (bfloat16), with where each figure comes from."""
    d1 = min(args.depths)
    t_lo = min(args.t5_layers)
    acts: dict = {"sources": {}}

    def pick(key, value, source):
        acts[key] = value
        acts["sources"][key] = source

    r = _r(jobs, f"text bf16 t5 l{t_lo}")
    if r:
        pick("text_t5", r["work"], f"measured: bfloat16, full CLIP-L/G + T5-XXL width {t_lo} layer(s)")
    r = _r(jobs, "text bf16 no t5")
    if r:
        pick("text_no_t5", r["work"], "measured: bfloat16, full CLIP-L/G, T5 zeros")
    for attention, label in (("fused", "Metal"), ("cpu", "CPU")):
        r = _r(jobs, f"denoise bf16 {attention} d{d1}")
        f32 = _r(jobs, f"denoise f32 {attention} d{d1}")
        if r:
            pick(f"step_{label}", r["step"]["work"], f"measured: bfloat16 step, depth {d1}, {attention} attention")
            pick("init_transient", max(r["init_transient"], 0), "measured: bfloat16 GuidedDenoiser set-up")
        elif f32:  # an upper bound: the bfloat16 step measured 0.71x the float32 one at 1440 px, not 0.5x
            pick(f"step_{label}", f32["step"]["work"], f"upper bound: the float32 step, depth {d1}, {attention}")
            acts.setdefault("init_transient", max(f32["init_transient"], 0))
    r = _r(jobs, "vae bf16")
    if r:
        pick("vae", r["work"], f"measured: bfloat16 decode at {args.vae_size} px")
    r = _r(jobs, "vae tiled bf16")
    if r:
        pick("vae_tiled", r["work"], f"measured: bfloat16 tiled decode (512 px tiles) at {args.vae_size} px")
    return acts


def derive(acc: dict, acts: dict, args, transformer_at_load: bool = False) -> list[dict]:
    """Stage peaks of the full-size pipeline per configuration (steady state: a new prompt on a pipeline
    that has generated before, so the VAE weights are resident; low_memory has released the text
    encoders after encoding and the transformer after denoising, and reloads them when needed).
    `transformer_at_load`: from_pretrained(low_memory=True) was measured holding the quantized
    transformer, so the first image's text stage has it beside the text encoders."""
    rows = []
    vae, clip = acc["vae"], acc["clip_l"] + acc["clip_g"]
    mods, inputs = acc["modulations"], acc["inputs"]
    for c in CONFIGS:
        tr = acc["transformer"][c.transformer]
        t5 = acc["t5"][c.t5]["total"] if c.t5 else 0
        everything = tr["total"] + t5 + clip + vae
        text_work = acts.get("text_t5" if c.t5 else "text_no_t5")
        stage_res = {
            # resident weights in the stage, and what they are
            # low_memory runs T5 alone, then both CLIPs, reading each for its turn and releasing it after
            "text": (max(t5, clip) + vae, "T5 or CLIP-L + CLIP-G (one at a time) + VAE")
            if c.staged
            else (everything, "all weights"),
            # GuidedDenoiser set-up: the whole transformer (a quantized reload evaluates every quantized layer)
            "denoise set-up": (tr["total"] + vae, "transformer + VAE") if c.staged else (everything, "all weights"),
            # low_memory drops the adaLN/embedder weights once the modulations are computed
            "denoise step": (tr["total"] - tr["modulation_weights"] + vae, "transformer - adaLN + VAE")
            if c.staged
            else (everything, "all weights"),
            "VAE decode": (vae, "VAE") if c.staged else (everything, "all weights"),
        }
        works = {
            "text": (text_work, text_work),
            "denoise set-up": (acts.get("init_transient"), acts.get("init_transient")),
            "denoise step": (acts.get("step_Metal"), acts.get("step_CPU")),
            # low_memory decodes in tiles (sd35m_mlx/vae_tiling.py)
            "VAE decode": (acts.get("vae_tiled"),) * 2 if c.staged and "vae_tiled" in acts else (acts.get("vae"),) * 2,
        }
        extra = {"text": inputs, "denoise set-up": mods + inputs, "denoise step": mods + inputs, "VAE decode": inputs}
        for stage, (res, what) in stage_res.items():
            metal, cpu = works[stage]
            row = dict(
                config=c.name,
                stage=stage,
                resident=res,
                resident_what=what,
                extra=extra[stage],
                work_metal=metal,
                work_cpu=cpu,
                peak_metal=None if metal is None else res + extra[stage] + metal,
                peak_cpu=None if cpu is None else res + extra[stage] + cpu,
            )
            rows.append(row)
        if transformer_at_load and c.staged and c.transformer != "bf16":
            # first image: from_pretrained quantized (so evaluated) the transformer's layers at load, and they
            # are still resident while the text encoders run; the VAE has not been read yet
            text = rows[-4]
            first = tr["quantized_layers"] - vae
            rows.append(
                dict(
                    text,
                    stage="text, first image",
                    resident=text["resident"] + first,
                    resident_what="text encoders + quantized MMDiT layers (evaluated by from_pretrained)",
                    peak_metal=None if text_work is None else text["peak_metal"] + first,
                    peak_cpu=None if text_work is None else text["peak_cpu"] + first,
                )
            )
    return rows


FULL_DEPTH = {"transformer": 24, "t5": 24}  # SD3.5 Medium blocks, T5-XXL layers


def _phase_end_full(phase: str, mode: str, acc_entry: dict) -> int:
    """Full-size bytes resident at the end of a load phase."""
    total, q = acc_entry["total"], acc_entry["quantized_layers"]
    if phase == "not quantized, per tensor":
        return total - q
    if phase == "quantize_model":
        return total if mode == "per tensor" else q
    return total


def load_report(jobs: dict[str, Job], acc: dict, args) -> list[dict]:
    """Measured load ratios, and the full-size ratio derived phase by phase: the transient of a phase
    (its peak above what stays resident after it) is added to the full-size bytes resident after that
    phase; a transient that grows with depth is extrapolated linearly to 24 blocks/layers."""
    rows = []
    for kind, unit, sizes in (("transformer", "d", args.load_depths), ("t5", "l", args.t5_layers)):
        for file, (variant, bits), mode in itertools.product(
            ("f32", REAL_FILE[kind]), (("bf16", None), ("q8", 8), ("q4", 4)), EVALUATE_MODES
        ):
            measured = [(n, _r(jobs, load_job_name(kind, unit, n, file, bits, mode))) for n in sizes]
            measured = [(n, r) for n, r in measured if r]
            if not measured:
                continue
            full_peak, full_excess, grows_any = 0, 0, False
            for i, ph in enumerate(measured[-1][1]["phases"]):
                transients = [(n, r["phases"][i]["peak"] - r["phases"][i]["end"]) for n, r in measured]
                (n0, e0), (n1, e1) = transients[0], transients[-1]
                grows = n1 > n0 and e1 > 1.05 * e0 + 0.01 * GB
                excess = (
                    e1 + (FULL_DEPTH[kind] - n1) * (e1 - e0) / (n1 - n0) if grows else max(e for _, e in transients)
                )
                end = _phase_end_full(ph["phase"], mode, acc[kind][variant])
                if end + excess > full_peak:
                    full_peak, full_excess, grows_any = end + excess, excess, grows
            full = acc[kind][variant]["total"]
            for n, r in measured:
                rows.append(
                    dict(
                        component=kind,
                        file=file,
                        variant=variant,
                        evaluate=mode,
                        depth=n,
                        loaded=r["loaded"],
                        peak=r["peak"],
                        ratio=r["ratio"],
                        excess=r["excess"],
                        rss_peak=r["rss_peak"],
                        seconds=r["seconds"],
                        full_size=full,
                        full_size_excess=full_peak - full,
                        phase_transient=full_excess,
                        excess_grows=grows_any,
                        full_size_ratio=full_peak / full,
                    )
                )
    return rows


def _gb(x) -> str:
    return "-" if x is None else f"{x / GB:.2f}"


def print_report(results: dict) -> None:
    meta = results["meta"]
    print(f"\n# {meta['platform']} | mlx {meta['mlx']} | {meta['device']} | sizes: {meta['sizes']}")
    load_rows = results["load"]
    if load_rows:
        print("\n## 1. Streaming load (loaded as bfloat16; quantized as quantize_model streams it)\n")
        for mode, what in EVALUATE_MODES.items():
            print(f"- {mode}: {what}")
        print("\n| component (file -> loaded) | rest evaluated | depth/layers | loaded GB | peak/loaded | excess GB | "
              "RSS peak GB | full size: GB, excess GB, peak/loaded |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        groups: dict = {}
        for r in load_rows:
            groups.setdefault((r["component"], r["file"], r["variant"], r["evaluate"]), []).append(r)
        for (component, file, variant, mode), rows in groups.items():
            last = rows[-1]
            ok = "ok" if last["full_size_ratio"] <= LOAD_TARGET else "OVER"
            grows = ", grows: extrapolated" if last["excess_grows"] else ""

            def cells(key, fmt, rows=rows):
                return " / ".join(fmt(r[key]) for r in rows)

            print(
                f"| {component} ({file} -> {variant}) | {mode} | {cells('depth', str)} | {cells('loaded', _gb)} | "
                f"{cells('ratio', lambda x: f'{x:.2f}')} | {cells('excess', _gb)} | {cells('rss_peak', _gb)} | "
                f"{_gb(last['full_size'])}, {_gb(last['full_size_excess'])}{grows}, "
                f"**{last['full_size_ratio']:.2f}** {ok} |"
            )
        p = results["measured"].get("pipeline load q8 t5q4 staged")
        if p:
            q = p["quantized_layer_bytes"]
            print(
                f"\nfrom_pretrained(quantize=8, t5_quantize=4, low_memory=True) at reduced size: resident right "
                f"after loading {_gb(p['resident_after_from_pretrained'])} GB = quantized layers of the transformer "
                f"{_gb(q.get('transformer'))} GB + T5 {_gb(q.get('text_encoder_3'))} GB (evaluated by quantize_model; "
                f"the rest stays lazy); everything evaluated: {_gb(p['loaded'])} GB, peak/loaded {p['ratio']:.3f}. "
                f"Process RSS before loading (interpreter, MLX, sd35m_mlx): {_gb(p['rss_process_before_load'])} GB."
            )
        p = results["measured"].get("pipeline load bf16")
        if p:
            a = p["after_from_pretrained"]
            print(
                f"from_pretrained(float32 files, 'bfloat16') at reduced size (the pipeline fixture: full CLIP-L/G "
                f"and VAE, reduced T5 and MMDiT depth): loaded {_gb(p['loaded'])} GB, "
                f"peak during from_pretrained {_gb(a['peak'])} GB, peak/loaded {p['ratio']:.3f} "
                f"(target {LOAD_TARGET})."
            )
        qc = results["measured"].get("qcheck")
        if qc:
            print(
                f"QuantizedLinear check (16 x 4096 -> 10240, bfloat16 activations): work of one call: Linear "
                f"{qc['bfloat16'] / 1e6:.2f} MB, 8 bit {qc['8 bit'] / 1e6:.2f} MB, 4 bit {qc['4 bit'] / 1e6:.2f} MB "
                f"(output {qc['output_bytes'] / 1e6:.2f} MB)"
            )

    m = results["measured"]
    print("\n## 2a. Activation work measured (peak above what was allocated before; full width)\n")
    print("| measurement | depth/layers | work GB | RSS peak - before GB | weights GB | s |")
    print("|---|---|---|---|---|---|")
    for name, r in m.items():
        if r is None:
            continue
        if name.startswith("denoise"):
            w = r["step"]
            rss = None if w["rss_peak"] is None else w["rss_peak"] - w["rss_before"]
            print(f"| {name} (step) | {r['depth']} | {_gb(w['work'])} | {_gb(rss)} | {_gb(r['weights'])} | "
                  f"{w['seconds']:.0f} |")  # fmt: skip
            adaln = f"{_gb(r['modulation_weights'])} adaLN, {_gb(r['released'])} released"
            print(f"| {name} (set-up: transient) | {r['depth']} | {_gb(r['init_transient'])} | - | {adaln} | "
                  f"{r['init']['seconds']:.1f} |")  # fmt: skip
        elif name.startswith(("text", "vae")):
            rss = None if r["rss_peak"] is None else r["rss_peak"] - r["rss_before"]
            depth = r.get("t5_layers", "-")
            print(f"| {name} | {depth} | {_gb(r['work'])} | {_gb(rss)} | {_gb(r['weights'])} | {r['seconds']:.0f} |")
    for check in results["checks"]:
        print(f"- {check}")

    acc = results["full_size"]
    print("\n## 2b. Full-size weights (bfloat16; quantized per sd35m_mlx.quantize's plan, group size "
          f"{meta['group_size']}), GB\n")  # fmt: skip
    print("| component | bf16 | 8 bit | 4 bit | adaLN + conditioning embedders (bf16 / 8 / 4 bit) |")
    print("|---|---|---|---|---|")
    tr, t5 = acc["transformer"], acc["t5"]
    print(f"| MMDiT | {_gb(tr['bf16']['total'])} | {_gb(tr['q8']['total'])} | {_gb(tr['q4']['total'])} | "
          f"{_gb(tr['bf16']['modulation_weights'])} / {_gb(tr['q8']['modulation_weights'])} / "
          f"{_gb(tr['q4']['modulation_weights'])} |")  # fmt: skip
    print(f"| T5-XXL | {_gb(t5['bf16']['total'])} | {_gb(t5['q8']['total'])} | {_gb(t5['q4']['total'])} | |")
    print(f"| CLIP-L + CLIP-G | {_gb(acc['clip_l'] + acc['clip_g'])} | | | |")
    print(f"| VAE | {_gb(acc['vae'])} | | | |")
    print(f"\nadaLN modulations for {meta['steps']} steps at batch 2: {_gb(acc['modulations'])} GB; "
          f"prompt embeddings, latents and other inputs: {_gb(acc['inputs'])} GB")  # fmt: skip

    print(f"\n## 2c. Peak per stage, full SD3.5 Medium, {meta['size']}x{meta['size']}, batch 2, "
          f"{meta['ctx_len']} tokens (derived: resident + inputs + measured work), GB\n")  # fmt: skip
    print("| configuration | stage | resident weights | what | + inputs, modulations | + work (Metal) | "
          "peak, Metal | peak, this CPU |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in results["stages"]:
        print(f"| {r['config']} | {r['stage']} | {_gb(r['resident'])} | {r['resident_what']} | {_gb(r['extra'])} | "
              f"{_gb(r['work_metal'])} | {_gb(r['peak_metal'])} | {_gb(r['peak_cpu'])} |")  # fmt: skip
    print("\nPeak of each configuration (max over stages):\n")
    for name, v in results["config_peaks"].items():
        print(f"- {name}: Metal {_gb(v['metal'])} GB, this CPU {_gb(v['cpu'])} GB")

    print("\n## 3. Verdict\n")
    for line in results["verdict"]:
        print(f"- {line}")


def checks_and_verdict(results: dict, jobs: dict[str, Job], args) -> tuple[list[str], list[str]]:
    checks, verdict = [], []
    depths = sorted(set(args.depths))
    works = [(d, _r(jobs, f"denoise f32 fused d{d}")) for d in depths]
    works = [(d, r["step"]["work"]) for d, r in works if r]
    if len(works) > 1:
        (d0, w0), (dn, wn) = works[0], works[-1]
        growth = (wn - w0) / (dn - d0)
        checks.append(
            "depth check (float32 step, fused attention): work "
            + ", ".join(f"depth {d} {_gb(w)} GB" for d, w in works)
            + f"; {growth / GB:+.3f} GB per block -> 24 blocks would add {23 * growth / GB:+.2f} GB "
            + ("(not added: within 5%)" if abs(wn - w0) <= 0.05 * w0 else "(NOT constant: see extrapolation)")
        )
        if abs(wn - w0) > 0.05 * w0:
            results["step_growth_per_block"] = growth
    t = [(n, _r(jobs, f"text f32 t5 l{n}")) for n in sorted(set(args.t5_layers))]
    t = [(n, r["work"]) for n, r in t if r]
    if len(t) > 1:
        layers = ", ".join(f"{n} layer(s) {_gb(w)} GB" for n, w in t)
        checks.append(f"T5 layer check (float32 text encoding): work {layers}")
    for attention in ("cpu", "fused"):
        b, f = _r(jobs, f"denoise bf16 {attention} d{depths[0]}"), _r(jobs, f"denoise f32 {attention} d{depths[0]}")
        if b and f:
            ratio = b["step"]["work"] / f["step"]["work"]
            checks.append(f"bfloat16 / float32 step work ({attention} attention, depth {depths[0]}): {ratio:.3f}")

    peaks = results["config_peaks"]
    b_staged = peaks.get("(b) T5 4 bit + MMDiT 8 bit, staged")
    if b_staged and b_staged["metal"] is not None:
        ok = b_staged["metal"] <= TARGET_GB * GB
        worst = max((r for r in results["stages"] if r["config"].startswith("(b)") and "not staged" not in r["config"]),
                    key=lambda r: r["peak_metal"] or 0)  # fmt: skip
        verdict.append(
            f"Target (quantized staged <= {TARGET_GB:g} GB, Metal): {'HOLDS' if ok else 'MISSED'}: peak "
            f"{_gb(b_staged['metal'])} GB in stage '{worst['stage']}' "
            f"({_gb(worst['resident'])} GB weights: {worst['resident_what']})."
        )
        steady = [r for r in results["stages"] if r["config"] == "(b) T5 4 bit + MMDiT 8 bit, staged"
                  and r["stage"] != "text, first image"]  # fmt: skip
        steady_peak = max(r["peak_metal"] or 0 for r in steady)
        under = "under" if steady_peak < TARGET_GB * GB else "over"
        verdict.append(f"Steady state (first image's text stage aside): {_gb(steady_peak)} GB ({under} the target).")
        first = [r for r in results["stages"] if r["stage"] == "text, first image" and "not staged" not in r["config"]]
        if first:
            q = results["full_size"]["transformer"]["q8"]["quantized_layers"]
            verdict.append(
                f"First image: from_pretrained(quantize=8, t5_quantize=4) evaluates the MMDiT's quantized layers "
                f"({_gb(q)} GB) at load, so they sit beside T5 and CLIP during the first text encoding "
                f"({_gb(first[0]['peak_metal'])} GB). Deferring the transformer's load/quantization to its first "
                f"use when low_memory is on removes them from that stage."
            )
        if b_staged["cpu"] is not None:
            verdict.append(f"On this CPU backend (attention scores materialised): {_gb(b_staged['cpu'])} GB.")
    tr = results["full_size"]["transformer"]
    verdict.append(
        "adaLN + conditioning-embedder weights released by low_memory after the modulations are computed: "
        f"bf16 {_gb(tr['bf16']['modulation_weights'])} GB, MMDiT 8 bit {_gb(tr['q8']['modulation_weights'])} GB, "
        f"4 bit {_gb(tr['q4']['modulation_weights'])} GB (already subtracted in the staged 'denoise step' rows)."
    )
    load = results["load"]
    for file_kind, label in (("f32", "float32 files"), ("real", "files as published (bf16 MMDiT, fp16 T5)")):
        for modes, how in ((("first use", "mx.eval"), "as sd35m_mlx loads today"), (("per tensor",), "per tensor")):
            rows = [r for r in load if r["evaluate"] in modes]
            rows = [r for r in rows if (r["file"] == "f32") == (file_kind == "f32")]
            if not rows:
                continue
            worst = max(rows, key=lambda r: r["full_size_ratio"])
            status = "holds" if worst["full_size_ratio"] <= LOAD_TARGET else "MISSED"
            verdict.append(
                f"Streaming load <= {LOAD_TARGET}x, {label}, {how}: {status}; worst full-size peak/loaded "
                f"{worst['full_size_ratio']:.2f} ({worst['component']} -> {worst['variant']}, rest evaluated by "
                f"'{worst['evaluate']}', excess {_gb(worst['full_size_excess'])} GB)."
            )
    return checks, verdict


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy widths, 256 px: checks the script in about a minute")
    p.add_argument("--size", type=int, default=None, help="image side for denoising (default 1024; quick 256)")
    p.add_argument("--vae-size", type=int, default=None, help="image side for the VAE decode (default --size)")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2], help="transformer depths of the step check")
    p.add_argument("--load-depths", type=int, nargs=2, default=[2, 4], help="transformer depths of the load test")
    p.add_argument("--t5-layers", type=int, nargs=2, default=[1, 2], help="T5 layers (load test, text check)")
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
    p.add_argument("--sections", nargs="+", default=["load", "text", "denoise", "vae"],
                   choices=["load", "text", "denoise", "vae"])  # fmt: skip
    p.add_argument("--parallel", type=int, default=2, help="measurement processes at a time")
    p.add_argument("--mem-budget-gb", type=float, default=14.0, help="rough RSS budget of parallel measurements")
    p.add_argument("--fixtures", type=Path, default=None, help="keep (and reuse) the built weights here")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "memory.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size = args.size or (256 if args.quick else 1024)
    args.vae_size = args.vae_size or args.size
    if args.quick:
        args.depths, args.load_depths, args.t5_layers = [1, 2], [1, 2], [1, 2]
    args.load_depths = sorted(args.load_depths)
    args.t5_layers = sorted(args.t5_layers)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.worker_out)
        return
    t0 = time.perf_counter()
    print(f"# {platform.platform()} mlx {mx.__version__} device {mx.default_device()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    fixtures = args.fixtures or tmp / "fixtures"
    try:
        folders = build_fixtures(fixtures, args)
        jobs = make_jobs(folders, args)
        run_jobs(jobs, args.parallel, args.mem_budget_gb, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    by_name = {j.name: j for j in jobs}
    acc = full_size_accounting(args.group_size, args.steps, ctx_len=CLIP_TOKENS + args.t5_tokens, size=args.size)
    acts = activations(by_name, args)
    # since the lazy-transformer fix, from_pretrained(low_memory=True) reads no transformer weight
    p = _r(by_name, "pipeline load q8 t5q4 staged")
    stages = derive(acc, acts, args, transformer_at_load=bool(p and p["quantized_layer_bytes"].get("transformer")))
    config_peaks = {}
    for c in CONFIGS:
        rows = [r for r in stages if r["config"] == c.name]
        config_peaks[c.name] = {
            k: (None if any(r[f"peak_{k}"] is None for r in rows) else max(r[f"peak_{k}"] for r in rows))
            for k in ("metal", "cpu")
        }
    results = dict(
        meta=dict(
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
        ),
        measured={j.name: j.result for j in jobs},
        errors={j.name: j.error for j in jobs if j.error},
        full_size=acc,
        activations=acts,
        load=load_report(by_name, acc, args),
        stages=stages,
        config_peaks=config_peaks,
    )
    results["checks"], results["verdict"] = checks_and_verdict(results, by_name, args)
    results["meta"]["seconds"] = time.perf_counter() - t0
    print_report(results)
    print(f"\n# total {results['meta']['seconds']:.0f}s", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
