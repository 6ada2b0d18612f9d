"""ControlNets by name (`serve --controlnet SOURCE`) and the A1111 ControlNet extension's API on them.

A request names a ControlNet by its public name (the folder or file stem, or a Hub id's last part), never by a
path: nothing a client sends can load a file that `serve` did not list. Each is loaded on first use, in the job
worker's thread (through the pipeline's `load_controlnet`, with the model's quantization), and kept for later jobs;
a job makes exactly its units' ControlNets the pipeline's for its `generate` calls.

The request side follows sd-webui-controlnet (Mikubill/sd-webui-controlnet at 56cec5b2958edf3b1807b7e7b2b1b5186dbd2f81,
internal_controlnet/args.py `ControlNetUnit`, scripts/api.py, scripts/controlnet.py `detectmap_proc`):
`alwayson_scripts.controlnet.args` is a list of units `{enabled, image (or input_image), module, model, weight,
guidance_start, guidance_end, resize_mode, threshold_a, threshold_b, ...}`. What we run differently: canny runs at
the control image's own resolution (not `processor_res`), and the fitted image is resized by `generate` (Lanczos)
rather than the extension's edge-preserving resize; `control_mode` other than Balanced, unit masks and
`pixel_perfect` are not acted on (named in info.warnings).
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Request
from PIL import Image

from .errors import RequestError
from .uploads import decode_base64, json_object, open_image

API_VERSION = 3  # what the extension's /controlnet/version answers (internal_controlnet/external_code.py)
MODULES = ("none", "canny")
CANNY_DEFAULTS = (100, 200)  # the extension's canny sliders (scripts/preprocessor/model_free_preprocessors.py)
CANNY_RANGE = (1, 255)  # a threshold outside it falls back to the default, as the extension's bound_check_params
MAX_WEIGHT = 2.0  # the extension's `weight` field: 0..2
MAX_UNITS = 4
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")  # the extension's ResizeMode, by int value
RESIZE_ALIASES = {
    "Inner Fit (Scale to Fit)": "Crop and Resize",
    "Outer Fit (Shrink to Fit)": "Resize and Fill",
    "Scale to Fit (Inner Fit)": "Crop and Resize",
    "Envelope (Outer Fit)": "Resize and Fill",
}
UNIT_IMAGE = "(uploaded)"  # what the PNG records as a ControlNet's image: the server has no path for it
_HASH_SUFFIX = re.compile(r"\s*\[[^\]]*\]$")  # A1111 model titles carry " [hash]"


def public_name(source: str) -> str:
    """A ControlNet's public name: a local folder or file by its stem, a Hub id by its last part."""
    path = Path(source).expanduser()
    if path.exists() or path.is_absolute():
        return path.stem if path.is_file() else path.name
    return source.rstrip("/").rsplit("/", 1)[-1]


class ControlNetLibrary:
    """name -> source, as `serve --controlnet` listed them; the loaded models, cached (worker thread only)."""

    def __init__(self, sources: dict[str, str], quantize: int | None = None, cache_bytes: int | None = None):
        self.sources = dict(sources)
        self.quantize = quantize
        self.cache_bytes = cache_bytes  # None: the LoRA cache's default (lora/pipeline_mixin.py)
        self._loaded: OrderedDict[str, object] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self.sources)

    def choose(self, name, param: str) -> str:
        """The name a client gave (A1111's " [hash]" suffix dropped), or a 400 naming the choices."""
        wanted = _HASH_SUFFIX.sub("", name) if isinstance(name, str) else None
        if wanted in self.sources:
            return wanted
        if not self.sources:
            raise RequestError("no ControlNet is served here: start serve with --controlnet SOURCE", param)
        shown = str(name)[:100]
        raise RequestError(f"{param} {shown!r} is not served here; the choices: {', '.join(self.sources)}", param)

    def load(self, pipe, name: str):
        """The model of `name`, loaded by `pipe` (its dtype, checked against its transformer) on first use."""
        with self._lock:
            if name not in self._loaded:
                held = pipe.controlnets
                pipe.controlnets = []  # load_controlnet appends; the job decides which ones are active
                try:
                    self._loaded[name] = pipe.load_controlnet(self.sources[name], quantize=self.quantize)
                except (ValueError, OSError) as e:  # made for another model (400), or files unusable (500)
                    from ..loading.hub import ModelSourceError
                    from ..loading.safetensors_io import WeightsError

                    ours = isinstance(e, (OSError, WeightsError, ModelSourceError))
                    message = str(e).splitlines()[0] if str(e) else type(e).__name__
                    message = f"ControlNet {name}: {message.replace(self.sources[name], name)}"
                    raise RequestError(message, "model", 500 if ours else 400) from None
                finally:
                    pipe.controlnets = held
            self._loaded.move_to_end(name)
            self._evict(keep=name)
            return self._loaded[name]

    def _evict(self, keep: str) -> None:
        """Unload the least recently used models while they hold more than the budget, as the LoRA cache does;
        `keep` (the one just asked for) stays even alone over it. A running job keeps its own reference."""
        from mlx.utils import tree_flatten

        from ..sampling.memory import default_cache_bytes, least_recent_over_budget

        budget = self.cache_bytes if self.cache_bytes is not None else default_cache_bytes()
        sizes = {n: sum(a.nbytes for _, a in tree_flatten(m.parameters())) for n, m in self._loaded.items()}
        for n in least_recent_over_budget(sizes, budget, keep={keep}):
            del self._loaded[n]

    def loaded(self) -> list[str]:
        return list(self._loaded)


def local_sources(sources: dict[str, str], revision: str | None = None) -> dict[str, str]:
    """`serve --controlnet` sources with each Hub id replaced by its downloaded folder: serve calls this with the
    model load, so a worker never holds the queue for a download (loading/hub.py's one-line errors)."""
    from ..loading import hub
    from ..loading.controlnet import fetch_controlnet

    return {
        name: str(fetch_controlnet(s, revision)) if not Path(s).expanduser().exists() and hub.is_hub_id(s) else s
        for name, s in sources.items()
    }


@dataclass
class ControlPlan:
    """A request's enabled units, decoded and checked: what `generate` gets as control_image and friends."""

    names: list[str]
    images: list[Image.Image]  # preprocessed (canny) and fitted to the output's aspect (resize_mode)
    scales: list[float]
    start: float
    end: float
    module: str  # "none" or "canny", the same for every unit (the PNG records one)
    thresholds: tuple[int, int] = CANNY_DEFAULTS  # canny's low and high
    library: ControlNetLibrary | None = field(default=None, repr=False)

    def generate_kwargs(self) -> dict:
        return dict(
            control_image=list(self.images),
            controlnet_conditioning_scale=list(self.scales),
            control_guidance_start=self.start,
            control_guidance_end=self.end,
        )

    def settings(self) -> dict:
        """The Settings fields the PNG records, as the CLI's --controlnet options (cli/editing.py)."""
        return dict(
            controlnets=tuple(self.names),
            control_images=(UNIT_IMAGE,) * len(self.names),
            control_scales=tuple(self.scales),
            control_start=self.start,
            control_end=self.end,
            control_preprocess=None if self.module == "none" else self.module,
            control_thresholds=self.thresholds,
        )

    @contextmanager
    def active(self, pipe) -> Iterator[None]:
        """In the job: exactly these ControlNets are the pipeline's for its generate() calls."""
        nets = [self.library.load(pipe, name) for name in self.names]
        held, pipe.controlnets = pipe.controlnets, nets
        try:
            yield
        finally:
            pipe.controlnets = held


@dataclass
class _Unit:
    name: str
    image: Image.Image
    weight: float
    start: float
    end: float
    module: str
    thresholds: tuple[int, int]
    resize_mode: str


def plan_from(scripts, library: ControlNetLibrary | None, size: tuple[int, int], fallback: Image.Image | None,
              max_pixels: int, notes: list[str]) -> ControlPlan | None:  # fmt: skip
    """`alwayson_scripts` -> the ControlNet plan (None when no unit is enabled). `size`: the output's (w, h);
    `fallback`: img2img's init image, which a unit without an image uses (as the extension does)."""
    block = controlnet_block(scripts)
    if block is None:
        return None
    args = block.get("args") if isinstance(block, dict) else block
    if not isinstance(args, list):
        raise RequestError('alwayson_scripts.controlnet must be {"args": [unit, ...]}', "alwayson_scripts.controlnet")
    units = []
    for i, raw in enumerate(args):
        param = f"alwayson_scripts.controlnet.args[{i}]"
        if not isinstance(raw, dict):
            raise RequestError(f"{param} must be a ControlNet unit object", param)
        # absent `enabled`: on, as the extension's API was before its pydantic unit (whose default is False);
        # clients (webuiapi) send it
        if _flag(raw.get("enabled", True)):
            units.append(_unit(raw, param, library, fallback, max_pixels, notes))
    if not units:
        return None
    if len(units) > MAX_UNITS:
        raise RequestError(f"at most {MAX_UNITS} enabled ControlNet units, got {len(units)}", "alwayson_scripts")
    first = units[0]
    for u in units[1:]:
        if (u.start, u.end, u.module, u.thresholds) != (first.start, first.end, first.module, first.thresholds):
            raise RequestError("several ControlNet units must share module, thresholds, guidance_start and "
                               "guidance_end here (one value each is recorded)", "alwayson_scripts")  # fmt: skip
    images = [fit(preprocess(u.image, u.module, u.thresholds), size, u.resize_mode) for u in units]
    return ControlPlan([u.name for u in units], images, [u.weight for u in units], first.start, first.end,
                       first.module, first.thresholds, library)  # fmt: skip


def controlnet_block(scripts):
    """alwayson_scripts' ControlNet entry: A1111 finds scripts by lower-cased title (webuiapi sends "ControlNet")."""
    if not isinstance(scripts, dict):
        return None
    return next((v for k, v in scripts.items() if isinstance(k, str) and k.lower() == "controlnet"), None)


def _unit(raw: dict, param: str, library, fallback, max_pixels: int, notes: list[str]) -> _Unit:
    if library is None or not library.sources:
        raise RequestError("no ControlNet is served here: start serve with --controlnet SOURCE", f"{param}.model")
    name = library.choose(raw.get("model"), f"{param}.model")
    module = str(raw.get("module") or "none").lower()
    if module not in MODULES:
        shown = str(raw.get("module"))[:60]
        raise RequestError(f"{param}.module {shown!r} is not available; choose one of {', '.join(MODULES)}",
                           f"{param}.module")  # fmt: skip
    weight = _number(raw.get("weight", 1.0), f"{param}.weight", 0.0, MAX_WEIGHT)
    start = _number(raw.get("guidance_start", 0.0), f"{param}.guidance_start", 0.0, 1.0)
    end = _number(raw.get("guidance_end", raw.get("guidance", 1.0)), f"{param}.guidance_end", 0.0, 1.0)
    if not start < end:
        raise RequestError(f"{param}: guidance_start must be below guidance_end, got {start} and {end}", param)
    thresholds = tuple(_threshold(raw.get(k), d) for k, d in zip(("threshold_a", "threshold_b"), CANNY_DEFAULTS,
                                                                  strict=True))  # fmt: skip
    image = _image(raw, param, fallback, max_pixels)
    if raw.get("mask") or raw.get("mask_image") or raw.get("effective_region_mask"):
        notes.append(f"{param}: unit masks are not supported; ignored")
    if str(raw.get("control_mode", "Balanced")) not in ("Balanced", "0"):
        notes.append(f"{param}.control_mode {str(raw['control_mode'])[:40]!r} is not available; ran Balanced")
    if _flag(raw.get("pixel_perfect", False)):
        notes.append(f"{param}.pixel_perfect is not supported; canny ran at the image's own resolution")
    return _Unit(name, image, weight, start, end, module, thresholds, _resize_mode(raw.get("resize_mode"), param))


def _image(raw: dict, param: str, fallback, max_pixels: int) -> Image.Image:
    """The unit's image: base64 (`image` or the older `input_image`), or {"image": ...} / [image, mask]."""
    value = raw.get("image") or raw.get("input_image")
    if isinstance(value, dict):
        value = value.get("image")
    elif isinstance(value, (list, tuple)) and value:
        value = value[0].get("image") if isinstance(value[0], dict) else value[0]
    if not value:
        if fallback is not None:
            return fallback
        raise RequestError(f"{param}.image is required: a base64-encoded control image", f"{param}.image")
    return open_image(decode_base64(value, f"{param}.image"), f"{param}.image", max_pixels)


def _flag(v) -> bool:
    return v is True or (isinstance(v, (int, float)) and not isinstance(v, bool) and v != 0) or v == "true"


def _number(v, param: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise RequestError(f"{param} must be a number from {lo:g} to {hi:g}, got {str(v)[:40]}", param)
    return float(v)


def _threshold(v, default: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not CANNY_RANGE[0] <= v <= CANNY_RANGE[1]:
        return default  # -1 (the extension's "unset") and out-of-range values: the default
    return int(v)


def _resize_mode(v, param: str) -> str:
    if v is None:
        return "Crop and Resize"  # the extension's default (ResizeMode.INNER_FIT)
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return RESIZE_MODES[v] if v < len(RESIZE_MODES) else "Just Resize"  # 3: "Just Resize (Latent upscale)"
    mode = RESIZE_ALIASES.get(v, v) if isinstance(v, str) else None
    if mode not in RESIZE_MODES:
        choices = ", ".join(RESIZE_MODES)
        raise RequestError(f"{param}.resize_mode {str(v)[:40]!r} is not one of {choices}", f"{param}.resize_mode")
    return mode


def preprocess(image: Image.Image, module: str, thresholds: tuple[int, int]) -> Image.Image:
    """The unit's module on its image: the library's (editing/preprocess.py, as the CLI's --control-preprocess)."""
    from ..editing.preprocess import preprocess as run

    return run(image, None if module == "none" else module, thresholds)


def fit(image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
    """The image brought to the output's aspect as the extension's resize modes do; `generate` then resizes it.
    Crop and Resize: the centre crop of that aspect. Resize and Fill: centred on a canvas of the border's median
    colour. Just Resize: as it is (stretched)."""
    w, h = image.size
    tw, th = size
    if mode == "Just Resize" or w * th == h * tw:
        return image
    if mode == "Crop and Resize":
        k = max(tw / w, th / h)  # scale so the image covers the output, then crop the overflow
        cw, ch = min(w, round(tw / k)), min(h, round(th / k))
        left, top = (w - cw) // 2, (h - ch) // 2
        return image.crop((left, top, left + cw, top + ch))
    k = min(tw / w, th / h)  # Resize and Fill: the image inside, the rest in the border's colour
    cw, ch = max(w, round(tw / k)), max(h, round(th / k))
    a = np.asarray(image)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    canvas = Image.new("RGB", (cw, ch), tuple(int(c) for c in np.median(border, axis=0)))
    canvas.paste(image, ((cw - w) // 2, (ch - h) // 2))
    return canvas


def detect(body: dict, max_pixels: int) -> list[bytes]:
    """The extension's /controlnet/detect: each image through the module, as PNG (what a unit would condition on,
    before fitting to the output's aspect)."""
    module = str(body.get("controlnet_module") or "none").lower()
    if module not in MODULES:
        shown = str(body.get("controlnet_module"))[:60]
        raise RequestError(f"controlnet_module {shown!r} is not available; choose one of {', '.join(MODULES)}",
                           "controlnet_module", 422)  # fmt: skip
    images = body.get("controlnet_input_images")
    if not isinstance(images, list) or not images:
        raise RequestError("controlnet_input_images must be a list of base64 images", "controlnet_input_images", 422)
    thresholds = (_threshold(body.get("controlnet_threshold_a"), CANNY_DEFAULTS[0]),
                  _threshold(body.get("controlnet_threshold_b"), CANNY_DEFAULTS[1]))  # fmt: skip
    out = []
    for i, text in enumerate(images[:MAX_UNITS]):
        param = f"controlnet_input_images[{i}]"
        image = preprocess(open_image(decode_base64(text, param), param, max_pixels), module, thresholds)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def router(server) -> APIRouter:
    """The extension's endpoints: /controlnet/version, model_list, module_list, settings, detect."""
    r = APIRouter(prefix="/controlnet")

    @r.post("/detect")
    async def detect_endpoint(request: Request):
        body = await json_object(request)
        try:
            pngs = await asyncio.to_thread(detect, body, server.config.max_upload_pixels)
        except ImportError as e:
            raise RequestError(str(e).splitlines()[0], "controlnet_module") from None
        return {"info": "Success", "images": [base64.b64encode(p).decode("ascii") for p in pngs]}

    @r.get("/version")
    async def version():
        return {"version": API_VERSION}

    @r.get("/model_list")
    async def model_list(update: bool = True):
        return {"model_list": server.controlnets.names()}

    @r.get("/module_list")
    async def module_list(alias_names: bool = False):
        return {"module_list": list(MODULES), "module_detail": MODULE_DETAIL}

    @r.get("/settings")
    async def settings():
        return {"control_net_unit_count": MAX_UNITS}

    return r


def _slider(name: str, value: float, lo: float, hi: float, step: float = 1) -> dict:
    return {"name": name, "value": value, "min": lo, "max": hi, "step": step}


MODULE_DETAIL = {  # the extension's get_modules_detail shape; we run canny at the image's resolution (no slider)
    "none": {"model_free": False, "sliders": []},
    "canny": {
        "model_free": False,
        "sliders": [
            _slider("Low Threshold", CANNY_DEFAULTS[0], *CANNY_RANGE),
            _slider("High Threshold", CANNY_DEFAULTS[1], *CANNY_RANGE),
        ],
    },
}


async def decode_plan(scripts, server, size, fallback, notes) -> ControlPlan | None:
    """plan_from off the event loop (decoding and canny take a moment on large images); canny without OpenCV: 400."""
    try:
        return await asyncio.to_thread(plan_from, scripts, server.controlnets, size, fallback,
                                       server.config.max_upload_pixels, notes)  # fmt: skip
    except ImportError as e:  # the optional `control` extra (editing/preprocess.py says how to install it)
        raise RequestError(str(e).splitlines()[0], "alwayson_scripts.controlnet") from None
