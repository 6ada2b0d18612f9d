"""The CLI's checks of the settings of one image; the record itself (sd35m_mlx/record.py) is shared with the server."""

from __future__ import annotations

from sd35m_mlx.defaults import (  # re-exported: the CLI's modules read them here
    DEFAULT_MODEL,
    DTYPES,
    MAX_SEED,
    MAX_SEQUENCE_LENGTH,
    MAX_SIDE,
    MIN_SIDE,
    MULTIPLE,
    SAMPLERS,
    TRAINED_MAX,
    TRAINED_MIN,
    TRAINED_MP,
)
from sd35m_mlx.record import Settings

from .errors import UsageError

__all__ = [
    "DEFAULT_MODEL",
    "SAMPLERS",
    "DTYPES",
    "MULTIPLE",
    "MIN_SIDE",
    "MAX_SIDE",
    "TRAINED_MIN",
    "TRAINED_MAX",
    "TRAINED_MP",
    "MAX_SEQUENCE_LENGTH",
    "MAX_SEED",
    "Settings",
    "check",
    "check_side",
    "fit_to_model",
    "nearest_multiple",
    "OPTION_NAMES",
]


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
    "prompt_syntax": "--prompt-syntax",
    "text_encoding": "--text-encoding",
    "skip_guidance_layers": "the --from-image PNG's SLG layers",  # the CLI takes them only from a PNG
    "skip_layer_guidance_scale": "--slg-scale",
    "skip_layer_guidance_start": "the --from-image PNG's SLG start",
    "skip_layer_guidance_stop": "the --from-image PNG's SLG stop",
    "image": "--image",
    "strength": "--strength",
}


def check(s: Settings, limits=None, size_from: dict[str, str] | None = None) -> list[str]:
    """Raise UsageError for settings the model cannot run; return warnings for ones it was not trained on.

    The rules are generate()'s own (sd35m_mlx.validation), plus this CLI's size range; `limits` (the
    loaded model's `pipe.limits`) adds the checks that depend on the model, the second pass's size
    included, so a run that cannot finish stops before its first step. `size_from` names where a side
    came from when the user did not give it ("width" -> "--image photo.png"), for the messages.
    """
    from sd35m_mlx.validation import InvalidInput, validate_generation  # numpy: not for --help

    check_side("width", s.width)
    check_side("height", s.height)
    if s.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {s.dtype!r}; choose one of {', '.join(DTYPES)}")
    size_from = size_from or {}
    names = OPTION_NAMES | {side: f"the {side} of {src}" for side, src in size_from.items()}
    try:
        validate_generation(limits, names=names, prompt=s.encoder_prompt, **s.generate_kwargs())
    except (InvalidInput, ValueError) as e:  # ValueError: PROMPT's <lora:...> tags (sd35m_mlx.prompts.syntax)
        resize = "; pass --width/--height to resize" if any(names[side] in str(e) for side in size_from) else ""
        raise UsageError(f"{e}{resize}") from None
    if s.upscale is not None:
        if not 1 <= s.upscale <= 4:
            raise UsageError(f"--upscale must be between 1 and 4, got {s.upscale}")
        if not 0 < s.upscale_strength <= 1:
            raise UsageError(f"--upscale-strength must be in (0, 1], got {s.upscale_strength}")
        if s.upscale_steps is not None and s.upscale_steps < 1:
            raise UsageError(f"--upscale-steps must be at least 1, got {s.upscale_steps}")
        from sd35m_mlx.upscale import second_pass_schedule  # here, not at the top: it imports mlx
        from sd35m_mlx.validation import MAX_STEPS

        steps = s.upscale_steps or s.steps
        schedule = second_pass_schedule(steps, s.upscale_strength)[0]
        if schedule > MAX_STEPS:
            raise UsageError(
                f"--upscale-steps {steps} at --upscale-strength {s.upscale_strength:g} makes a schedule of {schedule} "
                f"steps (steps / strength), over {MAX_STEPS}; raise --upscale-strength or lower --upscale-steps"
            )
        w, h = s.upscale_size
        if max(w, h) > MAX_SIDE:
            raise UsageError(f"--upscale {s.upscale} makes {w}x{h}, over {MAX_SIDE} px")
        if limits is not None and s.upscale_model is None and max(w, h) > limits.max_side:
            # the second pass's model is this one: its limit is known now, before the first pass
            raise UsageError(
                f"--upscale {s.upscale} makes {w}x{h}, over this model's {limits.max_side} px; "
                f"choose a smaller --upscale or --width/--height"
            )
    warnings = []
    megapixels = s.width * s.height / 2**20
    if not TRAINED_MP[0] <= megapixels <= TRAINED_MP[1]:
        warnings.append(
            f"{s.width}x{s.height} ({megapixels:.2f} MP) is outside the trained range ({TRAINED_MP[0]}-"
            f"{TRAINED_MP[1]} megapixels); expect weaker images"
        )
    return warnings


def fit_to_model(s: Settings, limits, size_from: dict[str, str] | None = None) -> tuple[Settings, list[str]]:
    """The settings for the loaded model, checked against it (`check`, every size the run reaches), and notes
    to print.

    The default SLG layers (the model card's 7, 8, 9) apply only where the model has those blocks: the
    missing ones are dropped, with a note. Other layers (restored from a PNG) must exist.
    """
    notes = []
    fitted = s.fit_slg(limits.num_layers)
    if fitted != s:
        missing = ", ".join(str(i) for i in s.slg_layers if i >= limits.num_layers)
        then = f"SLG runs on layer(s) {', '.join(map(str, fitted.slg_layers))}" if fitted.slg else "SLG is off"
        notes.append(
            f"Note: this model has {limits.num_layers} transformer blocks; the default SLG layer(s) {missing} "
            f"are not among them, so {then}"
        )
    check(fitted, limits, size_from)
    return fitted, notes
