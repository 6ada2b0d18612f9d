"""The generate command's options, each with its default in --help."""

from __future__ import annotations

import click

from sd35m_mlx.defaults import PROMPT_SYNTAXES, TEXT_ENCODINGS, UPSCALERS
from sd35m_mlx.record import QUALITY
from sd35m_mlx.sampling.noise import RNG_SOURCES
from sd35m_mlx.sampling.schedulers import SCHEDULERS

from . import lora
from .editing import EDITING_FIELDS
from .family import FAMILY_HELP
from .live import OPTIONS as LIVE_OPTIONS
from .output import DEFAULT_TEMPLATE
from .settings import (
    DEFAULT_MODEL,
    DTYPES,
    MAX_SEQUENCE_LENGTH,
    MAX_SIDE,
    MIN_SIDE,
    SAMPLERS,
    TRAINED_MAX,
    TRAINED_MIN,
    TRAINED_MP,
    Settings,
)

_D = Settings(prompt="")  # the defaults, in one place

# Parameter name -> Settings field, for --from-image (a stored field wins over a parameter's default).
RESTORABLE = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "steps": "steps",
    "cfg": "cfg",
    "seeds": "seed",
    "sampler": "sampler",
    "scheduler": "scheduler",
    "shift": "shift",
    "rng": "rng",
    "prompt_syntax": "prompt_syntax",
    "text_encoding": "text_encoding",
    "slg": "slg",
    "slg_scale": "slg_scale",
    "max_sequence_length": "max_sequence_length",
    "t5": "t5",
    "dtype": "dtype",
    "quantize": "quantize",
    "t5_quantize": "t5_quantize",
    "model": "model",
    "image": "image",
    "strength": "strength",
    "upscale": "upscale",
    "upscale_strength": "upscale_strength",
    "upscale_steps": "upscale_steps",
    "upscale_model": "upscale_model",
    "upscaler": "upscaler",
    **{name: name for name in EDITING_FIELDS},
}


def option_with_default_in_help(*decls, **kwargs):
    """An option whose help states its default itself ("per model", "as --steps"): click's would mislead."""
    return click.option(*decls, show_default=False, **kwargs)


def join_words(ctx: click.Context, param: click.Parameter, words: tuple[str, ...]) -> str | None:
    """`sd35m-mlx a cat` is the prompt "a cat", as mflux and A1111 users type it (quoting is not needed)."""
    return " ".join(words) if words else None


OPTIONS = [
    click.argument("prompt", nargs=-1, callback=join_words),
    click.option(
        "--model",
        default=DEFAULT_MODEL,
        help="Hugging Face Hub id, a local diffusers-layout folder, a Stability single-file checkpoint "
        "(sd3.5_medium.safetensors, or its folder with text_encoders/ and tokenizer folders), or a folder "
        "written by `sd35m-mlx convert`. A Hub id's needed files (no T5 with "
        "--no-t5) are downloaded once into the HF cache (HF_HOME, HF_HUB_CACHE; HF_HUB_OFFLINE=1 uses the "
        "cache alone). The default repo is gated: accept its licence on huggingface.co and run "
        "`hf auth login` (or set HF_TOKEN).",
    ),
    option_with_default_in_help(
        "--revision",
        help="Branch, tag or commit hash of a Hub --model.  [default: main]",
    ),
    click.option("--negative-prompt", default=_D.negative_prompt, help="What to steer away from."),
    option_with_default_in_help(
        "--width",
        type=int,
        help=f"Image width in px: a multiple of 16, {MIN_SIDE} up to the model's positional table ({MAX_SIDE} "
        f"for SD3.5 Medium, 3072 for SD3 Medium and SD3.5 Large); outside the trained {TRAINED_MP[0]}-"
        f"{TRAINED_MP[1]} megapixels a warning.  [default: {_D.width}; with --image its size, or about 1 "
        f"megapixel if outside {TRAINED_MIN}-{TRAINED_MAX}, keeping its aspect]",
    ),
    option_with_default_in_help(
        "--height",
        type=int,
        help=f"Image height in px, as --width.  [default: {_D.height}; with --image as --width]",
    ),
    option_with_default_in_help(
        "--steps",
        type=int,
        default=_D.steps,
        help=f"Denoising steps (1-1000).  [default: per model, printed: {FAMILY_HELP}]",
    ),
    option_with_default_in_help(
        "--cfg",
        type=float,
        default=_D.cfg,
        help="Classifier-free guidance scale (0-100); 1 or less turns guidance (and SLG) off.  [default: per model, "
        "as --steps]",
    ),
    option_with_default_in_help(
        "--seed",
        "seeds",
        type=int,
        multiple=True,
        help="Random seed; repeat for one image per seed. The same seed and settings give the same "
        "image.  [default: random, always printed]",
    ),
    click.option(
        "-n",
        "--num-images",
        type=int,
        default=1,
        help="Number of images. Seeds continue from the last --seed, or from a random one (+1 each).",
    ),
    click.option(
        "--sampler",
        type=click.Choice(SAMPLERS),
        default=_D.sampler,
        help="Sampler (ComfyUI's names; the PNG records A1111's label): " + ", ".join(SAMPLERS) + ".",
    ),
    click.option(
        "--scheduler",
        type=click.Choice(SCHEDULERS),
        default=_D.scheduler,
        help="Sigma schedule (ComfyUI's names); normal is diffusers' default.",
    ),
    option_with_default_in_help(
        "--shift",
        type=float,
        default=None,
        help="Flow shift of the schedule (> 0).  [default: the model's, 3.0 for SD3.5]",
    ),
    click.option(
        "--rng",
        type=click.Choice(RNG_SOURCES),
        default=_D.rng,
        help="Noise source for the seed: cpu (diffusers' and ComfyUI's torch CPU generator), nv (A1111's "
        "NV), mlx (this tool before --rng existed; PNGs without an RNG record replay with it).",
    ),
    click.option(
        "--prompt-syntax",
        type=click.Choice(PROMPT_SYNTAXES),
        default="weighted",
        help="weighted: AUTOMATIC1111's prompt syntax, (word:1.3) [word] BREAK, and prompts longer than 77 CLIP "
        "tokens (in chunks); plain: the text as diffusers encodes it. A PNG from before this option replays plain.",
    ),
    click.option(
        "--text-encoding",
        type=click.Choice(TEXT_ENCODINGS),
        default=_D.text_encoding,
        help="diffusers: T5 padded and cut to --max-sequence-length; comfyui: as ComfyUI's CLIPTextEncode for SD3 "
        "(T5 at least 77 tokens, never cut; ComfyUI's (word:1.2) syntax, no [word] or BREAK). ComfyUI PNGs replay "
        "with comfyui.",
    ),
    option_with_default_in_help(
        "--slg/--no-slg",
        default=_D.slg,
        help="Skip Layer Guidance on layers 7, 8, 9 over the first 1-20% of steps, as the SD3.5 Medium model "
        "card recommends (needs --cfg above 1).  [default: on for SD3.5 Medium, off for the other models]",
    ),
    click.option("--slg-scale", type=float, default=_D.slg_scale, help="Skip Layer Guidance scale (0-100)."),
    click.option(
        "--max-sequence-length",
        type=int,
        default=_D.max_sequence_length,
        help=f"T5 prompt length in tokens (1-{MAX_SEQUENCE_LENGTH}).",
    ),
    click.option(
        "--t5/--no-t5",
        default=_D.t5,
        help="Use the T5-XXL text encoder. --no-t5 saves about 9 GB (bfloat16) and some load time, "
        "at a cost in prompt following and text rendering.",
    ),
    click.option(
        "--quantize",
        type=click.Choice(("4", "8")),
        help="Quantize the MMDiT's linear layers to 4 or 8 bits as they load (less memory; 8 bits is close "
        "to bfloat16, 4 bits visibly drifts). On Linux CPU quantized matmul is slow.  [default: off]",
    ),
    click.option(
        "--t5-quantize",
        type=click.Choice(("4", "8", "none")),
        help="Quantize T5's linear layers (4 bits keeps T5-XXL near 2.9 GB).  [default: as --quantize]",
    ),
    click.option(
        "--low-memory/--no-low-memory",
        default=None,
        help="Run in stages (text encoders, then transformer, then VAE), never holding the text encoders "
        "and the transformer together.  [default: on when the weights would fill most of this machine's memory]",
    ),
    click.option(
        "--dtype",
        type=click.Choice(("auto", *DTYPES)),
        default="auto",
        help="Weights and compute dtype. auto: bfloat16 on a GPU (Metal, CUDA), float32 on CPU (as on "
        "Linux without CUDA) because bfloat16 matmul is slow on MLX's CPU backend.",
    ),
    click.option(
        "--image",
        metavar="PATH",
        help="Input image for img2img, resized to --width x --height.",
    ),
    click.option(
        "--strength",
        type=float,
        default=0.6,
        help="img2img: how far to move away from --image, in (0, 1]; 1 keeps nothing of it.",
    ),
    *lora.OPTIONS,
    click.option(
        "--upscale",
        type=float,
        metavar="FACTOR",
        help="Two passes: generate at --width x --height, enlarge by FACTOR (Lanczos, in pixels; 1-4), then "
        "refine with img2img at the larger size, same seed; the VAE runs in tiles when the size needs it. "
        "Both passes are recorded in the PNG.  [default: off]",
    ),
    click.option(
        "--upscale-strength",
        type=float,
        default=_D.upscale_strength,
        help="How far the second pass moves from the enlarged image, in (0, 1].",
    ),
    option_with_default_in_help(
        "--upscale-steps",
        type=int,
        help="Steps the second pass runs (A1111's Hires steps): the last ones of a schedule of steps / "
        "--upscale-strength.  [default: as --steps]",
    ),
    click.option(
        "--upscaler",
        type=click.Choice(list(UPSCALERS)),
        default=_D.upscaler,
        help="How --upscale enlarges the first pass: lanczos (smooth) or nearest (A1111's Nearest: blocky pixels "
        "the second pass repaints) on the image; latent* resize the latents as A1111's Latent upscalers "
        "(no VAE round trip; use --upscale-strength 0.6 or more).",
    ),
    option_with_default_in_help(
        "--upscale-model",
        metavar="MODEL",
        help="Another SD3-family checkpoint for the second pass (e.g. SD3.5 Medium after SD3.5 Large), any "
        "--model form, run with the first pass's guidance settings; with --low-memory the first model is released "
        "before it loads.  [default: --model]",
    ),
    click.option(
        "-o",
        "--output",
        default=DEFAULT_TEMPLATE,
        help="Output image: a path, a folder, or a template with {seed} and {index} (1-based). "
        "Several images and no placeholder: name-1.png, name-2.png, ... A .jpg/.jpeg or .webp name writes "
        "that format, its settings in EXIF as A1111 writes them (--from-image reads them back).",
    ),
    click.option(
        "--quality",
        type=click.IntRange(1, 100),
        default=QUALITY,
        show_default=True,
        help="JPEG / WebP quality (PNG is lossless and ignores it).",
    ),
    click.option(
        "--overwrite",
        is_flag=True,
        help="Replace existing files. Without it an existing name is never replaced: the next free one "
        "(name-1.png, ...) is used, and said.",
    ),
    click.option(
        "--from-image",
        metavar="PNG",
        help="Re-run the settings stored in a PNG (ours, or A1111-style parameters). "
        "Options given on the command line take precedence.",
    ),
    click.option(
        "--prompts-file",
        metavar="FILE",
        help="One image job per line (blank lines and # comments skipped): a prompt, or AUTOMATIC1111's per-line "
        'options (--prompt "..." --negative_prompt "..." --steps N --seed N --cfg_scale X --width W --height H '
        "--sampler_name NAME); the command's options are the defaults. The model loads once.",
    ),
    *LIVE_OPTIONS,
    click.option(
        "--split",
        type=click.Choice(("seeds", "cfg")),
        default="seeds",
        help="Under mlx.launch (several processes or Macs): seeds gives each rank different images of "
        "the -n (data parallel); cfg splits every image's guidance batch over exactly 2 ranks (one image "
        "faster). Rank 0 writes all files. Ignored in a single process, except that cfg needs 2 ranks.",
    ),
    click.option("-q", "--quiet", is_flag=True, help="Print only the output paths."),
    click.option("-v", "--verbose", is_flag=True, help="Print every step, and tracebacks on errors."),
]


def generate_options(f):
    for decorator in reversed(OPTIONS):
        f = decorator(f)
    return f
