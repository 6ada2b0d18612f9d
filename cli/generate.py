"""The default command: `sd35m-mlx PROMPT` writes PNGs that carry their own settings."""

from __future__ import annotations

import dataclasses
import secrets
import time
import traceback
import warnings
from pathlib import Path

import click
from click.core import ParameterSource
from PIL import Image

import sd35m_mlx

from . import model as model_io
from .errors import RunError, UsageError, one_line
from .family import apply_family_defaults
from .group import DefaultCommand
from .metadata import png_info, read_settings
from .options import RESTORABLE, generate_options
from .output import check_writable, plan_paths, write_png
from .progress import Reporter, format_seconds, peak_memory
from .settings import MAX_SEED, MAX_SIDE, MIN_SIDE, MULTIPLE, TRAINED_MAX, TRAINED_MIN, Settings, check
from .upscale import second_model_loader, two_pass

VERSION = f"sd35m-mlx {sd35m_mlx.__version__}"


@click.command("generate", cls=DefaultCommand)
@generate_options
@click.version_option(sd35m_mlx.__version__, prog_name="sd35m-mlx")
@click.pass_context
def generate(ctx: click.Context, quiet: bool, verbose: bool, **params) -> None:
    """Generate images from PROMPT with Stable Diffusion 3.5 Medium.

    Each PNG stores its settings (A1111-style `parameters` plus exact JSON), so --from-image can
    re-run it. Progress goes to stderr, the paths written to stdout.

    \b
    Examples:
      sd35m-mlx "a capybara holding a sign that reads Hello World"
      sd35m-mlx "a lighthouse at dusk" --seed 7 -n 4 -o "lighthouse-{seed}.png"
      sd35m-mlx "the same scene in watercolor" --image photo.png --strength 0.6
      sd35m-mlx --from-image sd35m-7.png --steps 60
    """
    reporter = Reporter(quiet=quiet, verbose=verbose)
    try:
        with warnings.catch_warnings():
            # Library warnings (e.g. "prompt truncated to 77 CLIP tokens") as one stderr line each.
            warnings.showwarning = reporter.python_warning
            run(ctx, reporter, params)
    except click.ClickException:
        raise
    except KeyboardInterrupt:
        reporter.interrupted()
        ctx.exit(130)
    except Exception as e:
        if verbose:
            traceback.print_exc()
        raise RunError(one_line(e) + ("" if verbose else " (--verbose shows the traceback)")) from None


def given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)


def restore(ctx: click.Context, params: dict, png: str) -> tuple[dict, dict]:
    """params with the PNG's stored settings in place of defaults; plus the stored fields with no option."""
    stored = read_settings(png)
    params = dict(params)
    for name, field in RESTORABLE.items():
        if stored.get(field) is not None and not given(ctx, name):
            params[name] = (stored[field],) if name == "seeds" else stored[field]
    extra = {k: stored[k] for k in ("slg_layers", "slg_start", "slg_stop") if k in stored}
    return params, extra


def image_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"--image {path}: cannot read it as an image ({one_line(e)})") from None


def size_for_image(w: int, h: int, width: int | None, height: int | None) -> tuple[int, int]:
    """Missing sides from the image: its size if in the trained range, else about 1 megapixel, same aspect."""

    def snap(v: float) -> int:
        return min(max(round(v / MULTIPLE) * MULTIPLE, MIN_SIDE), MAX_SIDE)

    if width and height:
        return width, height
    if width:
        return width, snap(width * h / w)
    if height:
        return snap(height * w / h), height
    if TRAINED_MIN <= min(w, h) and max(w, h) <= TRAINED_MAX:
        return w // MULTIPLE * MULTIPLE, h // MULTIPLE * MULTIPLE
    k = (1024 * 1024 / (w * h)) ** 0.5
    return snap(w * k), snap(h * k)


def plan_seeds(seeds: tuple[int, ...], n: int) -> list[int]:
    """The given seeds, then +1 from the last up to n images; random if none (32-bit: easy to type)."""
    if not seeds:
        return [secrets.randbelow(2**32) for _ in range(n)]
    out = list(seeds)
    while len(out) < n:
        out.append((out[-1] + 1) % (MAX_SEED + 1))
    return out


def build_settings(ctx: click.Context, params: dict) -> tuple[Settings, list[int], list[str]]:
    """The checked settings, one seed per image, and notes to print once every check has passed."""
    extra = {}
    from_image = params.pop("from_image")
    if from_image:
        params, extra = restore(ctx, params, from_image)
    if params["num_images"] < 1:
        raise UsageError(f"--num-images must be at least 1, got {params['num_images']}")
    if not params["prompt"]:
        raise UsageError("missing PROMPT (or --from-image PNG)")
    image = params["image"]
    if image is None and given(ctx, "strength"):
        raise UsageError("--strength only applies with --image")
    for name in ("upscale_strength", "upscale_steps", "upscale_model"):
        if params["upscale"] is None and given(ctx, name):
            raise UsageError(f"--{name.replace('_', '-')} only applies with --upscale")
    width, height = params["width"], params["height"]
    notes = []
    if image is not None:
        w, h = image_size(image)
        width, height = size_for_image(w, h, width, height)
        if not (given(ctx, "width") and given(ctx, "height")) and (width, height) != (w, h):
            notes.append(f"--image is {w}x{h}; generating at {width}x{height} (--width/--height choose)")
    dtype = params["dtype"] if params["dtype"] != "auto" else model_io.default_dtype()
    try:
        settings = Settings(
            prompt=str(params["prompt"]),
            negative_prompt=str(params["negative_prompt"] or ""),
            width=int(width or Settings.width),
            height=int(height or Settings.height),
            steps=int(params["steps"]),
            cfg=float(params["cfg"]),
            sampler=str(params["sampler"]),
            slg=bool(params["slg"]),
            slg_scale=float(params["slg_scale"]),
            max_sequence_length=int(params["max_sequence_length"]),
            t5=bool(params["t5"]),
            dtype=str(dtype),
            quantize=int(params["quantize"]) if params["quantize"] is not None else None,
            t5_quantize=str(params["t5_quantize"]) if params["t5_quantize"] is not None else None,
            model=str(params["model"]),
            image=str(image) if image is not None else None,
            strength=float(params["strength"]) if image is not None else None,
            upscale=float(params["upscale"]) if params["upscale"] is not None else None,
            upscale_strength=float(params["upscale_strength"]),
            upscale_steps=int(params["upscale_steps"]) if params["upscale_steps"] is not None else None,
            upscale_model=str(params["upscale_model"]) if params["upscale_model"] is not None else None,
            **extra,
        )
        seeds = [int(s) for s in plan_seeds(tuple(params["seeds"]), params["num_images"])]
    except (TypeError, ValueError) as e:  # click has typed the command line: only stored values can be off
        raise UsageError(f"--from-image {from_image}: unusable stored settings ({e})") from None
    warnings = check(settings)
    for seed in seeds:
        check(dataclasses.replace(settings, seed=seed))
    return settings, seeds, notes + [f"Warning: {w}" for w in warnings]


def run(ctx: click.Context, reporter: Reporter, params: dict) -> None:
    # 1. Everything that can fail fast fails before the model loads: nothing is written on failure.
    restored = bool(params.get("from_image"))  # a PNG's stored settings are complete: no per-model defaults
    explicit = {n for n in ("steps", "cfg", "slg") if restored or given(ctx, n)}
    settings, seeds, notes = build_settings(ctx, params)
    paths = plan_paths(params["output"], seeds)
    for folder in {p.parent for p in paths}:
        check_writable(folder)
    folder = model_io.resolve_model(settings.model, revision=params["revision"], load_t5=settings.t5)
    for note in notes:
        reporter.say(note)

    # 2. Load
    t5 = "" if settings.t5 else ", no T5"
    reporter.say(f"Loading {settings.model} ({settings.dtype}{t5})")
    t0 = time.perf_counter()
    pipe = model_io.load_pipeline(
        folder,
        settings.dtype,
        settings.t5,
        quantize=settings.quantize,
        t5_quantize=settings.t5_quantize,
        low_memory=params["low_memory"],
    )
    reporter.say(f"Loaded in {format_seconds(time.perf_counter() - t0)}")
    settings, defaults = apply_family_defaults(settings, pipe, explicit)
    if defaults:
        reporter.say(defaults)

    second_model = second_model_loader(settings, params["revision"], params["low_memory"])

    # 3. One generate() per seed, so each seed reproduces its image exactly
    written: list[tuple[Path, int]] = []
    taken: set[Path] = set()
    for i, (seed, path) in enumerate(zip(seeds, paths, strict=True)):
        s = dataclasses.replace(settings, seed=seed)
        label = f"[{i + 1}/{len(seeds)}]"
        steps = f"{s.steps} step{'s' * (s.steps != 1)}"
        steps += f", img2img strength {s.strength}" if s.image else ""
        reporter.say(f"{label} seed {seed}, {s.width}x{s.height}, {steps}: encoding prompt")
        if s.upscale is None:
            images = pipe.generate(s.prompt, callback=reporter.steps(label), **s.generate_kwargs())
        else:
            images = two_pass(pipe, s, reporter, label, second_model)
        final = write_png(images[0], path, png_info(s, VERSION), overwrite=params["overwrite"], taken=taken)
        if final != path:
            reporter.say(f"{label} {path} exists; wrote {final} instead (--overwrite replaces)")
        reporter.result(final)
        written.append((final, seed))

    # 4. Summary
    reporter.summary(written, peak_memory())
