"""`sd35m-mlx doctor --bench`: one row of README's per-chip table, measured on the real model where it is cached.

Why one warm step and not a whole image: a 1024 px image is 40 identical transformer steps plus the text
encoders once and the VAE decode once, so seconds per image = encode + 40 x step + decode, and one warm
step (after a run that compiled the kernels and filled MLX's cache) measures the part that dominates. Each
variant (bfloat16, --quantize 8, --quantize 4) loads, runs 1 step to warm up, then 3 steps whose callback
times split the run: start -> step 1 is the text encoders (and step 1), step 2 -> step 3 one warm step,
step 3 -> return the decode. Peak memory is MLX's own (`mx.get_peak_memory`) over the measured run.

Nothing is downloaded: without the model in the Hugging Face cache this says so and measures nothing.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..defaults import DEFAULT_MODEL
from .environment import GB, _chip, memory_bytes

VARIANTS = (("bf16", None), ("q8", 8), ("q4", 4))
IMAGE_STEPS = 40  # the model card's steps: what "seconds per image" means in the table
SIZE = 1024
HEADER = (
    "| chip | memory | mlx / sd35m-mlx | step bf16 / q8 / q4 (s) | 40-step image bf16 / q8 / q4 (s) | "
    "peak bf16 / q8 / q4 (GB) | text encoders (s) | decode (s) |"
)


@dataclass(frozen=True)
class Timing:
    """One variant's figures, seconds and bytes."""

    step_s: float
    encode_s: float
    decode_s: float
    peak_bytes: int

    def image_s(self, steps: int = IMAGE_STEPS) -> float:
        return self.encode_s + steps * self.step_s + self.decode_s


def cached(model: str = DEFAULT_MODEL) -> bool:
    """The model's files (T5 included) are all in the Hugging Face cache: the bench can run offline."""
    if model == "tiny-random":
        return True
    from huggingface_hub import snapshot_download

    from ..loading.hub import allow_patterns

    try:
        snapshot_download(model, local_files_only=True, allow_patterns=allow_patterns(load_t5=True))
    except Exception:  # not cached, partly cached, or no cache at all: all mean "skip"
        return False
    return True


def measure(pipe, size: int = SIZE, prompt: str = "a lighthouse at dusk, oil painting") -> Timing:
    """Warm up (1 step), then time 3 steps of `pipe` at size x size, split by the step callback."""
    import mlx.core as mx

    kwargs = dict(width=size, height=size, seed=0, guidance_scale=4.5)
    pipe.generate(prompt, num_inference_steps=1, **kwargs)
    marks: list[float] = []
    mx.reset_peak_memory()
    start = time.perf_counter()
    pipe.generate(prompt, num_inference_steps=3, callback=lambda i, n, x: marks.append(time.perf_counter()), **kwargs)
    end = time.perf_counter()
    step = marks[2] - marks[1]
    return Timing(step, max(marks[0] - start - step, 0.0), end - marks[2], mx.get_peak_memory())


def bench(model: str = DEFAULT_MODEL, size: int = SIZE, say: Callable[[str], None] = print) -> dict[str, Timing] | None:
    """Each variant's Timing, or None (said why) where the model is not cached."""
    if not cached(model):
        say(f"bench: {model} is not in the Hugging Face cache; skipped (run a generation once to download it)")
        return None
    import mlx.core as mx

    from ..pipeline import StableDiffusion35

    timings = {}
    for name, quantize in VARIANTS:
        say(f"bench: {name} at {size} px ...")
        pipe = StableDiffusion35.from_pretrained(model, dtype="bfloat16", quantize=quantize)
        timings[name] = measure(pipe, size)
        del pipe
        gc.collect()
        mx.clear_cache()
    return timings


def table_row(timings: dict[str, Timing], memory: int | None = None, chip: str | None = None) -> str:
    """The README table's row for this machine (HEADER's columns)."""
    import mlx.core as mx

    from .. import __version__

    variants = [timings[name] for name, _ in VARIANTS]
    bf16 = timings[VARIANTS[0][0]]

    def joined(values) -> str:
        return " / ".join(values)

    cells = [
        chip or _chip(),
        f"{(memory if memory is not None else memory_bytes()) / GB:.0f} GB",
        f"{mx.__version__} / {__version__}",
        joined(f"{t.step_s:.2f}" for t in variants),
        joined(f"{t.image_s():.0f}" for t in variants),
        joined(f"{t.peak_bytes / GB:.1f}" for t in variants),
        f"{bf16.encode_s:.2f}",
        f"{bf16.decode_s:.2f}",
    ]
    return "| " + " | ".join(cells) + " |"
