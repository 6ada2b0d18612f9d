"""The settings of one image as our PNGs record them: what `generate()` receives, what the PNG's
A1111-style `parameters` text and exact JSON chunk hold, what `sd35m-mlx --from-image` restores.

Shared by the CLI and the server (and anything else that writes our PNGs); reading PNGs back, with
every field checked, is the CLI's (cli/metadata.py). Imports neither mlx nor the pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"
# Mirrors sd35m_mlx.sampling.samplers.SAMPLERS (tests pin the match); importing it would load mlx for --help.
SAMPLERS = (
    "euler",
    "euler_ancestral",
    "heun",
    "dpm_2",
    "dpm_2_ancestral",
    "dpmpp_2s_ancestral",
    "dpmpp_sde",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m_sde",
    "lcm",
    "ipndm",
    "deis",
    "res_multistep",
    "gradient_estimation",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
)
DTYPES = ("float32", "bfloat16", "float16")

MULTIPLE = 16  # VAE factor 8 x patch size 2
# Size limits for our front ends (CLI, server): MAX_SIDE is SD3.5 Medium's positional table (384 patches x 16 px); the
# pipeline refuses more than a smaller table allows (192 x 16 = 3072 px for SD3 Medium and SD3.5
# Large). The model card's trained range only warns: 0.25-2 megapixels (TRAINED_MP, 2^20 px each)
# and sides of TRAINED_MIN-TRAINED_MAX px (what an --image is fitted to). Small sizes stay allowed for
# tests and previews; far above 2 MP the model repeats its subjects (the two-pass --upscale is the way up).
MIN_SIDE, MAX_SIDE = 64, 6144
TRAINED_MIN, TRAINED_MAX = 256, 1440
TRAINED_MP = (0.25, 2.0)
MAX_SEQUENCE_LENGTH = 512  # T5's limit in diffusers
MAX_SEED = 2**64 - 1  # mx.random.key takes a uint64


@dataclass(frozen=True)
class Settings:
    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = 40
    cfg: float = 4.5
    seed: int = 0
    sampler: str = "euler"
    slg: bool = True
    slg_layers: tuple[int, ...] = (7, 8, 9)  # the model card's choice for SD3.5 Medium
    slg_scale: float = 2.8
    slg_start: float = 0.01
    slg_stop: float = 0.2
    max_sequence_length: int = 256
    t5: bool = True
    dtype: str = "float32"
    quantize: int | None = None  # MMDiT linear layers, bits
    t5_quantize: str | None = None  # "4", "8" or "none"; None: as quantize
    model: str = DEFAULT_MODEL
    image: str | None = None
    strength: float | None = None
    loras: tuple[tuple[str, float, str], ...] = ()  # (source, weight, short sha256) per LoRA
    upscale: float | None = None  # two-pass upscale factor (sd35m_mlx/upscale.py); None: one pass
    upscale_strength: float = 0.35
    upscale_steps: int | None = None  # None: as steps
    upscale_model: str | None = None  # None: the same model
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

    @property
    def upscale_size(self) -> tuple[int, int] | None:
        """(width, height) of the second pass, or None without --upscale."""
        if self.upscale is None:
            return None
        # as sd35m_mlx.upscale.target_size (a test pins it), without importing mlx for --help
        return tuple(max(MULTIPLE, round(v * self.upscale / MULTIPLE) * MULTIPLE) for v in (self.width, self.height))

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
SAMPLER_NAMES = {"euler": "Euler", "dpmpp_2m": "DPM++ 2M"}  # A1111's display names


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
        "Model": _name(s.model),
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
            items["Hires checkpoint"] = _name(s.upscale_model)
    items.update(editing_items(s))
    if not s.t5:
        items["T5"] = "off"
    if s.loras:
        items["Lora hashes"] = hashes_text(s.loras)
    items["Version"] = version
    lines = [s.prompt + prompt_tags(s.loras)]
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
            "Guidance Start": s.control_start,
            "Guidance End": s.control_end,
        }
        items[f"ControlNet {i}"] = ", ".join(f"{k}: {v}" for k, v in fields.items())
    return items


def png_info(s: Settings, version: str) -> PngInfo:
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, parameters_text(s, version))  # PIL switches to iTXt for non-Latin-1 text
    # allow_nan=False: strict JSON readers reject NaN / Infinity (settings are validated before this anyway)
    info.add_text(JSON_KEY, json.dumps({**s.to_json(), "version": version}, ensure_ascii=True, allow_nan=False))
    return info


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
