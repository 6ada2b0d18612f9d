"""The self-test: the tiny random model (loading/tiny_random.py: MLX only, no torch, no download) through the
paths a Mac app uses: generate on a worker thread on the default device, cancel() from another thread,
a quantized layer, a live preview. Each check is timed and caught: one failure does not hide the next."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from .environment import Check

SIZE, STEPS = 64, 2  # px and steps: seconds on any machine, every stage still runs


def _timed(name: str, check: Callable[[], str]) -> Check:
    t0 = time.perf_counter()
    try:
        detail = check()
    except Exception as e:  # the report names the failure; the next check still runs
        return Check(name, False, f"{type(e).__name__}: {e}".splitlines()[0])
    return Check(name, True, f"{detail} ({time.perf_counter() - t0:.2f} s)")


def _on_worker(fn: Callable[[], object], timeout: float = 300.0):
    """fn() on a new thread, as a GUI app runs generation; its exception re-raised here."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 (handed back to the caller)
            box["error"] = e

    worker = threading.Thread(target=run, name="sd35m-mlx-doctor")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"the worker thread did not finish within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def self_test() -> Iterator[Check]:
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from ..pipeline import GenerationCancelled, StableDiffusion35

    pipe: list = []

    def load() -> str:
        pipe.append(StableDiffusion35.from_pretrained("tiny-random", dtype="float32"))
        return "tiny random model built in memory"

    yield _timed("build", load)
    if not pipe:
        return
    p = pipe[0]

    def generate() -> str:
        out = _on_worker(
            lambda: p.generate(
                "a lighthouse", height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=0, output_type="np"
            )
        )
        if out.shape != (1, SIZE, SIZE, 3) or not np.isfinite(out).all():
            raise RuntimeError(f"bad image: shape {out.shape}, finite {bool(np.isfinite(out).all())}")
        return f"{SIZE}x{SIZE} px, {STEPS} steps on a worker thread, {mx.default_device()}"

    yield _timed("generate", generate)

    def cancel() -> str:
        started = threading.Event()

        def on_step(step, total, latents):
            started.set()

        def run():
            try:
                p.generate("a lighthouse", height=SIZE, width=SIZE, num_inference_steps=1000, seed=0, callback=on_step)
            except GenerationCancelled:
                return "cancelled"
            return "finished"

        result: dict = {}
        worker = threading.Thread(target=lambda: result.setdefault("r", run()))
        worker.start()
        if not started.wait(120):
            raise TimeoutError("no step finished within 120 s")
        p.cancel()
        worker.join(120)
        if result.get("r") != "cancelled":
            raise RuntimeError(f"generate was not cancelled ({result.get('r', 'still running')})")
        p.generate("a lighthouse", height=SIZE, width=SIZE, num_inference_steps=1, seed=0)  # still usable
        return "stopped at a step boundary; the pipeline stays usable"

    yield _timed("cancel", cancel)

    def quantized() -> str:
        layer = nn.Linear(256, 256)
        x = mx.random.normal((4, 256), key=mx.random.key(0))
        q = nn.QuantizedLinear.from_linear(layer, group_size=64, bits=8)
        ref, got = layer(x), q(x)
        err = (mx.abs(got - ref).max() / mx.abs(ref).max()).item()
        if not err < 2e-2:  # 8-bit groups of 64: about 1e-2 of the range at worst
            raise RuntimeError(f"8-bit layer off by {err:.3g} of the output range")
        return f"8-bit layer within {err:.1e} of float32"

    yield _timed("quantize", quantized)

    def preview() -> str:
        frames: list = []
        _on_worker(
            lambda: p.generate(
                "a lighthouse",
                height=SIZE,
                width=SIZE,
                num_inference_steps=STEPS,
                seed=0,
                preview="rgb",
                on_preview=lambda step, total, image: frames.append(image.size),
            )
        )
        if len(frames) != STEPS:
            raise RuntimeError(f"{len(frames)} previews for {STEPS} steps")
        return f"{len(frames)} previews of {frames[-1][0]}x{frames[-1][1]} px"

    yield _timed("preview", preview)
