"""OpenAI's Images API: /v1/images/generations, /v1/images/edits (img2img; inpainting with `mask`), /v1/models.

Unknown fields are ignored (clients send `quality`, `style`, `user`, ...); `model` is echoed and never
loads anything. Extensions: `seed`, `negative_prompt`, `steps`, `guidance_scale`, `sampler`, `scheduler`,
`shift`, `rng`, `text_encoding` ("comfyui": ComfyUI's prompt encoding), and `strength` for edits. `output_format`
(png, jpeg, webp) and `output_compression` (the JPEG/WebP quality, 0-100) as OpenAI's gpt-image models take them.
An edit's `mask` follows OpenAI: a PNG the image's size, alpha 0 = edit
(server/masks.py).
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import replace
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..defaults import SAMPLERS, SIZE, STRENGTH, TEXT_ENCODINGS
from ..record import Settings, size_for_image
from ..sampling.noise import RNG_SOURCES
from ..sampling.schedulers import SCHEDULERS
from .errors import RequestError
from .jobs import CANCELLED, Job
from .loras import LoraRef, as_tags
from .masks import openai_mask
from .spec import Limits, Spec, parse_size, reencode, seeds_for
from .uploads import open_image


class GenerationsBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str
    n: int = 1
    size: str | None = None  # "WxH"; None or "auto": 1024x1024 (edits: the image's size)
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None  # the settings ride along (EXIF for jpeg/webp)
    output_compression: int | None = Field(None, ge=0, le=100)  # jpeg/webp quality, as OpenAI: 100 = best
    model: str | None = None
    # extensions
    seed: int | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: Literal[SAMPLERS] | None = None
    scheduler: Literal[SCHEDULERS] | None = None
    shift: float | None = Field(None, gt=0, allow_inf_nan=False)  # None: the model's
    rng: Literal[RNG_SOURCES] | None = None  # noise source for the seed (sampling/noise.py); default "cpu"
    stream: bool | None = None
    prompt_syntax: Literal["weighted", "plain"] | None = None  # A1111's syntax by default
    text_encoding: Literal[TEXT_ENCODINGS] | None = None  # "comfyui": as ComfyUI encodes (prompts/comfyui.py)
    loras: list[LoraRef] | None = None  # [{"name", "weight"}] in serve --lora-dir, as prompt tags (server/loras.py)


class EditsBody(GenerationsBody):
    strength: float | None = None


def spec_from(body: GenerationsBody, size: tuple[int, int], limits: Limits) -> Spec:
    if body.stream:
        raise RequestError("stream: streaming responses are not available; send stream=false", "stream")
    settings = Settings(prompt=body.prompt, negative_prompt=body.negative_prompt or "", width=size[0], height=size[1])
    # A1111's syntax by default; the `loras` extension as prompt tags, so the PNG's prompt replays them
    settings = replace(
        settings, prompt=body.prompt + as_tags(body.loras), prompt_syntax=body.prompt_syntax or "weighted"
    )
    spec = Spec(settings, seeds=seeds_for(body.seed, body.n, limits))
    spec.given(steps=body.steps, cfg=body.guidance_scale, sampler=body.sampler, scheduler=body.scheduler)
    spec.given(shift=body.shift, rng=body.rng, text_encoding=body.text_encoding)
    return spec


def fit(size: tuple[int, int], top: int) -> tuple[int, int]:
    """A size scaled down (keeping its aspect, multiples of 16) to at most `top` a side."""
    w, h = size
    if max(w, h) <= top:
        return w, h
    k = top / max(w, h)
    return max(int(w * k) // 16 * 16, 16), max(int(h * k) // 16 * 16, 16)


def router(server) -> APIRouter:
    r = APIRouter()

    def answer(job: Job, body: GenerationsBody, request: Request) -> dict:
        results = [r for r in job.results if not r.partial]  # an interrupted image is A1111's answer only
        if job.state == CANCELLED and not results:  # another client's POST /sdapi/v1/interrupt
            raise RequestError("the job was interrupted before an image was done", status=409)
        fmt = body.output_format or "png"
        quality = body.output_compression if body.output_compression is not None else 100
        data = []
        for result in results:
            encoded = reencode(result.png, fmt.upper(), quality)
            if body.response_format == "url":
                item = {"url": server.image_url(request, server.save(encoded, fmt))}
            else:
                item = {"b64_json": base64.b64encode(encoded).decode("ascii")}
            data.append({**item, "revised_prompt": None, "seed": result.seed})
        spec = job.spec
        return {
            "created": int(job.created),
            "data": data,
            "model": body.model or server.model.name,
            "size": f"{spec.settings.width}x{spec.settings.height}",
            "output_format": fmt,
        }

    @r.post("/v1/images/generations")
    async def generations(body: GenerationsBody, request: Request):
        size = (SIZE, SIZE) if body.size in (None, "auto") else parse_size(body.size)
        job = await server.run(spec_from(body, size, server.config.limits), request)
        return answer(job, body, request)

    @r.post("/v1/images/edits")
    async def edits(request: Request):
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise RequestError("send multipart/form-data with an `image` file and a `prompt`", "image")
        async with request.form(max_files=8, max_fields=64) as form:
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            files = [f for key in ("image", "image[]") for f in form.getlist(key) if not isinstance(f, str)]
            masks = [f for f in form.getlist("mask") if not isinstance(f, str)]
            if not files:
                raise RequestError("image is required: upload it as the multipart file field `image`", "image")
            if len(files) > 1:
                raise RequestError("send one image: img2img starts from a single input image", "image")
            if fields.get("mask") or len(masks) > 1:
                raise RequestError("mask must be one PNG file, uploaded as the multipart file field `mask`", "mask")
            data = await files[0].read()
            mask_data = await masks[0].read() if masks else None
        try:
            body = EditsBody.model_validate(fields)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(p) for p in err.get("loc", ())) or None
            raise RequestError(f"{param}: {err.get('msg')}" if param else str(err.get("msg")), param) from None
        image = await asyncio.to_thread(open_image, data, "image", server.config.max_upload_pixels)
        mask = None
        if mask_data is not None:  # inpainting: alpha 0 = edit (OpenAI's convention) -> white = repaint
            mask = await asyncio.to_thread(openai_mask, mask_data, image.size, server.config.max_upload_pixels)
        if body.size in (None, "auto"):
            size = fit(size_for_image(image.width, image.height, None, None), server.model.max_side)
        else:
            size = parse_size(body.size)
        spec = spec_from(body, size, server.config.limits)
        spec.image, spec.mask = image, mask
        # OpenAI repaints the transparent region from scratch (its pixels are often blank): full strength
        # unless asked otherwise
        default = 1.0 if mask is not None else STRENGTH
        spec.given(strength=body.strength if body.strength is not None else default)
        job = await server.run(spec, request)
        return answer(job, body, request)

    @r.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": title, "object": "model", "created": now, "owned_by": "sd35m-mlx"} for title in server.served]
        return {"object": "list", "data": data}

    return r
