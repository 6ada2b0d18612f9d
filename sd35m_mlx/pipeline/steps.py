"""The parts `StableDiffusion35.generate` calls as its numbered steps: inputs (the canvas the editing inputs
decide, then one validation pass), text conditioning, initial latents, the per-step extras, the output.

Each takes the validated settings (validation.GenerationSettings) and, as explicit arguments, what it needs
of the pipeline (its limits, the prompt encoder, the VAE encoder, the decoders), so `generate()` reads as its
five steps and a new per-step feature adds a StepExtra in `step_extras`, not a branch in the loop.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import mlx.core as mx
import numpy as np

from ..defaults import MAX_SEED
from ..editing.control import ControlNetResiduals, check_control, control_units
from ..editing.inpaint import InpaintBlend, prepare_inpaint
from ..images import from_pil_or_array, to_output
from ..sampling.brownian import BrownianNoise
from ..sampling.finite import FiniteLatents, check_finite
from ..sampling.guidance import GuidanceConfig
from ..sampling.loop import StepCallback, StepExtra
from ..sampling.memory import bounded_work
from ..sampling.noise import NoiseGenerator, latent_noise
from ..sampling.preview import Preview, latent_rgb
from ..sampling.samplers import Brownian, sampler_class
from ..sampling.schedule import img2img_start_index
from ..validation import GenerationSettings, ModelLimits, is_latent_image, validate_generation

Decoder = Callable[[mx.array], mx.array]  # model-space latents NHWC -> images NHWC float32 in [0, 1]


@dataclass
class Canvas:
    """What the editing inputs add to the checked settings: the img2img / inpainting source image at the
    canvas size (NHWC, [-1, 1]), the inpainting plan (editing/inpaint.py) and the checked ControlNet
    inputs (editing/control.py) with the ControlNets they condition."""

    init_image: mx.array | None = None
    init_latents: mx.array | None = None  # `image` given as model-space latents: img2img without the VAE
    inpaint: Any = None
    control: Any = None
    controlnets: list = field(default_factory=list)  # the pipeline's, checked against the transformer


def prepare_inputs(
    arguments: dict, limits: ModelLimits, controlnets: list, transformer_config
) -> tuple[GenerationSettings, Canvas]:
    """Inpainting's crop and the control images set the canvas (size, source image) first; then every
    argument is checked in one pass (validation.py) against the model's `limits` before any work.
    `controlnets` (the pipeline's) are checked against the transformer they condition."""
    canvas = Canvas()
    image, height, width = arguments["image"], arguments["height"], arguments["width"]
    if arguments["mask_image"] is not None:
        canvas.inpaint = prepare_inpaint(
            image, arguments["mask_image"], height, width, arguments["padding_mask_crop"], limits.vae_scale_factor
        )
        image, height, width = canvas.inpaint.image, canvas.inpaint.height, canvas.inpaint.width
    if arguments["control_image"] is not None:  # ControlNets: checked against the transformer before any work
        canvas.control = check_control(
            controlnets,
            transformer_config,
            arguments["control_image"],
            arguments["controlnet_conditioning_scale"],
            arguments["control_guidance_start"],
            arguments["control_guidance_end"],
        )
        canvas.controlnets = list(controlnets)
        if image is None and not (height and width):
            height, width = canvas.control.default_size()
    settings = validate_generation(limits, **{**arguments, "image": image, "height": height, "width": width})
    if settings.seed is None:  # one random seed for every draw of the run (initial, sampler and inpainting noise)
        settings = replace(settings, seed=int.from_bytes(os.urandom(4), "little"))
    if image is not None and is_latent_image(image, limits.latent_channels):
        canvas.init_latents = mx.array(np.asarray(image, np.float32))
    elif image is not None:
        canvas.init_image = from_pil_or_array(image, height, width, multiple=16)  # the size checked resolves to
    return settings, canvas


def conditioning(s: GenerationSettings, do_cfg: bool, encode_prompt: Callable[..., tuple]):
    """(cond, uncond, pooled, uncond_pooled): the given embeddings repeated per image, or the prompts
    encoded by `encode_prompt` (the pipeline's, cached: a new seed for the same prompt skips the text encoders)."""
    if s.prompt_embeds is not None:
        return _given_embeds(
            s.prompt_embeds,
            s.negative_prompt_embeds,
            s.pooled_prompt_embeds,
            s.negative_pooled_prompt_embeds,
            s.num_images_per_prompt,
            do_cfg,
        )
    return encode_prompt(
        s.prompt,
        negative_prompt=s.negative_prompt,
        prompt_2=s.prompt_2,
        prompt_3=s.prompt_3,
        num_images_per_prompt=s.num_images_per_prompt,
        max_sequence_length=s.max_sequence_length,
        do_classifier_free_guidance=do_cfg,
        prompt_syntax=s.prompt_syntax,
        text_encoding=s.text_encoding,
    )


def guidance_config(s: GenerationSettings) -> GuidanceConfig:
    return GuidanceConfig(
        scale=s.guidance_scale,
        skip_layers=tuple(s.skip_guidance_layers) if s.skip_guidance_layers else None,
        skip_scale=s.skip_layer_guidance_scale,
        skip_start=s.skip_layer_guidance_start,
        skip_stop=s.skip_layer_guidance_stop,
    )


@dataclass
class Start:
    """Where denoising starts: x at step index `start`; the noise and the encoded source latents z
    (img2img / inpainting) stay for the extras that re-impose them."""

    x: mx.array
    start: int
    noise: mx.array
    z: mx.array | None


def initial_latents(
    s: GenerationSettings,
    canvas: Canvas,
    limits: ModelLimits,
    batch: int,
    sigmas,
    encode: Callable[[mx.array], mx.array],
) -> Start:
    """Noise from the seed (or the given latents); with a source image, the image encoded (`encode`: images
    NHWC in [-1, 1] -> model-space latents; latents given as the image are used as they are) and noised to the
    start step that `strength` gives, as diffusers' img2img."""
    f = limits.vae_scale_factor
    shape = (batch, s.height // f, s.width // f, limits.latent_channels)
    noise = initial_noise(s.latents, shape, s.seed, s.rng)
    if canvas.init_image is None and canvas.init_latents is None:
        mx.eval(noise)
        return Start(noise, 0, noise, None)
    # over the schedule's own length: a scheduler may give another count than the steps asked (ddim_uniform)
    start = img2img_start_index(len(sigmas) - 1, s.strength)
    z = encode(canvas.init_image) if canvas.init_latents is None else canvas.init_latents
    if z.shape[0] != batch:
        if batch % z.shape[0]:
            raise ValueError(f"cannot spread {z.shape[0]} input images over {batch} prompts")
        z = mx.repeat(z, batch // z.shape[0], axis=0)
    sigma = float(sigmas[start])
    x = sigma * noise + (1.0 - sigma) * z
    mx.eval(x)
    return Start(x, start, noise, z)


def step_extras(
    s: GenerationSettings,
    canvas: Canvas,
    begin: Start,
    velocity,
    do_cfg: bool,
    *,
    conditions: tuple[mx.array, mx.array],
    timesteps,
    vae,
    dtype: mx.Dtype,
    cancel_check: StepExtra,
    decoder: Callable[[str], Decoder],
) -> list[StepExtra]:
    """The per-step features of this call, in the order the loop runs them (sampling/loop.py): cancel
    (`cancel_check`), the NaN/infinity stop (sampling/finite.py), ControlNet residuals (a model input), the
    inpainting blend (after each step), callback, previews. `conditions`: the (context, pooled) batch the
    transformer (`velocity`) gets, which the ControlNets get too, with the `timesteps` and their control
    images encoded by `vae`; `decoder("taesd")` renders preview="taesd"."""
    extras: list[StepExtra] = [cancel_check, FiniteLatents(dtype)]
    if canvas.control is not None:
        context, pooled = conditions
        batch = context.shape[0] // (2 if do_cfg else 1)
        units = control_units(canvas.controlnets, canvas.control, vae, s.height, s.width, batch, do_cfg, dtype)
        extras.append(
            ControlNetResiduals(
                units,
                context,
                pooled,
                timesteps,
                begin.start,
                do_cfg,
                dtype,
                velocity.transformer.pos_embed,
            )
        )
    if canvas.inpaint is not None:  # re-imposes the unmasked region after every step
        random = sampler_class(s.sampler).random_inpaint_noise  # ddim: the model sees seed + 1's noise there
        model_noise = inpaint_noise(s.seed, begin.noise.shape, s.rng) if random else None
        extras.append(InpaintBlend(begin.z, begin.noise, canvas.inpaint.latent_mask, model_noise))
    if s.callback is not None:
        extras.append(StepCallback(s.callback))
    if s.preview is not None:
        render = latent_rgb if s.preview == "rgb" else decoder("taesd")
        extras.append(Preview(render, s.preview_every, s.on_preview))
    return extras


def decode_output(
    x: mx.array,
    s: GenerationSettings,
    canvas: Canvas,
    decoder: Callable[[str], Decoder],
    work_budget: int | None,
    dtype: mx.Dtype = mx.float32,
):
    """Latents -> images in [0, 1] by `decoder(s.decoder)` (the VAE, tiled when needed, or TAESD) under the
    pipeline's `work_budget` (sampling/memory.py), as `output_type` asks; an inpainting crop is pasted back
    over the original at 8 bit."""
    if s.output_type == "latent":
        return x
    decode = decoder(s.decoder)
    with bounded_work(work_budget):
        images = decode(x)
        mx.eval(images)
    check_finite(images, "the decoded image", dtype)
    if canvas.inpaint is not None and canvas.inpaint.crop is not None:
        pasted = canvas.inpaint.paste_back(to_output(images, "pil"))
        return pasted if s.output_type == "pil" else np.stack([np.asarray(p, np.float32) / 255 for p in pasted])
    return to_output(images, s.output_type)


def initial_noise(latents, shape: tuple[int, ...], seed: int | Sequence[int], rng: str = "cpu") -> mx.array:
    """The given latents as float32, or standard normal noise of NHWC `shape` from `seed` and the `rng` source,
    as diffusers draws it: one seed is one generator for the whole batch (one draw in NCHW); a list of seeds
    one generator per image, each drawing its (1, C, H, W) alone."""
    if latents is not None:
        return (latents if isinstance(latents, mx.array) else mx.array(latents)).astype(mx.float32)
    if isinstance(seed, (list, tuple)):
        return mx.concatenate([latent_noise(NoiseGenerator(s, rng), (1, *shape[1:])) for s in seed])
    return latent_noise(NoiseGenerator(seed, rng), shape)


def inpaint_noise(seed: int | Sequence[int], shape: tuple[int, ...], rng: str = "cpu") -> mx.array:
    """The known region's noise of a `random_inpaint_noise` sampler (ddim): ComfyUI's torch.randn of the batch
    from a generator seeded seed + 1 (comfy/samplers.py KSAMPLER.sample at a125cd84), through our `rng`
    source; a list of seeds: each image's seed + 1. Seeds wrap at 2^64."""
    if isinstance(seed, (list, tuple)):
        return initial_noise(None, shape, [(s + 1) % (MAX_SEED + 1) for s in seed], rng)
    return initial_noise(None, shape, (seed + 1) % (MAX_SEED + 1), rng)


def sampler_noise(seed: int | Sequence[int], rng: str = "cpu") -> Callable[[tuple[int, ...]], mx.array]:
    """`noise(nhwc_shape)` for the samplers that draw fresh noise (ancestral, SDE, LCM): a generator of its own
    seeded with the seed, one draw per call in NCHW, as ComfyUI's default_noise_sampler (comfy/k_diffusion/
    sampling.py at a125cd84). A list of seeds: one generator per image, each drawing its own slice."""
    if isinstance(seed, (list, tuple)):
        generators = [NoiseGenerator(s, rng) for s in seed]
        return lambda shape: mx.concatenate([latent_noise(g, (1, *shape[1:])) for g in generators])
    generator = NoiseGenerator(seed, rng)
    return partial(latent_noise, generator)


def sampler_brownian(seed: int | Sequence[int], rng: str = "cpu") -> Brownian | None:
    """The SDE samplers' noise as ComfyUI draws it, from a Brownian tree seeded with the seed (one tree per
    seed of a list), for the torch-compatible sources; None for "mlx", whose SDE images draw per call as before."""
    if rng == "mlx":
        return None
    seeds = list(seed) if isinstance(seed, (list, tuple)) else seed
    return lambda shape, sigma_min, sigma_max: BrownianNoise(shape, sigma_min, sigma_max, seeds, rng)


def _given_embeds(cond, uncond, pooled, uncond_pooled, num_images_per_prompt, do_cfg):
    def arr(a, name):
        if a is None:
            raise ValueError(f"{name} is required with prompt_embeds")
        a = a if isinstance(a, mx.array) else mx.array(np.asarray(a))
        return mx.repeat(a, num_images_per_prompt, axis=0) if num_images_per_prompt > 1 else a

    cond, pooled = arr(cond, "prompt_embeds"), arr(pooled, "pooled_prompt_embeds")
    if not do_cfg:
        return cond, None, pooled, None
    return cond, arr(uncond, "negative_prompt_embeds"), pooled, arr(uncond_pooled, "negative_pooled_prompt_embeds")
