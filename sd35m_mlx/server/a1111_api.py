"""AUTOMATIC1111's /sdapi/v1: txt2img, img2img, progress (with the live preview), interrupt, sd-models,
samplers, options.

Takes the whole payload real clients send (hires fix, subseeds, scripts, override_settings, ...):
fields we do not support are ignored and named in `info.warnings` (a1111_fields.py); a sampler or scheduler
we do not have is a 400 naming the ones we run (sampling/labels.py maps A1111's labels to ours).
Nothing in a payload can name a file: `sd_model_checkpoint` (in /options or `override_settings`) picks one of
the titles `serve --model` listed at start (server/models.py); `randn_source` picks the noise source
(`randn_source()`); other override_settings are named in `info.warnings`. Prompts are encoded as diffusers
encodes them, with A1111's syntax (`text_encoding` "comfyui" is an extension field). A1111's `info` JSON has no
scheduler key (modules/processing.py `Processed.js`): the schedule is in each infotext's `Schedule type`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import replace
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from ..defaults import SAMPLER, SAMPLERS, SCHEDULER, TEXT_ENCODINGS
from ..prompts.infotext import infotext_parameters
from ..record import PARAMETERS_KEY, Settings, parameters_text, stored_text
from ..sampling.labels import (
    SAMPLER_LABELS,
    SCHEDULER_LABELS,
    rng_from_label,
    sampler_from_label,
    sampler_label,
    scheduler_from_label,
)
from ..sampling.schedulers import SCHEDULERS
from .a1111_fields import ignored_notes, override_notes
from .controlnets import decode_plan
from .errors import RequestError
from .hires import HIRES_FIELDS, LATENT_UPSCALE_MODES, apply_hires
from .jobs import Job
from .masks import a1111_mask
from .models import choose
from .outpainting import OutpaintField, apply_outpaint, from_script
from .spec import Spec, seeds_for, settings_for
from .uploads import decode_base64, json_object, open_image, open_upload

FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}  # A1111's inpainting_fill


class Txt2ImgBody(BaseModel):
    """The fields we use; every other field is kept (echoed in `parameters`) and otherwise ignored."""

    model_config = ConfigDict(extra="allow")

    prompt: str | None = ""
    negative_prompt: str | None = ""
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = -1
    batch_size: int | None = 1
    n_iter: int | None = 1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    prompt_syntax: Literal["weighted", "plain"] | None = None  # extension: "plain" as diffusers encodes
    save_images: bool | None = False  # into serve's output folder, the history (server/history.py)
    text_encoding: Literal[TEXT_ENCODINGS] | None = None  # extension: "comfyui" as ComfyUI encodes; default diffusers


class Img2ImgBody(Txt2ImgBody):
    init_images: list[str] | None = None
    denoising_strength: float | None = None
    mask: str | None = None  # inpainting: base64, white = repaint (server/masks.py)
    mask_blur: int | None = None  # px of Gaussian blur on the mask; sets both of A1111's axes below
    mask_blur_x: int | None = 4  # A1111's defaults
    mask_blur_y: int | None = 4
    inpainting_mask_invert: int | None = 0  # 1: repaint what is black
    inpaint_full_res: bool | None = True  # "only masked": repaint a crop around the mask (our padding_mask_crop)
    inpaint_full_res_padding: int | None = 0
    inpainting_fill: int | None = None  # 0 fill, 1 original, 2 latent noise, 3 latent nothing: we run 1
    outpaint: OutpaintField | None = None  # extension: extend init_images[0] by margins (server/outpainting.py)


def map_sampler(name: str | None, scheduler: str | None = None) -> tuple[str, str]:
    """Our (sampler, scheduler) for A1111's `sampler_name` and `scheduler` labels ("Euler a", "DPM++ 2M",
    old-style "DPM++ 2M Karras"; "Karras", "Automatic") or our own names; an unknown one is a 400 naming ours."""
    sampler, folded = (SAMPLER, None) if not name else (sampler_from_label(name) or (None, None))
    if sampler is None:
        labels = ", ".join(SAMPLER_LABELS.get(s, s) for s in SAMPLERS)
        raise RequestError(f"unknown sampler {name!r}; choose one of {labels}", "sampler_name")
    ours = scheduler_from_label(scheduler) if scheduler else (folded or SCHEDULER)
    if ours is None:
        labels = ", ".join(SCHEDULER_LABELS.get(s, s) for s in SCHEDULERS)
        raise RequestError(f"unknown scheduler {scheduler!r}; choose one of Automatic, {labels}", "scheduler")
    return sampler, ours


def spec_from(body: Txt2ImgBody, limits, hires: bool = False) -> Spec:
    """hires: txt2img's hires fix fields act (server/hires.py); img2img ignores them as A1111 does."""
    sampler, scheduler = map_sampler(body.sampler_name or body.sampler_index, body.scheduler)
    n = (body.batch_size if body.batch_size is not None else 1) * (body.n_iter if body.n_iter is not None else 1)
    seed = body.seed if body.seed is not None and body.seed >= 0 else None  # -1 (any negative): random
    settings = Settings(
        prompt=body.prompt or "", negative_prompt=body.negative_prompt or "", sampler=sampler, scheduler=scheduler
    )
    settings = replace(settings, prompt_syntax=body.prompt_syntax or "weighted")  # A1111 reads its syntax
    spec = Spec(settings, seeds=seeds_for(seed, n, limits, "batch_size"))
    spec.given(text_encoding=body.text_encoding)
    extra = dict(body.model_extra or {})
    if isinstance(extra.get("override_settings"), dict):  # checkpoint_override acts on sd_model_checkpoint
        overrides = extra.pop("override_settings")
        spec.given(rng=randn_source(overrides.get("randn_source")))
        spec.notes.extend(override_notes(overrides))
    if isinstance(extra.get("alwayson_scripts"), dict):  # the ControlNet units are ours (server/controlnets.py)
        scripts = extra["alwayson_scripts"].items()
        extra["alwayson_scripts"] = {k: v for k, v in scripts if str(k).lower() != "controlnet"}
    notes = ignored_notes(extra)  # (with enable_hr: the hires fields; those hires.py acts on are not ignored)
    spec.notes.extend(n for n in notes if not (hires and n.split("=")[0] in HIRES_FIELDS))
    spec.given(steps=body.steps, cfg=body.cfg_scale, width=body.width, height=body.height)
    if hires:
        apply_hires(extra, spec, extra.get("denoising_strength"))
    return spec


def randn_source(value) -> str | None:
    """Our rng for A1111's `randn_source` option (modules/rng.py): CPU is torch's CPU generator ("cpu"), NV its
    Philox port ("nv"); GPU is torch's generator on the device, on CUDA the Philox stream NV reproduces, so "nv"
    (on a Mac, A1111 draws GPU noise on the CPU: send CPU for that picture). None: not given."""
    if value is None:
        return None
    rng = rng_from_label(value) if isinstance(value, str) else None
    if rng is None or rng == "mlx":
        message = f"unknown override_settings.randn_source {value!r}; choose one of GPU, CPU, NV"
        raise RequestError(message, "randn_source")
    return rng


def checkpoint_override(body: Txt2ImgBody, spec: Spec, served: dict) -> None:
    """override_settings.sd_model_checkpoint: this request runs on that model, then the server switches back
    unless override_settings_restore_afterwards is false (A1111's default: true)."""
    overrides = (body.model_extra or {}).get("override_settings")
    if not isinstance(overrides, dict) or overrides.get("sd_model_checkpoint") is None:
        return
    spec.checkpoint = choose(served, overrides["sd_model_checkpoint"], "override_settings.sd_model_checkpoint").title
    spec.restore = (body.model_extra or {}).get("override_settings_restore_afterwards", True) is not False


def router(server) -> APIRouter:
    r = APIRouter(prefix="/sdapi/v1")

    def answer(job: Job, body: Txt2ImgBody, saved: list[str]) -> dict:
        spec, asked = job.spec, job.spec.settings
        model = job.model or server.model
        seeds = [res.seed for res in job.results] or spec.seeds
        infotexts = [parameters_text(settings_for(spec, s, model), server.worker.version) for s in seeds]
        info = {
            "prompt": asked.prompt,
            "all_prompts": [asked.prompt] * len(seeds),
            "negative_prompt": asked.negative_prompt,
            "all_negative_prompts": [asked.negative_prompt] * len(seeds),
            "seed": seeds[0],
            "all_seeds": seeds,
            "subseed": seeds[0],
            "all_subseeds": seeds,
            "subseed_strength": 0,
            "width": asked.width,
            "height": asked.height,
            "sampler_name": sampler_label(asked.sampler),
            "cfg_scale": asked.cfg,
            "steps": asked.steps,
            "batch_size": len(spec.seeds),
            "denoising_strength": asked.strength,
            "sd_model_name": model.name,
            "sd_model_hash": None,
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
            "version": server.worker.version,
            "interrupted": job.state == "cancelled",
            "warnings": spec.notes,
            "saved": saved,  # extension: the file names save_images wrote in the output folder
        }
        return {
            "images": [base64.b64encode(res.png).decode("ascii") for res in job.results],
            "parameters": _echo(body),
            "info": json.dumps(info),
        }

    async def controlnet(body: Txt2ImgBody, spec: Spec, fallback=None) -> None:
        """The ControlNet extension's units (alwayson_scripts.controlnet) -> spec.control, recorded as the CLI."""
        size = (spec.settings.width, spec.settings.height)
        plan = await decode_plan((body.model_extra or {}).get("alwayson_scripts"), server, size, fallback, spec.notes)
        if plan is not None:
            spec.control = plan
            spec.given(**plan.settings())

    @r.post("/txt2img")
    async def txt2img(body: Txt2ImgBody, request: Request):
        spec = spec_from(body, server.config.limits, hires=True)
        checkpoint_override(body, spec, server.served)
        await controlnet(body, spec)
        if spec.control is not None and spec.settings.upscale is not None:
            raise RequestError("the hires fix does not combine with ControlNet yet; send enable_hr: false", "enable_hr")
        await ready_to_save(body, spec)
        job = await server.run(spec, request)
        return answer(job, body, await save(job, body))

    @r.post("/img2img")
    async def img2img(body: Img2ImgBody, request: Request):
        if not body.init_images:
            raise RequestError("init_images is required: a list with one base64-encoded image", "init_images")
        spec = spec_from(body, server.config.limits)
        checkpoint_override(body, spec, server.served)
        if len(body.init_images) > 1:
            spec.notes.append("several init_images: used the first for every image")
        data = decode_base64(body.init_images[0], "init_images")
        spec.image = init = await asyncio.to_thread(open_image, data, "init_images", server.config.max_upload_pixels)
        extra = body.model_extra or {}
        if body.outpaint is None and (script := from_script(extra.get("script_name"), extra.get("script_args"))):
            body.outpaint = script  # A1111's outpainting scripts: as our field, one pass (server/outpainting.py)
            spec.notes = [n for n in spec.notes if not n.startswith(("script_name=", "script_args="))]
            spec.notes.append(f"script {extra['script_name']!r} ran as one outpainting pass (edge fill, feather 32)")
        if body.outpaint is not None:
            if body.mask:
                raise RequestError("outpaint makes its own mask: send either mask or outpaint", "outpaint")
            top = min(server.config.limits.max_side, server.model.max_side)
            await asyncio.to_thread(apply_outpaint, body.outpaint, spec, top, body.denoising_strength,
                                    (body.width, body.height))  # fmt: skip
        else:
            if body.mask:
                await inpainting(body, spec)
            spec.given(strength=body.denoising_strength if body.denoising_strength is not None else 0.75)  # A1111's
        await controlnet(body, spec, fallback=init)  # a unit without an image uses the init image (as the extension)
        await ready_to_save(body, spec)
        job = await server.run(spec, request)
        return answer(job, body, await save(job, body))

    async def ready_to_save(body: Txt2ImgBody, spec: Spec) -> None:
        """save_images: a folder that cannot take files fails now, before the generation."""
        if not body.save_images:
            return
        if server.history is None:
            spec.notes.append("save_images: this server has no output folder (serve --output-dir); nothing saved")
        else:
            await asyncio.to_thread(server.history.ensure)

    async def save(job: Job, body: Txt2ImgBody) -> list[str]:
        """The answer's images, as they are (metadata included), into the history."""
        if not body.save_images or server.history is None or not job.results:
            return []
        return await asyncio.to_thread(server.history.save, [(res.png, res.seed) for res in job.results])

    async def inpainting(body: Img2ImgBody, spec: Spec) -> None:
        """A1111's inpainting fields -> spec.mask (white = repaint) and padding_mask_crop."""
        if body.mask_blur is not None:  # A1111's mask_blur setter: both axes
            blur = (body.mask_blur, body.mask_blur)
        else:
            blur = (body.mask_blur_x if body.mask_blur_x is not None else 4,
                    body.mask_blur_y if body.mask_blur_y is not None else 4)  # fmt: skip
        data = decode_base64(body.mask, "mask")
        spec.mask = await asyncio.to_thread(a1111_mask, data, spec.image.size, bool(body.inpainting_mask_invert),
                                            blur, server.config.max_upload_pixels)  # fmt: skip
        if body.inpaint_full_res:
            padding = body.inpaint_full_res_padding or 0
            if padding < 0:
                message = f"inpaint_full_res_padding must be >= 0 px, got {padding}"
                raise RequestError(message, "inpaint_full_res_padding")
            spec.padding_mask_crop = padding
        if body.inpainting_fill not in (None, 1):
            name = FILLS.get(body.inpainting_fill, str(body.inpainting_fill))
            spec.notes.append(f"inpainting_fill {name!r} is not available; ran 'original' (starts from the image)")

    @r.get("/progress")
    async def progress(skip_current_image: bool = False):
        job = server.worker.running
        preview = None if job is None or skip_current_image else job.preview_png()
        return {
            "progress": job.progress if job else 0.0,
            "eta_relative": job.eta() if job else 0.0,
            "state": progress_state(job),
            "current_image": base64.b64encode(preview).decode("ascii") if preview else None,
            "textinfo": f"step {job.step}/{job.total}, image {job.image_index + 1}/{len(job.spec.seeds)}"
            if job
            else None,
        }

    @r.post("/interrupt")
    async def interrupt():
        server.worker.interrupt()
        return {}

    @r.get("/sd-models")
    async def sd_models():
        return [{"title": c.title, "model_name": c.title, "hash": None, "sha256": None, "filename": c.filename,
                 "config": None} for c in server.served.values()]  # fmt: skip

    @r.get("/samplers")
    async def samplers():
        return samplers_list()

    @r.get("/schedulers")
    async def schedulers():
        return schedulers_list()

    @r.get("/options")
    async def get_options():
        return options(server)

    @r.post("/options")
    async def set_options(request: Request):
        """Only sd_model_checkpoint takes effect: it switches to another served model (after the queued jobs).
        A client may post the other options back unchanged; other keys are ignored as A1111 ignores unknown
        ones. Naming a checkpoint we do not serve is an error, as in A1111 ("model ... not found")."""
        changes = await json_object(request)
        wanted = changes.get("sd_model_checkpoint")
        if wanted is not None:
            await server.switch(choose(server.served, wanted).title)
        return None

    @r.get("/scripts")
    async def scripts():  # asked by clients (webuiapi) probing for extensions: we have none
        return {"txt2img": [], "img2img": []}

    @r.post("/png-info")
    async def png_info(request: Request):
        """A1111's pnginfoapi: the image's infotext, its other text fields, and the infotext parsed."""
        body = await json_object(request)
        data = decode_base64(body.get("image"), "image")
        im = await asyncio.to_thread(open_upload, data, "image", server.config.max_upload_pixels)
        text = stored_text(im)
        info = text.pop(PARAMETERS_KEY, "") or ""
        items = {k: v for k, v in text.items() if isinstance(v, str)}
        return {"info": info, "items": items, "parameters": infotext_parameters(info) if info else {}}

    for path, answer_for in STARTUP_ANSWERS.items():  # what clients ask on connect, answered as A1111 does
        r.add_api_route(path, _constant(answer_for, server), methods=["GET"])
    for path in ("/refresh-checkpoints", "/refresh-vae", "/refresh-embeddings"):
        r.add_api_route(path, _constant(lambda _: {}, server), methods=["POST"])

    return r


def _echo(body: Txt2ImgBody) -> dict:
    """The payload as A1111 echoes it in `parameters`, without the images it sent (init, mask, control units')."""
    out = body.model_dump(exclude={"init_images", "mask"})
    scripts = out.get("alwayson_scripts")
    for key, block in scripts.items() if isinstance(scripts, dict) else ():
        if str(key).lower() == "controlnet" and isinstance(block, dict) and isinstance(block.get("args"), list):
            keep = [{k: v for k, v in u.items() if k not in UNIT_IMAGES} if isinstance(u, dict) else u
                    for u in block["args"]]  # fmt: skip
            out["alwayson_scripts"] = {**scripts, key: {**block, "args": keep}}
    return out


UNIT_IMAGES = ("image", "input_image", "mask", "mask_image", "effective_region_mask")


def samplers_list() -> list[dict]:
    """What we run, in A1111's /sdapi/v1/samplers shape: its label where it has one, our name as an alias."""
    return [{"name": SAMPLER_LABELS.get(s, s), "aliases": [s, f"k_{s}"], "options": {}} for s in SAMPLERS]


def schedulers_list() -> list[dict]:
    """What we run, in A1111's /sdapi/v1/schedulers shape (modules/sd_schedulers.py's Scheduler fields)."""
    return [
        {
            "name": s,
            "label": SCHEDULER_LABELS.get(s, s),
            "aliases": None,
            "default_rho": 7.0 if s == "karras" else -1,
            "need_inner_model": False,
        }
        for s in SCHEDULERS
    ]


def _constant(answer_for, server):
    async def endpoint():
        return answer_for(server)

    return endpoint


def _memory(server) -> dict:
    import os

    from ..sampling.memory import physical_memory

    total = physical_memory()
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        free = 0
    return {"ram": {"free": free, "used": total - free, "total": total}, "cuda": {"error": "no CUDA: MLX"}}


# GET endpoints A1111 clients (webuiapi, SillyTavern, Open WebUI, Krita's plugin) call at start-up, with the
# answer for what we have: nothing of these kinds besides the upscalers (pixel and latent) our two-pass upscale uses.
STARTUP_ANSWERS = {
    "/cmd-flags": lambda server: {"api": True, "nowebui": False, "listen": False, "api_auth": None,
                                  "lora_dir": None, "ckpt_dir": None},
    "/upscalers": lambda server: [{"name": name, "model_name": None, "model_path": None, "model_url": None,
                                   "scale": None} for name in ("None", "Lanczos", "Nearest")],
    "/latent-upscale-modes": lambda server: [{"name": name} for name in LATENT_UPSCALE_MODES],
    "/sd-vae": lambda server: [],
    "/sd-modules": lambda server: [],
    "/hypernetworks": lambda server: [],
    "/face-restorers": lambda server: [],
    "/realesrgan-models": lambda server: [],
    "/prompt-styles": lambda server: [],
    "/embeddings": lambda server: {"loaded": {}, "skipped": {}},
    "/extensions": lambda server: [],
    "/script-info": lambda server: [],
    "/memory": _memory,
}  # fmt: skip


def progress_state(job: Job | None) -> dict:
    """A1111's `state` block of /progress (shared.state.dict())."""
    return {
        "skipped": False,
        "interrupted": job is not None and job.cancel_reason is not None,
        "stopping_generation": False,
        "job": f"job({job.id})" if job else "",
        "job_count": len(job.spec.seeds) if job else 0,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)) if job else "0",
        "job_no": job.image_index if job else 0,
        "sampling_step": job.step if job else 0,
        "sampling_steps": job.total if job else 0,
    }


def options(server) -> dict:
    name = server.model.name
    return {
        "sd_model_checkpoint": name,
        "sd_checkpoint_hash": None,
        "sd_vae": "Automatic",
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
        "eta_noise_seed_delta": 0,
        "sd_model_name": name,
        "sd_lora": "None",
        "live_previews_enable": True,  # /progress's current_image: an RGB preview at every step
        "show_progress_every_n_steps": 1,
        "live_preview_content": "Prompt",
        "upscaler_for_img2img": None,
        "sd_checkpoints_limit": 1,  # one model resident at a time (serve --model A --model B)
    }
