"""A1111's /internal routes that API clients call: SillyTavern pings `/internal/ping` before it lists models,
and bug-report helpers read `/internal/sysinfo`. As A1111 answers them (modules/ui.py `setup_ui_api`, commit
0027ce1f6e58c5f4279173e468a60aef420babfe): ping is `{}`, sysinfo is JSON sent as text, the quicksettings hint
lists settings (we have none a client can set besides the checkpoint, which /sdapi/v1/options covers).
"""

from __future__ import annotations

import json
import platform
import time

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse


def router(server) -> APIRouter:
    r = APIRouter(prefix="/internal")

    @r.get("/ping")
    async def ping() -> dict:
        return {}

    @r.get("/sysinfo")
    async def sysinfo():
        """The machine in A1111's sysinfo keys where we have the fact; no local path (unlike A1111's)."""
        text = json.dumps(sysinfo_facts(server), indent=4)
        filename = f"sysinfo-{time.strftime('%Y-%m-%d-%H-%M', time.gmtime())}.json"
        return PlainTextResponse(text, headers={"Content-Disposition": f'inline; filename="{filename}"'})

    @r.get("/quicksettings-hint")
    async def quicksettings_hint() -> list[dict]:
        return [{"name": "sd_model_checkpoint", "label": "Stable Diffusion checkpoint"}]

    return r


def sysinfo_facts(server) -> dict:
    from ..doctor.environment import environment
    from ..sampling.memory import physical_memory

    facts = {c.name: c.detail for c in environment() if c.name != "python"}  # its detail holds a local path
    return {
        "Platform": platform.platform(),
        "Python": platform.python_version(),
        "Version": server.worker.version,
        "Model": server.model.name,
        "RAM": {"total": physical_memory()},
        "Environment": facts,
    }
