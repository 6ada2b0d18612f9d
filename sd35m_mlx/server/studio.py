"""What the studio page at / needs that no public API gives: its settings for the resident model
(`GET /studio/config`) and the history, the images of the output folder (server/history.py), listed with
their settings, opened and deleted (`/studio/history`).

Behind the same guards as every route (API key, Host and Origin). With `serve --signed-urls` the listed image
URLs carry a signature, so an `<img src>` opens them without the key (GET only: deleting always needs it).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Query

from ..defaults import GUIDANCE, MULTIPLE, SIZE, STEPS
from ..record import IMAGE_FORMATS, MEDIA_TYPES
from .errors import RequestError
from .files import streamed
from .history import Entry

HISTORY_PAGE = 24  # images per page unless asked
HISTORY_MAX_PAGE = 200
HISTORY_URL_LIFETIME_S = 3600  # a signed history URL: the page lists again long before


def studio_config(server) -> dict:
    """The resident model's sizes and defaults as the page offers them: the lower of the model's limits and
    the server's, and the library's defaults clamped to them (a 384 px model is never offered 1024)."""
    model, limits = server.model, server.config.limits
    pipe_limits = getattr(server.pipe, "limits", None)  # None while a switch loads the next model, and in doubles
    multiple = pipe_limits.size_multiple if pipe_limits is not None else MULTIPLE
    top = min(limits.max_side, model.max_side, pipe_limits.max_side if pipe_limits is not None else model.max_side)
    top = top // multiple * multiple
    default_side = min(SIZE, top)
    return {
        "model": {
            "title": model.name,
            "max_width": top,
            "max_height": top,
            "multiple": multiple,
            "default_width": default_side,
            "default_height": default_side,
            "default_steps": min(STEPS, limits.max_steps),
            "max_steps": limits.max_steps,
            "default_guidance": GUIDANCE,
            "max_count": limits.max_images,
        },
        "output_dir": server.history is not None,
        "lora_dir": server.loras is not None,
        "api_key": bool(server.config.api_key),
        "controlnets": server.controlnets.names(),  # what a ControlNet unit's `model` may name (serve --controlnet)
    }


def router(server) -> APIRouter:
    r = APIRouter(prefix="/studio")

    def history():
        if server.history is None:
            raise RequestError("this server keeps no history: start serve with --output-dir", "name", 404)
        return server.history

    def url(name: str) -> str:
        path = f"/studio/history/{quote(name, safe='')}"
        if server.signer is None:
            return path
        signed = server.signer.query(f"/studio/history/{name}", HISTORY_URL_LIFETIME_S)  # the path as decoded
        return f"{path}?{signed}"

    def item(e: Entry) -> dict:
        return {
            "name": e.name,
            "url": url(e.name),
            "width": e.width,
            "height": e.height,
            "mtime": e.mtime,
            "prompt": e.prompt,
            "negative_prompt": e.negative_prompt,
            "info": e.info,
            "parameters": e.parameters,
        }

    @r.get("/config")
    async def config():
        return studio_config(server)

    @r.get("/history")
    async def history_list(
        offset: int = Query(0, ge=0), limit: int = Query(HISTORY_PAGE, ge=1, le=HISTORY_MAX_PAGE), q: str = ""
    ):
        if server.history is None:
            return {"total": 0, "items": []}
        entries = await asyncio.to_thread(server.history.entries)
        if needle := q.strip().casefold():
            entries = [e for e in entries if needle in e.prompt.casefold()]
        return {"total": len(entries), "items": [item(e) for e in entries[offset : offset + limit]]}

    @r.get("/history/{name}", name="history_file")
    async def history_file(name: str):
        f = await asyncio.to_thread(history().open, name)
        return streamed(f, MEDIA_TYPES[IMAGE_FORMATS[Path(name).suffix.lower()]])

    @r.delete("/history/{name}")
    async def history_delete(name: str):
        await asyncio.to_thread(history().delete, name)
        return {"deleted": name}

    return r
