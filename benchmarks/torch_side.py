"""The diffusers (PyTorch) side of the benchmarks, run in a process of its own (`TorchRunner`): with
the system OpenBLAS that `import sd35m_mlx` loads, PyTorch's CPU attention runs 60x slower
(benchmarks/README.md, "Why diffusers runs in a separate process"). Functions take and return plain data.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from benchmarks.measure import TorchPeak, gib, time_once_or_warm, time_runs

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed, 8k"
GUIDANCE = 4.5
TIMESTEP = 750.0  # sigma 0.75; any value costs the same


def openblas_loaded() -> bool:
    """Whether this process has a system OpenBLAS mapped (numpy's private copy does not count)."""
    try:
        with open("/proc/self/maps") as f:
            return any("libopenblas" in line and "scipy_openblas" not in line for line in f)
    except OSError:
        return False


def process_info(device_name: str) -> dict:
    import torch

    return {
        "torch": torch.__version__,
        "torch_device": resolve_device(device_name),
        "torch_threads": torch.get_num_threads(),
        "torch_process_openblas": openblas_loaded(),
    }


class TorchRunner:
    """Runs `torch_side` functions in one spawned process that never loads the system OpenBLAS
    (see this module's docstring), or in this process with isolate=False (quick checks, tests)."""

    def __init__(self, isolate: bool = True):
        self.isolate = isolate
        self._pool = None

    def __call__(self, fn, *args):
        if not self.isolate:
            return fn(*args)
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            old = os.environ.get("SD35M_MLX_NO_OPENBLAS")
            os.environ["SD35M_MLX_NO_OPENBLAS"] = "1"  # the child re-imports the main script, hence sd35m_mlx
            try:
                self._pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx)
                return self._pool.submit(fn, *args).result()  # the first submit starts the child
            finally:
                if old is None:
                    del os.environ["SD35M_MLX_NO_OPENBLAS"]
                else:
                    os.environ["SD35M_MLX_NO_OPENBLAS"] = old
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


# ---------------------------------------------------------------------------------------------
# Device, memory and profiling


def resolve_device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def torch_sync(device: str) -> Callable[[], None]:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.synchronize
    if device == "mps":
        return torch.mps.synchronize
    return lambda: None


def _paged_in(module):
    """Read every weight once: transformers and diffusers may map safetensors files lazily, and pages
    first touched inside a measured run would count as that run's memory."""
    import torch

    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            t.sum()
    return module


def tensor_bytes(module) -> int:
    """Parameters and buffers (SD3's positional table is a buffer in diffusers)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def block_timer(blocks, device: str) -> tuple[list[float], Callable[[], None]]:
    """Per-block forward seconds of a PyTorch module list, filled on every forward; returns
    (the list, a function removing the hooks)."""
    sync = torch_sync(device)
    times: list[float] = [0.0] * len(blocks)
    starts: dict[int, float] = {}
    handles = []
    for i, block in enumerate(blocks):

        def pre(module, args, kwargs=None, i=i):
            sync()
            starts[i] = time.perf_counter()

        def post(module, args, output, i=i):
            sync()
            times[i] = time.perf_counter() - starts[i]

        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    return times, lambda: [h.remove() for h in handles]


# ---------------------------------------------------------------------------------------------
# The three measurements


def transformer_steps(folder: str, inputs: list, dtype_name: str, device: str, repeats: int) -> list:
    """For each (x NHWC (1, h, w, 16), context (2, L, 4096), pooled (2, 2048)): one guided step as
    StableDiffusion3Pipeline runs it (a forward of [uncond, cond], then CFG), as (result, v NHWC)."""
    import torch
    from diffusers import SD3Transformer2DModel

    tdtype = getattr(torch, dtype_name)
    # explicit .to(dtype): without accelerate installed, diffusers 0.42 loads float32 whatever torch_dtype says
    ref = _paged_in(SD3Transformer2DModel.from_pretrained(folder, torch_dtype=tdtype).to(device, tdtype).eval())
    with torch.inference_mode():
        return [_step(ref, *x, tdtype, device, repeats) for x in inputs]


def _step(ref, x, ctx, pooled, tdtype, device: str, repeats: int) -> tuple[dict, np.ndarray]:
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).repeat(2, 1, 1, 1).to(device, tdtype)
    ct, pt = (torch.from_numpy(a).to(device, tdtype) for a in (ctx, pooled))
    tt = torch.full((2,), TIMESTEP, device=device)
    sync = torch_sync(device)
    outs = []

    def run():
        out = ref(hidden_states=xt, encoder_hidden_states=ct, pooled_projections=pt, timestep=tt, return_dict=False)
        u, c = out[0].chunk(2)
        outs.append(u + GUIDANCE * (c - u))

    block_s, remove = block_timer(ref.transformer_blocks, device)
    run()  # warm-up, also gives per-block times
    remove()
    with TorchPeak(device) as peak:
        times = time_runs(run, repeats, sync)
    result = {
        "step_s": min(times),
        "runs": len(times),
        "blocks_s": list(block_s),
        "work_gib": gib(peak.work),
        "weights_gib": gib(tensor_bytes(ref)),
        "peak_method": peak.method,
    }
    return result, outs[-1].float().cpu().numpy().transpose(0, 2, 3, 1)


def _once(fn, repeats: int, long_s: float, device: str, modules) -> dict:
    """Seconds and work of something done once per image (see time_once_or_warm), and its modules' weights."""
    with TorchPeak(device) as peak:
        s, runs, warm = time_once_or_warm(fn, repeats, long_s, torch_sync(device))
    weights = sum(tensor_bytes(m) for m in modules)
    return dict(s=s, runs=runs, warm=warm, work_gib=gib(peak.work), weights_gib=gib(weights), peak_method=peak.method)


def encode_text(folder: str, ids: np.ndarray, dtype_name: str, device: str, repeats: int, long_s: float):
    """encode_prompt(PROMPT) with the "" negative, and T5 alone on `ids`; (result, prompt_embeds)."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    tdtype = getattr(torch, dtype_name)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, transformer=None, vae=None, torch_dtype=tdtype)
    pipe = pipe.to(device, tdtype)  # explicit dtype: see transformer_steps
    for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        _paged_in(m)
    ids_t = torch.from_numpy(ids).long().to(device)
    sync = torch_sync(device)
    out = []

    def encode():
        out.append(pipe.encode_prompt(PROMPT, None, None, device=device, max_sequence_length=256))

    with torch.inference_mode():
        result = _once(encode, repeats, long_s, device, (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3))
        result["t5_s"] = time_once_or_warm(lambda: pipe.text_encoder_3(ids_t), repeats, long_s, sync)[0]
    return result, out[-1][0].float().cpu().numpy()


def decode_vae(
    folder: str, z: np.ndarray, dtype_name: str, device: str, repeats: int, long_s: float, kind: str = "AutoencoderKL"
):
    """Decode NHWC latents as the pipeline does (unscale, decode, to [0, 1]) with diffusers' `kind` of
    autoencoder; (result, image NHWC)."""
    import diffusers
    import torch

    tdtype = getattr(torch, dtype_name)
    model = getattr(diffusers, kind)
    ref = _paged_in(model.from_pretrained(folder, torch_dtype=tdtype).to(device, tdtype).eval())
    zt = torch.from_numpy(np.ascontiguousarray(z.transpose(0, 3, 1, 2))).to(device, tdtype)
    out = []

    def decode():
        lat = zt / ref.config.scaling_factor + ref.config.shift_factor
        out.append((ref.decode(lat, return_dict=False)[0] / 2 + 0.5).clamp(0, 1))

    with torch.inference_mode():
        result = _once(decode, repeats, long_s, device, (ref,))
    return result, out[-1].float().cpu().numpy().transpose(0, 2, 3, 1)


def decode_tiny(folder: str, z: np.ndarray, dtype_name: str, device: str, repeats: int, long_s: float):
    """decode_vae with diffusers' AutoencoderTiny (TAESD): the SD3 pipeline's decode with vae=AutoencoderTiny."""
    return decode_vae(folder, z, dtype_name, device, repeats, long_s, kind="AutoencoderTiny")
