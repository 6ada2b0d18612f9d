"""The constants that the front ends (cli/, server/) and the library share, in one MLX-free module.

`sd35m-mlx --help` must not import mlx, so the CLI cannot read these from the pipeline or the samplers;
they live here instead, and those modules import them from here too.
"""

from __future__ import annotations

DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"
TAESD3_REPO = "madebyollin/taesd3"  # the tiny decoder behind preview="taesd" / decoder="taesd"

# ComfyUI's names (comfy/samplers.py KSAMPLER_NAMES); sampling/samplers/ builds its registry over these names
SAMPLERS = (
    "euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m",
    "dpmpp_2m_sde", "dpmpp_3m_sde", "lcm", "ipndm", "deis", "res_multistep", "gradient_estimation", "ddim", "uni_pc",
    "uni_pc_bh2",
)  # fmt: skip
DTYPES = ("float32", "bfloat16", "float16")
# how prompts are read: "plain" is diffusers' encode_prompt (generate()'s default), "weighted" A1111's syntax and
# long prompts (prompts/weighted.py; the CLI's and the server's default, as A1111 users expect)
PROMPT_SYNTAXES = ("plain", "weighted")
PROMPT_SYNTAX = "plain"
# how the three encoders' outputs are made: "diffusers" (encode_prompt: T5 at max_sequence_length) or "comfyui"
# (ComfyUI's CLIPTextEncode for SD3: T5 at least 77 tokens and uncut, its syntax; prompts/comfyui.py)
TEXT_ENCODINGS = ("diffusers", "comfyui")
TEXT_ENCODING = "diffusers"

MULTIPLE = 16  # image sides: VAE factor 8 x patch size 2


def scaled_size(width: int, height: int, factor: float) -> tuple[int, int]:
    """width x height scaled by `factor`, each side rounded to a multiple of MULTIPLE (the two-pass upscale's)."""
    return (max(MULTIPLE, round(width * factor / MULTIPLE) * MULTIPLE),
            max(MULTIPLE, round(height * factor / MULTIPLE) * MULTIPLE))  # fmt: skip


# Size limits for our front ends (CLI, server): MAX_SIDE is SD3.5 Medium's positional table (384 patches x 16 px);
# the pipeline refuses more than a smaller table allows (192 x 16 = 3072 px for SD3 Medium and SD3.5 Large). The
# model card's trained range only warns: 0.25-2 megapixels (TRAINED_MP, 2^20 px each) and sides of
# TRAINED_MIN-TRAINED_MAX px (what an --image is fitted to). Small sizes stay allowed for tests and previews; far
# above 2 MP the model repeats its subjects (the two-pass --upscale is the way up).
MIN_SIDE, MAX_SIDE = 64, 6144
TRAINED_MIN, TRAINED_MAX = 256, 1440
TRAINED_MP = (0.25, 2.0)

MAX_SEQUENCE_LENGTH = 512  # T5 was trained on 512 tokens; diffusers refuses more
MAX_SEED = 2**64 - 1  # mx.random.key takes an unsigned 64-bit seed
# CLIP reads 77 tokens and T5 at most 512 (about 2,000 characters of English); a prompt far above both is
# a mistake or an attack (tokenizers are linear, but a server should not tokenize megabytes per request).
MAX_PROMPT_CHARS = 10_000

# generate()'s defaults for one image (StableDiffusion35.generate declares the same; a test pins them)
SIZE = 1024
STEPS = 40
GUIDANCE = 4.5
SAMPLER = "euler"
SCHEDULER = "normal"  # diffusers' FlowMatchEulerDiscreteScheduler schedule (sampling/schedulers.py)
RNG = "cpu"  # torch's CPU generator: a seed gives diffusers' and ComfyUI's picture (sampling/noise.py)
SLG_LAYERS = (7, 8, 9)  # the model card's choice for SD3.5 Medium
SLG_SCALE = 2.8
SLG_START = 0.01
SLG_STOP = 0.2
SEQUENCE_LENGTH = 256
STRENGTH = 0.6  # img2img

# every upscaler of the two-pass upscale (upscale.py), our name -> A1111's label (the PNG's "Hires upscaler",
# the server's hr_upscaler)
UPSCALERS = {
    "lanczos": "Lanczos",
    "nearest": "Nearest",
    "latent": "Latent",
    "latent-antialiased": "Latent (antialiased)",
    "latent-bicubic": "Latent (bicubic)",
    "latent-bicubic-antialiased": "Latent (bicubic antialiased)",
    "latent-nearest": "Latent (nearest)",
    "latent-nearest-exact": "Latent (nearest-exact)",
}
