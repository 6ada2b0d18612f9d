"""--upscale: the two-pass workflow of sd35m_mlx.upscale, with the second model loaded once when first needed."""

from __future__ import annotations

from . import model as model_io
from .settings import Settings


def second_model_loader(settings: Settings, revision: str | None, low_memory: bool | None):
    """A function returning the --upscale-model pipeline (loaded on its first call, then kept), or None."""
    if settings.upscale is None or settings.upscale_model is None:
        return None
    loaded = []

    def load():
        if not loaded:
            folder = model_io.resolve_model(settings.upscale_model, revision=revision, load_t5=settings.t5)
            loaded.append(
                model_io.load_pipeline(
                    folder,
                    settings.dtype,
                    settings.t5,
                    quantize=settings.quantize,
                    t5_quantize=settings.t5_quantize,
                    low_memory=low_memory,
                )
            )
        return loaded[0]

    return load


def two_pass(pipe, s: Settings, reporter, label: str, second_model, **extra):
    """The final images of `s` with --upscale: pass 1 as without it, pass 2 img2img at s.upscale_size."""
    from sd35m_mlx.prompts.syntax import extract_lora_tags
    from sd35m_mlx.upscale import upscale_generate

    kwargs = s.generate_kwargs() | extra  # extra: live previews and the like, for both passes
    kwargs.pop("num_images_per_prompt")
    steps = s.upscale_steps or s.steps
    w, h = s.upscale_size
    reporter.say(f"{label} second pass: {w}x{h}, {steps} steps at strength {s.upscale_strength}")
    result = upscale_generate(
        pipe,
        s.encoder_prompt,
        factor=s.upscale,
        strength=s.upscale_strength,
        upscale_steps=s.upscale_steps,
        upscaler=s.upscaler,
        upscale_prompt=None if s.upscale_prompt is None else extract_lora_tags(s.upscale_prompt)[0],
        upscale_negative_prompt=s.upscale_negative_prompt,
        second=second_model,
        callback=reporter.steps(label),
        **kwargs,
    )
    return result.images
