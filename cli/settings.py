"""The settings of one image: what `generate()` receives, what the PNG records, what --from-image restores."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

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

    @staticmethod
    def known_fields(d: dict) -> dict:
        """The entries of a stored JSON dict that name a field, with lists back to tuples."""
        names = {f.name for f in fields(Settings)}
        out = {k: v for k, v in d.items() if k in names}
        if isinstance(out.get("slg_layers"), list):
            out["slg_layers"] = tuple(out["slg_layers"])
        return out


def nearest_multiple(v: int) -> int:
    return min(max(int(v / MULTIPLE + 0.5) * MULTIPLE, MIN_SIDE), MAX_SIDE)


def check_side(name: str, v: int) -> None:
    if not MIN_SIDE <= v <= MAX_SIDE:
        raise UsageError(f"--{name} must be between {MIN_SIDE} and {MAX_SIDE} px, got {v}")
    if v % MULTIPLE:
        raise UsageError(f"--{name} must be a multiple of {MULTIPLE}, got {v} (try {nearest_multiple(v)})")


def check(s: Settings) -> list[str]:
    """Raise UsageError for settings the model cannot run; return warnings for ones it was not trained on."""
    check_side("width", s.width)
    check_side("height", s.height)
    if s.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {s.steps}")
    if s.cfg < 0:
        raise UsageError(f"--cfg must be >= 0, got {s.cfg}")
    if s.image is not None and not (s.strength is not None and 0 < s.strength <= 1):
        raise UsageError(f"--strength must be in (0, 1], got {s.strength}")
    if not 1 <= s.max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise UsageError(
            f"--max-sequence-length must be between 1 and {MAX_SEQUENCE_LENGTH}, got {s.max_sequence_length}"
        )
    if s.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {s.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if s.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {s.dtype!r}; choose one of {', '.join(DTYPES)}")
    if not 0 <= s.seed <= MAX_SEED:
        raise UsageError(f"seeds must be between 0 and {MAX_SEED}, got {s.seed}")
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
