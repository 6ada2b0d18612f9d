"""The settings of one image as our PNGs record them: what `generate()` receives, what the PNG's
A1111-style `parameters` text and exact JSON chunk hold, what `sd35m-mlx --from-image` restores.

Shared by the CLI and the server (and anything else that writes our PNGs); reading PNGs back, with
every field checked, is the CLI's (cli/metadata.py). Imports neither mlx nor the pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo, PngStream

from . import defaults as D
from .defaults import MAX_SIDE, MIN_SIDE, MULTIPLE, TRAINED_MAX, TRAINED_MIN
from .prompts.syntax import extract_lora_tags
from .sampling.labels import RNG_LABELS, sampler_label, scheduler_label

# The longest settings text read from a stranger's image (--from-image, the server's history): our own are a few
# KB (prompts are capped at 10,000 characters); A1111's rarely pass 10 KB.
MAX_FIELD_CHARS = 64 * 1024


@dataclass(frozen=True)
class Settings:
    prompt: str
    negative_prompt: str = ""
    width: int = D.SIZE
    height: int = D.SIZE
    steps: int = D.STEPS
    cfg: float = D.GUIDANCE
    seed: int = 0
    sampler: str = D.SAMPLER
    scheduler: str = D.SCHEDULER
    shift: float | None = None  # None: the model's own
    rng: str = D.RNG  # a PNG that does not record it drew its noise with "mlx" (cli/metadata.py)
    prompt_syntax: str = "plain"  # a PNG that does not record it was encoded plain (the CLI's default is weighted)
    text_encoding: str = D.TEXT_ENCODING  # "diffusers" or "comfyui"; absent from a PNG: diffusers
    slg: bool = True
    slg_layers: tuple[int, ...] = D.SLG_LAYERS
    slg_scale: float = D.SLG_SCALE
    slg_start: float = D.SLG_START
    slg_stop: float = D.SLG_STOP
    max_sequence_length: int = D.SEQUENCE_LENGTH
    t5: bool = True
    dtype: str = "float32"
    quantize: int | None = None  # MMDiT linear layers, bits
    t5_quantize: str | None = None  # "4", "8" or "none"; None: as quantize
    model: str = D.DEFAULT_MODEL
    image: str | None = None
    strength: float | None = None
    loras: tuple[tuple[str, float, str], ...] = ()  # (source, weight, short sha256) per LoRA
    # the prompt's `<lora:NAME:W>` tags as resolved in a LoRA folder: (NAME, weight, short sha256), for the record;
    # a re-run resolves the tags again (they stay in `prompt`, as A1111 keeps them)
    lora_tags: tuple[tuple[str, float, str], ...] = ()
    upscale: float | None = None  # two-pass upscale factor (sd35m_mlx/upscale.py); None: one pass
    upscale_strength: float = 0.35
    upscale_steps: int | None = None  # None: as steps
    upscale_model: str | None = None  # None: the same model
    upscaler: str = "lanczos"  # the enlargement between the passes (sd35m_mlx/upscale.py UPSCALERS)
    upscale_prompt: str | None = None  # the second pass's prompt (A1111's hr_prompt, LoRA tags kept); None: prompt's
    upscale_negative_prompt: str | None = None
    # editing inputs as the command line gave them (cli/editing.py), so --from-image replays them
    mask: str | None = None
    padding_mask_crop: int | None = None
    outpaint: str | None = None  # "L,T,R,B" margins in px
    outpaint_fill: str = "edge"
    outpaint_feather: int = 32
    controlnets: tuple[str, ...] = ()
    control_images: tuple[str, ...] = ()
    control_scales: tuple[float, ...] = ()
    control_start: float = 0.0
    control_end: float = 1.0
    control_preprocess: str | None = None
    control_thresholds: tuple[int, int] = (100, 200)  # canny's low/high (editing/preprocess.py); the server sets them

    @property
    def upscale_size(self) -> tuple[int, int] | None:
        """(width, height) of the second pass, or None without --upscale."""
        if self.upscale is None:
            return None
        return D.scaled_size(self.width, self.height, self.upscale)

    @property
    def encoder_prompt(self) -> str:
        """The prompt as generate() reads it: `<lora:...>` tags removed (they name LoRAs, cli/lora.py, server)."""
        return extract_lora_tags(self.prompt)[0]

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `StableDiffusion35.generate` (the prompt first, positionally)."""
        kwargs = dict(
            negative_prompt=self.negative_prompt,
            width=self.width,
            height=self.height,
            num_inference_steps=self.steps,
            guidance_scale=self.cfg,
            seed=self.seed,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
            sampler=self.sampler,
            scheduler=self.scheduler,
            shift=self.shift,
            rng=self.rng,
            prompt_syntax=self.prompt_syntax,
            text_encoding=self.text_encoding,
            skip_guidance_layers=list(self.slg_layers) if self.slg else None,
            skip_layer_guidance_scale=self.slg_scale,
            skip_layer_guidance_start=self.slg_start,
            skip_layer_guidance_stop=self.slg_stop,
        )
        if self.image is not None:
            kwargs.update(image=self.image, strength=self.strength)
        return kwargs

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["slg_layers"] = list(self.slg_layers)
        return d

    def fit_slg(self, num_layers: int) -> Settings:
        """The default SLG layers (the model card's 7, 8, 9) only where a model of `num_layers` blocks has them;
        SLG off where it has none. Other layers (restored from a PNG) are left for the validator to refuse."""
        if not self.slg or self.slg_layers != D.SLG_LAYERS:
            return self
        kept = tuple(i for i in self.slg_layers if i < num_layers)
        if kept == self.slg_layers:
            return self
        return dataclasses.replace(self, slg_layers=kept) if kept else dataclasses.replace(self, slg=False)


def random_seed() -> int:
    return secrets.randbelow(2**32)  # 32-bit: easy to type back


def plan_seeds(seeds: Sequence[int], n: int) -> list[int]:
    """The given seeds, then +1 from the last up to n images (as A1111 does); from a random one if none."""
    out = list(seeds) or [random_seed()]
    while len(out) < n:
        out.append((out[-1] + 1) % (D.MAX_SEED + 1))
    return out


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


JSON_KEY = "sd35m-mlx"
PARAMETERS_KEY = "parameters"  # what AUTOMATIC1111, Civitai and most image viewers read


def _quote(value: str) -> str:
    return json.dumps(value) if any(c in value for c in ',:"\n') else value


def parameters_text(s: Settings, version: str) -> str:
    """prompt / `Negative prompt: ...` (omitted when empty, as A1111 does) / `Steps: 40, Sampler: ...`."""
    items = {
        "Steps": s.steps,
        "Sampler": sampler_label(s.sampler),
        "Schedule type": scheduler_label(s.scheduler),
        "CFG scale": s.cfg,
        "Seed": s.seed,
        "Size": f"{s.width}x{s.height}",
        "Model": _name(s.model),
        "RNG": RNG_LABELS[s.rng],
    }
    if s.shift is not None:
        items["Shift"] = s.shift
    if s.prompt_syntax != "plain":  # absent: plain, as every PNG written before the option
        items["Prompt syntax"] = s.prompt_syntax
    if s.text_encoding != D.TEXT_ENCODING:  # absent: diffusers, as every PNG written before the option
        items["Text encoding"] = s.text_encoding
    if s.image is not None:
        items["Denoising strength"] = s.strength
    if s.slg and s.cfg > 1:
        items["SLG scale"] = s.slg_scale
        items["SLG layers"] = ",".join(map(str, s.slg_layers))
    if s.upscale is not None:  # A1111's names for its two-pass ("hires fix") settings
        items["Hires upscale"] = s.upscale
        items["Hires resize"] = "{}x{}".format(*s.upscale_size)
        items["Hires steps"] = s.upscale_steps or s.steps
        items["Hires upscaler"] = D.UPSCALERS.get(s.upscaler, s.upscaler)
        items["Hires denoising strength"] = s.upscale_strength
        if s.upscale_model is not None:
            items["Hires checkpoint"] = _name(s.upscale_model)
        if s.upscale_prompt is not None:  # A1111 writes these only when they differ from the first pass's
            items["Hires prompt"] = s.upscale_prompt
        if s.upscale_negative_prompt is not None:
            items["Hires negative prompt"] = s.upscale_negative_prompt
    items.update(editing_items(s))
    if not s.t5:
        items["T5"] = "off"
    if s.loras or s.lora_tags:
        items["Lora hashes"] = hashes_text(s.loras + s.lora_tags)
    items["Version"] = version
    lines = [s.prompt + prompt_tags(s.loras)]  # the tags' LoRAs (lora_tags) are in the prompt already
    if s.negative_prompt:
        lines.append(f"Negative prompt: {s.negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in items.items()))
    return "\n".join(lines)


def _name(path: str) -> str:
    """A local path's last part only in the shared text: a full path would leak the user's file system
    into shared images (Hub ids and relative paths stay as given)."""
    return Path(path).name if Path(path).is_absolute() else path


def editing_items(s: Settings) -> dict:
    """Inpainting, outpainting and ControlNet in the `parameters` text; ControlNets as the A1111 ControlNet
    extension writes them (`ControlNet 0: "Module: canny, Model: ..., Weight: 1.0, ..."`)."""
    items: dict = {}
    if s.mask is not None:
        items["Inpaint mask"] = _name(s.mask)
        if s.padding_mask_crop is not None:
            items["Inpaint padding"] = s.padding_mask_crop
    if s.outpaint is not None:
        items.update({"Outpaint": s.outpaint, "Outpaint fill": s.outpaint_fill, "Outpaint feather": s.outpaint_feather})
    scales = s.control_scales * len(s.controlnets) if len(s.control_scales) == 1 else s.control_scales
    for i, (net, image) in enumerate(zip(s.controlnets, s.control_images, strict=False)):
        fields = {
            "Module": s.control_preprocess or "none",
            "Model": _name(net),
            "Image": _name(image),
            "Weight": scales[i] if i < len(scales) else 1.0,
            # the A1111 extension's names; written only when not canny's defaults (the CLI's PNGs stay as they were)
            **(
                dict(zip(("Threshold A", "Threshold B"), s.control_thresholds, strict=True))
                if s.control_preprocess == "canny" and tuple(s.control_thresholds) != (100, 200)
                else {}
            ),
            "Guidance Start": s.control_start,
            "Guidance End": s.control_end,
        }
        items[f"ControlNet {i}"] = ", ".join(f"{k}: {v}" for k, v in fields.items())
    return items


def png_info(s: Settings, version: str) -> PngInfo:
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, parameters_text(s, version))  # PIL switches to iTXt for non-Latin-1 text
    info.add_text(JSON_KEY, json_text(s, version))
    return info


def json_text(s: Settings, version: str) -> str:
    # allow_nan=False: strict JSON readers reject NaN / Infinity (settings are validated before this anyway)
    return json.dumps({**s.to_json(), "version": version}, ensure_ascii=True, allow_nan=False)


# -- JPEG and WebP: no text chunks, so the settings go in EXIF, where A1111 puts them -------------------
# A1111 (modules/images.py, save_image_with_geninfo) writes the `parameters` text as the Exif UserComment,
# "UNICODE\0" + UTF-16 big-endian (piexif's "unicode" encoding), and reads it back from there. Our JSON
# goes in the Exif MakerNote, the field EXIF leaves to the maker's own data: viewers do not show it as a
# caption, and it needs no XMP packet.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
QUALITY = 95  # JPEG / WebP quality unless told otherwise (A1111's default is 80; 95 keeps the detail)
_EXIF_IFD, _USER_COMMENT, _MAKER_NOTE = 0x8769, 0x9286, 0x927C
_MAKER_PREFIX = JSON_KEY.encode() + b"\0"  # what tells our MakerNote from a camera's


def save_options(fmt: str, parameters: str, json_data: str, quality: int = QUALITY) -> dict:
    """PIL `Image.save` keyword arguments writing `fmt` ("PNG", "JPEG", "WEBP") with the settings in it."""
    if fmt == "PNG":
        info = PngInfo()
        info.add_text(PARAMETERS_KEY, parameters)
        info.add_text(JSON_KEY, json_data)
        return {"format": "PNG", "pnginfo": info}
    exif = Image.Exif()
    ifd = exif.get_ifd(_EXIF_IFD)
    ifd[_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
    ifd[_MAKER_NOTE] = _MAKER_PREFIX + json_data.encode("ascii")
    return {"format": fmt, "exif": exif, "quality": quality}


def settings_save_options(s: Settings, version: str, fmt: str = "PNG", quality: int = QUALITY) -> dict:
    return save_options(fmt, parameters_text(s, version), json_text(s, version), quality)


def stored_text(im: Image.Image) -> dict[str, str]:
    """The settings an image carries, by key (PARAMETERS_KEY, JSON_KEY): PNG text chunks, or EXIF as
    save_options (and A1111) write it."""
    if im.format == "PNG":
        return _png_text(im)
    text = dict(getattr(im, "text", {}) or {})
    if text:
        return text
    ifd = im.getexif().get_ifd(_EXIF_IFD)
    comment, note = ifd.get(_USER_COMMENT), ifd.get(_MAKER_NOTE)
    if isinstance(comment, bytes):
        head, body = comment[:8], comment[8:]
        codec = "utf-16-le" if body[:2] == b"\xff\xfe" or (body[1:2] == b"\0" and body[:1] != b"\0") else "utf-16-be"
        codec = codec if head == b"UNICODE\0" else "latin-1"
        text[PARAMETERS_KEY] = body.decode(codec, "replace").lstrip("\ufeff").rstrip("\0")
    elif isinstance(comment, str):
        text[PARAMETERS_KEY] = comment
    if isinstance(note, bytes) and note.startswith(_MAKER_PREFIX):
        text[JSON_KEY] = note[len(_MAKER_PREFIX) :].decode("ascii", "replace")
    return text


def _png_text(im: Image.Image) -> dict[str, str]:
    """Every text chunk of a PNG, before the pixels (where we and A1111 write them) or after (some tools), read
    without decoding the pixels: Pillow's `im.text` decodes the whole image to reach the trailing chunks, which
    for a stranger's 9000x9000 PNG is 250 MB and seconds. The chunks are walked by their headers, the image
    data skipped; each text chunk is read by Pillow's own reader, with its limits. A broken or truncated chunk
    ends the walk with what was read so far."""
    fp = getattr(im, "fp", None)
    if fp is None:  # closed, or not from a file: Pillow's way
        return {k: str(v) for k, v in (getattr(im, "text", {}) or {}).items()}
    where = fp.tell()
    png = PngStream(fp)
    try:
        fp.seek(8)  # past the signature
        while True:
            cid, start, length = png.read()
            if cid == b"IEND":
                break
            if cid in (b"tEXt", b"zTXt", b"iTXt"):
                png.call(cid, start, length)
            fp.seek(start + length + 4)  # past the data and the CRC
    except (SyntaxError, ValueError, EOFError, OSError, struct.error, zlib.error):
        pass
    finally:
        fp.seek(where)
    return {k: str(v) for k, v in png.im_text.items()}


# -- LoRAs in the A1111 text: `<lora:name:scale>` tags on the prompt line and a `Lora hashes` item ----

Loras = tuple[tuple[str, float, str], ...]  # (source as given, weight, short sha256) per LoRA
_TAG = re.compile(r"<lora:([^:>]+):([-+0-9.eE]+)>")  # no leading \s*: that would rescan long blank runs


def display_name(source: str) -> str:
    return Path(source).stem


def prompt_tags(loras: Loras) -> str:
    """A1111's `<lora:name:scale>` tags, appended to the prompt line of the `parameters` text."""
    return "".join(f" <lora:{display_name(src)}:{w:g}>" for src, w, _ in loras)


def hashes_text(loras: Loras) -> str:
    """A1111 / Civitai's `Lora hashes` value: `name: hash, name: hash`."""
    return ", ".join(f"{display_name(src)}: {sha}" for src, _, sha in loras)


def strip_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """(prompt without `<lora:...>` tags, [(name, scale), ...])."""
    tags = [(m[1], float(m[2])) for m in _TAG.finditer(prompt)]
    return _TAG.sub("", prompt).strip(), tags
