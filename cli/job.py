"""One command's job in four phases, shared by one process (cli/generate.py) and several (cli/distributed.py):
`plan` checks everything that needs no model, `load` loads and fits the settings to it, `make_image` makes
image i, `write` writes it with its settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import click
from click.core import ParameterSource
from PIL import Image

import sd35m_mlx
from sd35m_mlx.prompts.syntax import extract_lora_tags
from sd35m_mlx.record import QUALITY, plan_seeds, settings_save_options, size_for_image

from . import editing, live, lora
from . import model as model_io
from .errors import UsageError, one_line
from .family import apply_family_defaults, describe
from .metadata import read_settings_noting
from .options import RESTORABLE
from .output import check_writable, image_format, plan_paths, write_image
from .progress import Reporter
from .settings import Settings, check, fit_to_model
from .upscale import second_model_loader, two_pass

VERSION = f"sd35m-mlx {sd35m_mlx.__version__}"


@dataclasses.dataclass
class Job:
    """What one command makes, checked before the model loads: the settings, a seed and a path per image,
    the editing inputs (--mask, --outpaint, --controlnet), the live preview file and the model folder."""

    settings: Settings
    seeds: list[int]
    paths: list[Path]
    notes: list[str]
    edit: editing.Editing
    preview: Path | None
    folder: str
    explicit: set[str]  # steps / cfg / slg the user chose (or the PNG stored): no per-model default for them
    second_model: Callable | None = None  # --upscale-model's loader (cli/upscale.py)
    size_from: dict[str, str] = dataclasses.field(default_factory=dict)  # side -> the picture that set it
    tag_files: list[tuple[str, float]] = dataclasses.field(default_factory=list)  # PROMPT's <lora:> tags (cli/lora.py)


def plan(ctx: click.Context, params: dict, *, writer: bool = True, chosen: frozenset = frozenset()) -> Job:
    """Every check that needs no model; `writer`: this process writes the files (their folders are checked);
    `chosen`: parameters given other than on the command line (a --prompts-file line's options)."""
    restored = bool(params.get("from_image"))  # a PNG's stored settings are complete: no per-model defaults
    explicit = {n for n in ("steps", "cfg", "slg") if restored or given(ctx, n) or n in chosen}
    settings, seeds, notes, size_from = build_settings(ctx, params)
    lora_tags, tag_files = lora.resolve_tags(settings.prompt, settings.negative_prompt, params.pop("lora_dir", None))
    settings = dataclasses.replace(settings, lora_tags=lora_tags)
    edit = editing.prepare(editing.inputs(settings), given(ctx, "strength"))  # read and checked (also restored)
    if settings.upscale is not None and edit.kwargs:
        raise UsageError("--upscale does not combine with --mask, --outpaint or --controlnet yet")
    settings = dataclasses.replace(settings, strength=edit.strength) if edit.strength else settings
    paths = plan_paths(params["output"], seeds)
    if writer:
        for folder in {p.parent for p in paths}:
            check_writable(folder)
    preview = live.check(params, lambda name: given(ctx, name)) if writer else None
    folder = model_io.resolve_model(settings.model, revision=params["revision"], load_t5=settings.t5)
    job = Job(settings, seeds, paths, notes + edit.notes, edit, preview, folder, explicit, size_from=size_from)
    job.tag_files = tag_files
    return job


def load(job: Job, params: dict, reporter: Reporter, pipe=None):
    """The pipeline with the job's LoRAs and ControlNets; job.settings fitted to what the model accepts.
    `pipe`: the one loaded for an earlier job (--prompts-file), switched to this job's LoRAs."""
    s = job.settings
    if pipe is not None:
        pipe.use_loras([(src, w) for src, w, _ in s.loras] + job.tag_files)
    pipe = pipe or model_io.load_pipeline(
        job.folder,
        s.dtype,
        s.t5,
        quantize=s.quantize,
        t5_quantize=s.t5_quantize,
        low_memory=params["low_memory"],
        **live.loader_options(params),
        **({"loras": [(src, w) for src, w, _ in s.loras] + job.tag_files} if s.loras or job.tag_files else {}),
    )
    notes = []
    if s.loras or s.lora_tags:
        info = pipe.lora_info()
        loras, notes = lora.with_hashes(s.loras, info[: len(s.loras)])
        s = dataclasses.replace(s, loras=loras, lora_tags=lora.tags_with_hashes(s.lora_tags, info[len(s.loras) :]))
    job.edit.load(pipe, s.quantize)
    s, family = apply_family_defaults(s, pipe, job.explicit)  # steps, guidance, SLG per model (cli/family.py)
    fitted = []
    limits = getattr(pipe, "limits", None)  # what this model accepts (test doubles have none)
    if limits is not None:
        s, fitted = fit_to_model(s, limits, job.size_from)  # every size the run reaches, before the first step
    notes += ([describe(family, s)] if family else []) + fitted  # described as fitted: no layers it lacks
    for note in notes:
        reporter.say(note)
    job.settings = s
    job.second_model = second_model_loader(s, params["revision"], params["low_memory"])
    return pipe


def make_image(pipe, job: Job, params: dict, reporter: Reporter, i: int, *, label: str | None = None, **overrides):
    """Image i of the job (its seed); `overrides` go to generate() (output_type="latent" returns latents)."""
    s = dataclasses.replace(job.settings, seed=job.seeds[i])
    label = label or f"[{i + 1}/{len(job.seeds)}]"
    steps = f"{s.steps} step{'s' * (s.steps != 1)}"
    steps += f", img2img strength {s.strength}" if s.image else ""
    reporter.say(f"{label} seed {s.seed}, {s.width}x{s.height}, {steps}: encoding prompt")
    extra = live.generate_kwargs(params, job.preview, s.width, s.height) | job.edit.kwargs | overrides
    if s.upscale is not None:  # two passes (cli/upscale.py): plan() refused editing inputs with it
        images = two_pass(pipe, s, reporter, label, job.second_model, **extra)
    else:
        images = pipe.generate(s.encoder_prompt, callback=reporter.steps(label), **(s.generate_kwargs() | extra))
    return images if overrides.get("output_type") == "latent" else job.edit.finish(images)[0]


def write(
    reporter: Reporter, job: Job, image, i: int, overwrite: bool, taken: set[Path], quality: int = QUALITY
) -> tuple[Path, int]:
    """Write image i (never over another file unless --overwrite) in its path's format; (path written, seed)."""
    s, path = dataclasses.replace(job.settings, seed=job.seeds[i]), job.paths[i]
    options = settings_save_options(s, VERSION, image_format(path), quality)
    final = write_image(image, path, options, overwrite=overwrite, taken=taken)
    if final != path:
        reporter.say(f"[{i + 1}/{len(job.seeds)}] {path} exists; wrote {final} instead (--overwrite replaces)")
    reporter.result(final)
    return final, s.seed


def given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)


def restore(ctx: click.Context, params: dict, png: str) -> tuple[dict, dict, dict[str, str]]:
    """params with the PNG's stored settings in place of defaults; the stored fields with no option; why
    stored values were left out as invalid (field -> message)."""
    stored, invalid = read_settings_noting(png)
    params = dict(params)
    for name, field in RESTORABLE.items():
        if stored.get(field) is not None and not given(ctx, name):
            params[name] = (stored[field],) if name == "seeds" else stored[field]
    if "rng" not in stored and not given(ctx, "rng"):
        params["rng"] = "mlx"  # written before --rng: its noise came from MLX's generator
    if "prompt_syntax" not in stored and not given(ctx, "prompt_syntax"):
        params["prompt_syntax"] = "plain"  # written before --prompt-syntax: its prompt was encoded plain
    names = ("slg_layers", "slg_start", "slg_stop", "loras", "upscale_prompt", "upscale_negative_prompt")
    extra = {k: stored[k] for k in names if k in stored}
    if extract_lora_tags(extra.get("upscale_prompt") or "")[1]:  # a server hires fix's (server/hires.py)
        invalid["upscale_prompt"] = "the hires prompt's <lora:...> tags are not applied: the first pass's LoRAs run"
    return params, extra, invalid


def image_size(path: str, option: str = "--image") -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"{option} {path}: cannot read it as an image ({one_line(e)})") from None


def build_settings(ctx: click.Context, params: dict) -> tuple[Settings, list[int], list[str], dict[str, str]]:
    """The checked settings, one seed per image, notes to print once every check has passed, and the sides
    the user did not give, with the picture that set them ("width" -> "--image photo.png")."""
    extra, invalid = {}, {}
    from_image = params.pop("from_image")
    if from_image:
        params, extra, invalid = restore(ctx, params, from_image)
    notes = [f"Note: --from-image {from_image}: ignored a stored value ({why})" for why in invalid.values()]
    loras, lora_notes = lora.plan(given(ctx, "loras"), params, extra.pop("loras", None))
    if params["num_images"] < 1:
        raise UsageError(f"--num-images must be at least 1, got {params['num_images']}")
    if not params["prompt"]:
        why = f"; its stored prompt is unusable ({invalid['prompt']})" if "prompt" in invalid else ""
        if from_image and not why:  # e.g. a ComfyUI graph whose text comes from no text-encode node: say so
            why = f"; {from_image} stores none" + (f" ({'; '.join(invalid.values())})" if invalid else "")
        raise UsageError("missing PROMPT (or --from-image PNG)" + why)
    image = params["image"]
    if image is None and given(ctx, "strength"):
        raise UsageError("--strength only applies with --image")
    for name in ("upscale_strength", "upscale_steps", "upscale_model", "upscaler"):
        if params["upscale"] is None and given(ctx, name):
            raise UsageError(f"--{name.replace('_', '-')} only applies with --upscale")
    width, height = params["width"], params["height"]
    source = editing.size_source(params)  # --image (extended by --outpaint), else the first --control-image
    size_from = {}
    if source is not None:
        picture = image_size(source[1], source[0])
        w, h = editing.canvas_size(params, *picture)
        extended = " extended by --outpaint" if (w, h) != picture else ""
        size_from = {side: f"{source[0]} {source[1]}{extended}" for side in ("width", "height") if not params[side]}
        width, height = size_for_image(w, h, width, height)
        if not (given(ctx, "width") and given(ctx, "height")) and (width, height) != (w, h):
            notes.append(f"{source[0]} is {w}x{h}; generating at {width}x{height} (--width/--height choose)")
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
            scheduler=str(params["scheduler"]),
            shift=float(params["shift"]) if params["shift"] is not None else None,
            rng=str(params["rng"]),
            prompt_syntax=str(params["prompt_syntax"]),
            text_encoding=str(params["text_encoding"]),
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
            loras=loras,
            upscale=float(params["upscale"]) if params["upscale"] is not None else None,
            upscale_strength=float(params["upscale_strength"]),
            upscale_steps=int(params["upscale_steps"]) if params["upscale_steps"] is not None else None,
            upscale_model=str(params["upscale_model"]) if params["upscale_model"] is not None else None,
            upscaler=str(params["upscaler"]),
            **editing.settings_fields(params),
            **extra,
        )
        seeds = [int(s) for s in plan_seeds(tuple(params["seeds"]), params["num_images"])]
    except (TypeError, ValueError) as e:  # click has typed the command line: only stored values can be off
        raise UsageError(f"--from-image {from_image}: unusable stored settings ({e})") from None
    warnings = check(settings)
    for seed in seeds:
        check(dataclasses.replace(settings, seed=seed))
    return settings, seeds, notes + lora_notes + [f"Warning: {w}" for w in warnings], size_from
