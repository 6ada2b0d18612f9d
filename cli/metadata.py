"""Generation parameters in PNG text chunks: A1111-style `parameters` for viewers, JSON for exact re-runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import UsageError
from .settings import Settings

JSON_KEY = "sd35m-mlx"
PARAMETERS_KEY = "parameters"  # what AUTOMATIC1111, Civitai and most image viewers read
SAMPLER_NAMES = {"euler": "Euler", "dpmpp_2m": "DPM++ 2M"}  # A1111's display names

# A1111's own pattern for the `Key: value, Key: "quoted, value"` line.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(value: str) -> str:
    return json.dumps(value) if any(c in value for c in ',:"\n') else value


def parameters_text(s: Settings, version: str) -> str:
    """prompt / `Negative prompt: ...` (omitted when empty, as A1111 does) / `Steps: 40, Sampler: ...`."""
    items = {
        "Steps": s.steps,
        "Sampler": SAMPLER_NAMES.get(s.sampler, s.sampler),
        "CFG scale": s.cfg,
        "Seed": s.seed,
        "Size": f"{s.width}x{s.height}",
        # The folder name only: a full local path would leak the user's file system into shared images.
        "Model": Path(s.model).name if Path(s.model).is_absolute() else s.model,
    }
    if s.image is not None:
        items["Denoising strength"] = s.strength
    if s.slg and s.cfg > 1:
        items["SLG scale"] = s.slg_scale
        items["SLG layers"] = ",".join(map(str, s.slg_layers))
    if s.upscale is not None:  # A1111's names for its two-pass ("hires fix") settings
        items["Hires upscale"] = s.upscale
        items["Hires resize"] = "{}x{}".format(*s.upscale_size)
        items["Hires steps"] = s.upscale_steps or s.steps
        items["Hires upscaler"] = "Lanczos"
        items["Hires denoising strength"] = s.upscale_strength
        if s.upscale_model is not None:
            model = s.upscale_model
            items["Hires checkpoint"] = Path(model).name if Path(model).is_absolute() else model
    if not s.t5:
        items["T5"] = "off"
    items["Version"] = version
    lines = [s.prompt]
    if s.negative_prompt:
        lines.append(f"Negative prompt: {s.negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in items.items()))
    return "\n".join(lines)


def png_info(s: Settings, version: str) -> PngInfo:
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, parameters_text(s, version))  # PIL switches to iTXt for non-Latin-1 text
    info.add_text(JSON_KEY, json.dumps({**s.to_json(), "version": version}, ensure_ascii=True))
    return info


def parse_parameters(text: str) -> dict:
    """Settings fields from A1111-style `parameters` text (ours, A1111's or another tool's)."""
    lines = text.strip().split("\n")
    kv_line = lines.pop() if lines and len(_PARAM.findall(lines[-1])) >= 3 else ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    out: dict = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip()}
    kv = {}
    for key, value in _PARAM.findall(kv_line):
        if value.startswith('"'):
            value = json.loads(value)
        kv[key.strip()] = value.strip()
    sampler = {v: k for k, v in SAMPLER_NAMES.items()}.get(kv.get("Sampler", ""))
    if sampler:
        out["sampler"] = sampler
    for key, name, kind in (
        ("Steps", "steps", int),
        ("CFG scale", "cfg", float),
        ("Seed", "seed", int),
        ("Denoising strength", "strength", float),
        ("SLG scale", "slg_scale", float),
    ):
        try:
            out[name] = kind(kv[key])
        except (KeyError, ValueError):
            pass
    if m := re.fullmatch(r"(\d+)x(\d+)", kv.get("Size", "")):
        out["width"], out["height"] = int(m[1]), int(m[2])
    return out


def read_settings(path: str | Path) -> dict:
    """The settings stored in a PNG: our JSON chunk when present, else parsed `parameters` text."""
    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
    except (OSError, ValueError) as e:
        raise UsageError(f"--from-image: cannot read {path}: {e}") from None
    if JSON_KEY in text:
        try:
            return Settings.known_fields(json.loads(text[JSON_KEY]))
        except (ValueError, AttributeError):
            pass  # damaged JSON: fall back to the human-readable chunk
    if PARAMETERS_KEY in text:
        return parse_parameters(text[PARAMETERS_KEY])
    raise UsageError(f"--from-image: {path} holds no generation parameters")
