"""The settings of one image: what `generate()` receives, what the PNG records, what --from-image restores."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import UsageError

DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"
# Mirrors sd35m_mlx.sampling.samplers.SAMPLERS (tests pin the match); importing it would load mlx for --help.
SAMPLERS = ("euler", "dpmpp_2m")
DTYPES = ("float32", "bfloat16", "float16")

MULTIPLE = 16  # VAE factor 8 x patch size 2
# Hard limits for the CLI: MAX_SIDE is SD3.5 Medium's positional table (384 patches x 16 px); the
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
    loras: tuple[tuple[str, float, str], ...] = ()  # (source, weight, short sha256); cli/lora.py
    upscale: float | None = None  # two-pass upscale factor (sd35m_mlx/upscale.py); None: one pass
    upscale_strength: float = 0.35
    upscale_steps: int | None = None  # None: as steps
    upscale_model: str | None = None  # None: the same model

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


def nearest_multiple(v: int) -> int:
    return min(max(int(v / MULTIPLE + 0.5) * MULTIPLE, MIN_SIDE), MAX_SIDE)


def check_side(name: str, v: int) -> None:
    if not MIN_SIDE <= v <= MAX_SIDE:
        raise UsageError(f"--{name} must be between {MIN_SIDE} and {MAX_SIDE} px, got {v}")
    if v % MULTIPLE:
        raise UsageError(f"--{name} must be a multiple of {MULTIPLE}, got {v} (try {nearest_multiple(v)})")


# generate()'s argument names as this CLI calls them, for messages from sd35m_mlx.validation
OPTION_NAMES = {
    "prompt": "PROMPT",
    "negative_prompt": "--negative-prompt",
    "height": "--height",
    "width": "--width",
    "num_inference_steps": "--steps",
    "guidance_scale": "--cfg",
    "seed": "--seed",
    "max_sequence_length": "--max-sequence-length",
    "sampler": "--sampler",
    "skip_guidance_layers": "the --from-image PNG's SLG layers",  # the CLI takes them only from a PNG
    "skip_layer_guidance_scale": "--slg-scale",
    "skip_layer_guidance_start": "the --from-image PNG's SLG start",
    "skip_layer_guidance_stop": "the --from-image PNG's SLG stop",
    "image": "--image",
    "strength": "--strength",
}


def check(s: Settings, limits=None) -> list[str]:
    """Raise UsageError for settings the model cannot run; return warnings for ones it was not trained on.

    The rules are generate()'s own (sd35m_mlx.validation), plus this CLI's size range; `limits` (the
    loaded model's `pipe.limits`) adds the checks that depend on the model.
    """
    from sd35m_mlx.validation import InvalidInput, validate_generation  # numpy: not for --help

    check_side("width", s.width)
    check_side("height", s.height)
    if s.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {s.dtype!r}; choose one of {', '.join(DTYPES)}")
    try:
        validate_generation(limits, names=OPTION_NAMES, prompt=s.prompt, **s.generate_kwargs())
    except InvalidInput as e:
        raise UsageError(str(e)) from None
    if s.upscale is not None:
        if not 1 <= s.upscale <= 4:
            raise UsageError(f"--upscale must be between 1 and 4, got {s.upscale}")
        if not 0 < s.upscale_strength <= 1:
            raise UsageError(f"--upscale-strength must be in (0, 1], got {s.upscale_strength}")
        if s.upscale_steps is not None and s.upscale_steps < 1:
            raise UsageError(f"--upscale-steps must be at least 1, got {s.upscale_steps}")
        if max(s.upscale_size) > MAX_SIDE:
            raise UsageError(f"--upscale {s.upscale} makes {s.upscale_size[0]}x{s.upscale_size[1]}, over {MAX_SIDE} px")
    warnings = []
    megapixels = s.width * s.height / 2**20
    if not TRAINED_MP[0] <= megapixels <= TRAINED_MP[1]:
        warnings.append(
            f"{s.width}x{s.height} ({megapixels:.2f} MP) is outside the trained range ({TRAINED_MP[0]}-"
            f"{TRAINED_MP[1]} megapixels); expect weaker images"
        )
    return warnings


def fit_to_model(s: Settings, limits) -> tuple[Settings, list[str]]:
    """The settings for the loaded model, checked against it, and notes to print.

    The default SLG layers (the model card's 7, 8, 9) apply only where the model has those blocks: the
    missing ones are dropped, with a note. Other layers (restored from a PNG) must exist.
    """
    notes = []
    if s.slg and s.slg_layers == Settings.slg_layers and any(i >= limits.num_layers for i in s.slg_layers):
        kept = tuple(i for i in s.slg_layers if i < limits.num_layers)
        missing = ", ".join(str(i) for i in s.slg_layers if i >= limits.num_layers)
        then = f"SLG runs on layer(s) {', '.join(map(str, kept))}" if kept else "SLG is off"
        notes.append(
            f"Note: this model has {limits.num_layers} transformer blocks; the default SLG layer(s) {missing} "
            f"are not among them, so {then}"
        )
        s = dataclasses.replace(s, slg_layers=kept) if kept else dataclasses.replace(s, slg=False)
    check(s, limits)
    return s, notes
