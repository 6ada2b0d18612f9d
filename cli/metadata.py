"""Generation parameters in PNG text chunks: A1111-style `parameters` for viewers, JSON for exact re-runs.

PNGs come from strangers: what is read is capped (MAX_FIELD_CHARS), parsed in one linear pass, and every
field taken is checked with the generation rules (sd35m_mlx.validation); invalid fields are ignored and
reported, unknown ones ignored.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from PIL import Image

from sd35m_mlx.defaults import PROMPT_SYNTAXES, TEXT_ENCODINGS, UPSCALERS
from sd35m_mlx.prompts.infotext import split_infotext
from sd35m_mlx.record import JSON_KEY, MAX_FIELD_CHARS, PARAMETERS_KEY, stored_text, strip_tags
from sd35m_mlx.sampling.labels import rng_from_label, sampler_from_label, scheduler_from_label
from sd35m_mlx.sampling.noise import RNG_SOURCES
from sd35m_mlx.sampling.schedulers import SCHEDULERS

from .comfyui_png import PROMPT_KEY, comfyui_graph, parse_comfyui
from .errors import UsageError
from .settings import DTYPES, MAX_SIDE, MIN_SIDE, SAMPLERS

MAX_PATH_CHARS = 4096


def parse_parameters(text: str) -> dict:
    """Settings fields from A1111-style `parameters` text (ours, A1111's or another tool's); invalid ones left out."""
    return parse_parameters_noting(text)[0]


def parse_parameters_noting(text: str) -> tuple[dict, dict[str, str]]:
    """parse_parameters, and why each field that was present but invalid was left out (field -> message)."""
    prompt, negative, items = split_infotext(text)
    text_prompt, _ = strip_tags(prompt)  # the LoRA files are named in our JSON only
    raw: dict = {"prompt": text_prompt, "negative_prompt": negative}
    kv = dict(items)
    invalid = {}
    ours = kv.get("Version", "").startswith("sd35m-mlx")
    if "Sampler" in kv:
        if found := sampler_from_label(kv["Sampler"]):
            raw["sampler"] = found[0]
            if found[1]:  # old A1111: "DPM++ 2M Karras"
                raw["scheduler"] = found[1]
        else:
            invalid["sampler"] = f"Sampler {_short(kv['Sampler'])} is not one we run"
    if "Schedule type" in kv:
        if scheduler := scheduler_from_label(kv["Schedule type"]):
            raw["scheduler"] = scheduler
        else:
            invalid["scheduler"] = f"Schedule type {_short(kv['Schedule type'])} is not one we run"
    if "RNG" in kv:
        if rng := rng_from_label(kv["RNG"]):
            raw["rng"] = rng
        else:
            invalid["rng"] = f"RNG {_short(kv['RNG'])} is not a noise source we have"
    elif not ours:
        raw["rng"] = "nv"  # A1111 writes RNG only when it is not its default, the GPU's generator (which NV ports)
    if not ours:
        for key in [k for k in kv if k.startswith("Hires ") or k in _NOT_APPLIED]:
            invalid[key] = f"{key} {_short(kv[key])} is not applied"
    if "Prompt syntax" in kv:
        raw["prompt_syntax"] = kv["Prompt syntax"]
    if "Text encoding" in kv:
        raw["text_encoding"] = kv["Text encoding"]
    for key, name, kind in (
        ("Steps", "steps", int),
        ("CFG scale", "cfg", float),
        ("Seed", "seed", int),
        ("Denoising strength", "strength", float),
        ("SLG scale", "slg_scale", float),
        ("Shift", "shift", float),
    ):
        if key in kv:
            try:
                raw[name] = kind(kv[key])
            except ValueError:  # int() also refuses more than 4,300 digits
                invalid[name] = f"{key} {_short(kv[key])} is not a number"
    if "Size" in kv:
        w, _, h = kv["Size"].partition("x")
        if w.isdecimal() and h.isdecimal() and len(w) < 6 and len(h) < 6:  # (isdigit takes "²", int does not)
            raw["width"], raw["height"] = int(w), int(h)
        else:
            invalid["width"] = f"Size {_short(kv['Size'])} is not WIDTHxHEIGHT"
    fields, unchecked = checked_fields(raw)
    return fields, invalid | unchecked


# A1111 fields that change its picture and that we do not have (beyond the hires fix)
_NOT_APPLIED = ("Clip skip", "ENSD", "Eta", "Variation seed", "Face restoration", "VAE", "Refiner")


def _short(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:40]) + "..."


def _field_rules() -> dict:
    """Field name -> check(value, name) for everything --from-image may take from a PNG."""
    from sd35m_mlx import validation as v

    def optional(rule):
        return lambda x, n: None if x is None else rule(x, n)

    def side(x, n):
        return v.integer(x, n, MIN_SIDE, MAX_SIDE)

    def path(x, n):
        return v.text(x, n, MAX_PATH_CHARS)

    return {
        "prompt": v.text,
        "negative_prompt": v.text,
        "width": side,
        "height": side,
        "steps": lambda x, n: v.integer(x, n, 1, v.MAX_STEPS),
        "cfg": lambda x, n: v.real(x, n, 0.0, v.MAX_GUIDANCE),
        "seed": lambda x, n: v.integer(x, n, 0, v.MAX_SEED),
        "sampler": lambda x, n: v.choice(x, n, SAMPLERS),
        "scheduler": lambda x, n: v.choice(x, n, SCHEDULERS),
        "shift": optional(lambda x, n: v.real(x, n, 0.0, 1e6, open_low=True)),
        "rng": lambda x, n: v.choice(x, n, RNG_SOURCES),
        "prompt_syntax": lambda x, n: v.choice(x, n, PROMPT_SYNTAXES),
        "text_encoding": lambda x, n: v.choice(x, n, TEXT_ENCODINGS),
        "slg": v.boolean,
        "slg_layers": lambda x, n: v.layer_indices(x, n, None) or (),
        "slg_scale": lambda x, n: v.real(x, n, 0.0, v.MAX_GUIDANCE),
        "slg_start": lambda x, n: v.real(x, n, 0.0, 1.0),
        "slg_stop": lambda x, n: v.real(x, n, 0.0, 1.0),
        "max_sequence_length": lambda x, n: v.integer(x, n, 1, v.MAX_SEQUENCE_LENGTH),
        "t5": v.boolean,
        "dtype": lambda x, n: v.choice(x, n, DTYPES),
        "quantize": optional(lambda x, n: v.choice(x, n, (4, 8))),
        "t5_quantize": optional(lambda x, n: v.choice(x, n, ("4", "8", "none"))),
        "model": lambda x, n: v.text(x, n, MAX_PATH_CHARS),
        "image": optional(lambda x, n: v.text(x, n, MAX_PATH_CHARS)),
        "strength": optional(lambda x, n: v.real(x, n, 0.0, 1.0, open_low=True)),
        "loras": stored_loras,
        "upscale": optional(lambda x, n: v.real(x, n, 1.0, 4.0)),
        "upscale_strength": lambda x, n: v.real(x, n, 0.0, 1.0, open_low=True),
        "upscale_steps": optional(lambda x, n: v.integer(x, n, 1, v.MAX_STEPS)),
        "upscale_model": optional(lambda x, n: v.text(x, n, MAX_PATH_CHARS)),
        "upscaler": lambda x, n: v.choice(x, n, tuple(UPSCALERS)),
        "upscale_prompt": optional(v.text),
        "upscale_negative_prompt": optional(v.text),
        # editing inputs (cli/editing.py checks them again, and reads the files, as for the command line)
        "mask": optional(path),
        "padding_mask_crop": optional(lambda x, n: v.integer(x, n, 0, 1 << 16)),
        "outpaint": optional(lambda x, n: v.text(x, n, 64)),
        "outpaint_fill": lambda x, n: v.choice(x, n, ("edge", "blur")),
        "outpaint_feather": lambda x, n: v.integer(x, n, 0, 1 << 16),
        "controlnets": lambda x, n: _list(x, n, path),
        "control_images": lambda x, n: _list(x, n, path),
        "control_scales": lambda x, n: _list(x, n, lambda y, m: v.real(y, m, -v.MAX_GUIDANCE, v.MAX_GUIDANCE)),
        "control_start": lambda x, n: v.real(x, n, 0.0, 1.0),
        "control_end": lambda x, n: v.real(x, n, 0.0, 1.0),
        "control_preprocess": optional(lambda x, n: v.choice(x, n, ("canny",))),
        "control_thresholds": _thresholds,
    }


MAX_CONTROLNETS = 8


def _thresholds(value, name: str) -> tuple[int, int]:
    """canny's [low, high], each 1-255 (as the A1111 ControlNet extension's sliders)."""
    from sd35m_mlx import validation as v

    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise v.InvalidValue(f"{name} must be [low, high]")
    return tuple(v.integer(x, name, 1, 255) for x in value)


def _list(value, name: str, rule) -> tuple:
    """A stored list of at most MAX_CONTROLNETS entries, each passing `rule`."""
    from sd35m_mlx import validation as v

    if not isinstance(value, (list, tuple)) or len(value) > MAX_CONTROLNETS:
        raise v.InvalidValue(f"{name} must be a list of at most {MAX_CONTROLNETS} entries")
    return tuple(rule(x, name) for x in value)


MAX_LORAS = 64


def stored_loras(value, name: str) -> tuple:
    """[[source, weight, sha256], ...] from our JSON chunk, each part checked (cli/lora.py re-finds the files)."""
    from sd35m_mlx import validation as v

    if not isinstance(value, (list, tuple)) or len(value) > MAX_LORAS:
        raise v.InvalidValue(f"{name} must be a list of at most {MAX_LORAS} [source, weight, sha256] entries")
    out = []
    for entry in value:
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise v.InvalidValue(f"{name} entries must be [source, weight, sha256], got {_short(repr(entry))}")
        source, weight, sha = entry
        out.append(
            (
                v.text(source, name, MAX_PATH_CHARS),
                v.real(weight, name, -v.MAX_GUIDANCE, v.MAX_GUIDANCE),
                v.text(sha, name, 64),
            )
        )
    return tuple(out)


def checked_fields(raw: dict) -> tuple[dict, dict[str, str]]:
    """The entries of `raw` that name a Settings field and pass its check; messages for those that fail."""
    from sd35m_mlx.validation import InvalidInput

    fields, invalid = {}, {}
    for name, rule in _field_rules().items():
        if name in raw:
            try:
                fields[name] = rule(raw[name], name)
            except InvalidInput as e:
                invalid[name] = str(e)
    return fields, invalid


def read_settings(path: str | Path) -> dict:
    """The settings stored in a PNG: our JSON chunk when present, else parsed `parameters` text."""
    return read_settings_noting(path)[0]


def read_settings_noting(path: str | Path) -> tuple[dict, dict[str, str]]:
    """read_settings, and why each stored value that was invalid was left out (field -> message)."""
    try:
        with Image.open(path) as im:
            text = stored_text(im)  # PNG text chunks, or a JPEG's / WebP's EXIF
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError) as e:
        raise UsageError(f"--from-image: cannot read {path}: {e}") from None
    for key in (JSON_KEY, PARAMETERS_KEY):
        if len(text.get(key, "")) > MAX_FIELD_CHARS:
            raise UsageError(
                f"--from-image: {path}'s {key!r} text is {len(text[key]):,} characters; "
                f"at most {MAX_FIELD_CHARS:,} are read"
            )
    broken = {}
    if JSON_KEY in text:
        try:
            stored = json.loads(text[JSON_KEY])  # NaN / Infinity load as floats; the field checks refuse them
        except (ValueError, RecursionError):
            stored = None  # damaged JSON: fall back to the human-readable chunk
        if isinstance(stored, dict):
            return checked_fields(stored)
        broken = {"json": f"its {JSON_KEY!r} JSON chunk is broken; read the parameters text instead"}
    if PARAMETERS_KEY in text:
        fields, invalid = parse_parameters_noting(text[PARAMETERS_KEY])
        return fields, broken | invalid
    if len(text.get(PROMPT_KEY, "")) <= MAX_FIELD_CHARS and (graph := comfyui_graph(text.get(PROMPT_KEY, ""))):
        raw, notes = parse_comfyui(graph)
        fields, invalid = checked_fields(raw)
        return fields, broken | {f"comfyui {i}": note for i, note in enumerate(notes)} | invalid
    raise UsageError(f"--from-image: {path} holds no generation parameters")
