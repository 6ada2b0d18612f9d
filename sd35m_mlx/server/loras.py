"""LoRAs by name for both dialects: `<lora:NAME:WEIGHT>` tags in a prompt (and the OpenAI extension
`loras: [{"name", "weight"}]`, written as tags) resolved in `serve --lora-dir`, A1111's `GET /sdapi/v1/loras`
and `POST /sdapi/v1/refresh-loras`, and switching the pipeline's adapters inside the job (one job at a time).

Names are keys of the folder's listing (lora/library.py), never paths: no request reads outside the folder,
and no answer holds an absolute path.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from ..lora.library import LoraLibrary, tagged_loras
from ..prompts.syntax import MAX_WEIGHT
from .errors import RequestError
from .spec import Spec


class LoraRef(BaseModel):
    """The OpenAI dialect's extension (as stable-diffusion.cpp's server takes it)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    weight: float = 1.0


def as_tags(loras: list[LoraRef] | None) -> str:
    """The extension's LoRAs as prompt tags, so the PNG's prompt replays them (`sd35m-mlx --from-image`)."""
    out = ""
    for ref in loras or []:
        if any(c in ref.name for c in "<>:") or not -MAX_WEIGHT <= ref.weight <= MAX_WEIGHT:
            raise RequestError(f"loras: {ref.name!r} with weight {ref.weight} is not a LoRA name and weight", "loras")
        out += f" <lora:{ref.name}:{ref.weight:g}>"
    return out


def resolve(spec: Spec, library: LoraLibrary | None) -> None:
    """Find the prompt's tags in the library (lora/library.py `tagged_loras`): `spec.lora_files` to load,
    `settings.lora_tags` to record. Anything wrong: RequestError (400), with no local path in it."""
    try:
        s = spec.settings
        found = tagged_loras(s.prompt, s.negative_prompt, library, "start serve with --lora-dir")
        hires = None
        if s.upscale_prompt is not None or s.upscale_negative_prompt is not None:  # hires fix (hires.py)
            hires = tagged_loras(s.upscale_prompt if s.upscale_prompt is not None else s.prompt,
                                 s.upscale_negative_prompt or "", library, "start serve with --lora-dir")  # fmt: skip
    except (ValueError, TypeError) as e:
        folder = str(library.folder) if library is not None else None
        raise RequestError(str(e).replace(folder, "the LoRA folder") if folder else str(e), "prompt") from None
    spec.settings = replace(spec.settings, lora_tags=tuple((e.name, w, "") for e, w in found))
    spec.lora_files = [(str(e.path), w) for e, w in found]
    if s.upscale_prompt is not None:
        spec.upscale_loras = [(e.name, str(e.path), w) for e, w in hires]


def lora_error(e: Exception, loras: list[tuple[str, str, float]]) -> RequestError:
    """A LoRA file that does not fit this model, or gone since the listing, as a 400 naming it by the name the
    client gave (`loras`: (name, file, weight)), never by the server's path."""
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    for name, path, _ in loras:
        message = message.replace(path, name)
    return RequestError(f"LoRA: {message}", "prompt")


def activate(pipe, spec: Spec, cache_bytes: int | None = None) -> None:
    """In the job: exactly the request's LoRAs active (loaded ones reused, lora/pipeline_mixin.use_loras, within
    `cache_bytes` of adapters kept loaded, `serve --lora-cache-mb`; None: the library's default), and their
    hashes into the settings the PNG records. A pipeline with no adapters and a request with none: nothing."""
    if not hasattr(pipe, "use_loras"):
        return
    pipe.lora_cache_bytes = cache_bytes  # also for the hires fix's second pass (hires.py)
    if not (spec.lora_files or pipe.get_active_adapters()):
        return
    try:
        names = pipe.use_loras(spec.lora_files)
    except (ValueError, OSError) as e:  # a file that does not fit this model, or gone since the listing
        tags = spec.settings.lora_tags
        raise lora_error(e, [(n, p, w) for (p, w), (n, _, _) in zip(spec.lora_files, tags, strict=True)]) from None
    hashes = {item["name"]: item["sha256"] for item in pipe.lora_info()}
    tags = spec.settings.lora_tags
    spec.settings = replace(
        spec.settings, lora_tags=tuple((n, w, hashes.get(a, "")) for (n, w, _), a in zip(tags, names, strict=True))
    )


def router(server) -> APIRouter:
    r = APIRouter(prefix="/sdapi/v1")

    @r.get("/loras")
    async def loras() -> list[dict]:
        library = server.loras
        if library is None:
            return []
        root = library.folder.resolve()
        return [
            {"name": e.name, "alias": e.alias, "path": e.path.relative_to(root).as_posix(), "metadata": e.metadata}
            for e in library.entries()
        ]

    @r.post("/refresh-loras")
    async def refresh_loras() -> None:
        if server.loras is not None:
            await asyncio.to_thread(server.loras.refresh)

    return r
