"""The parts `StableDiffusion35.generate` calls as its numbered steps: inputs (the canvas the editing inputs
decide, then one validation pass), text conditioning, initial latents, the per-step extras, the output.

Each takes the pipeline and the validated settings (validation.GenerationSettings), so `generate()` reads
as its five steps and a new per-step feature adds a StepExtra in `step_extras`, not a branch in the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from .editing.control import ControlNetResiduals, check_control, control_units
from .editing.inpaint import InpaintBlend, prepare_inpaint
from .images import from_pil_or_array, to_output
from .preview import Preview, latent_rgb, taesd_rgb
from .sampling.guidance import GuidanceConfig
from .sampling.loop import StepCallback, StepExtra
from .sampling.memory import bounded_work
from .sampling.schedule import img2img_start_index
from .validation import GenerationSettings, validate_generation

if TYPE_CHECKING:
    from .pipeline import StableDiffusion35


@dataclass
class Canvas:
    """What the editing inputs add to the checked settings: the img2img / inpainting source image at the
    canvas size (NHWC, [-1, 1]), the inpainting plan (editing/inpaint.py) and the checked ControlNet
    inputs (editing/control.py)."""

    init_image: mx.array | None = None
    inpaint: Any = None
    control: Any = None


def prepare_inputs(pipe: StableDiffusion35, arguments: dict) -> tuple[GenerationSettings, Canvas]:
    """Inpainting's crop and the control images set the canvas (size, source image) first; then every
    argument is checked in one pass (validation.py) before any work."""
    canvas = Canvas()
    image, height, width = arguments["image"], arguments["height"], arguments["width"]
    if arguments["mask_image"] is not None:
        canvas.inpaint = prepare_inpaint(
            image, arguments["mask_image"], height, width, arguments["padding_mask_crop"], pipe.vae_scale_factor
        )
        image, height, width = canvas.inpaint.image, canvas.inpaint.height, canvas.inpaint.width
    if arguments["control_image"] is not None:  # ControlNets: checked against the transformer before any work
        canvas.control = check_control(
            pipe.controlnets,
            pipe.transformer_config,
            arguments["control_image"],
            arguments["controlnet_conditioning_scale"],
            arguments["control_guidance_start"],
            arguments["control_guidance_end"],
        )
        if image is None and not (height and width):
            height, width = canvas.control.default_size()
    settings = validate_generation(pipe.limits, **{**arguments, "image": image, "height": height, "width": width})
    if image is not None:
        canvas.init_image = from_pil_or_array(image, height, width, multiple=16)  # the size checked resolves to
    return settings, canvas


def conditioning(pipe: StableDiffusion35, s: GenerationSettings, do_cfg: bool):
    """(cond, uncond, pooled, uncond_pooled): the given embeddings repeated per image, or the prompts
    encoded (cached: a new seed for the same prompt skips the text encoders)."""
    if s.prompt_embeds is not None:
        return _given_embeds(
            s.prompt_embeds,
            s.negative_prompt_embeds,
            s.pooled_prompt_embeds,
            s.negative_pooled_prompt_embeds,
            s.num_images_per_prompt,
            do_cfg,
        )
    return pipe._encode_cached(
        s.prompt,
        negative_prompt=s.negative_prompt,
        prompt_2=s.prompt_2,
        prompt_3=s.prompt_3,
        num_images_per_prompt=s.num_images_per_prompt,
        max_sequence_length=s.max_sequence_length,
        do_classifier_free_guidance=do_cfg,
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


def initial_latents(pipe: StableDiffusion35, s: GenerationSettings, canvas: Canvas, batch: int, sigmas) -> Start:
    """Noise from the seed (or the given latents); with a source image, the image encoded and noised to the
    start step that `strength` gives, as diffusers' img2img."""
    f = pipe.vae_scale_factor
    shape = (batch, s.height // f, s.width // f, pipe.transformer_config.in_channels)
    noise = pipe._initial_noise(s.latents, shape, s.seed)
    if canvas.init_image is None:
        mx.eval(noise)
        return Start(noise, 0, noise, None)
    start = img2img_start_index(s.num_inference_steps, s.strength)
    z = pipe.vae.scale_latents(pipe._encode(canvas.init_image.astype(pipe.dtype)).astype(mx.float32))
    if z.shape[0] != batch:
        if batch % z.shape[0]:
            raise ValueError(f"cannot spread {z.shape[0]} input images over {batch} prompts")
        z = mx.repeat(z, batch // z.shape[0], axis=0)
    sigma = float(sigmas[start])
    x = sigma * noise + (1.0 - sigma) * z
    mx.eval(x)
    return Start(x, start, noise, z)


def step_extras(
    pipe: StableDiffusion35,
    s: GenerationSettings,
    canvas: Canvas,
    begin: Start,
    conditions: tuple[mx.array, mx.array],
    velocity,
    do_cfg: bool,
    timesteps,
) -> list[StepExtra]:
    """The per-step features of this call, in the order the loop runs them (sampling/loop.py): cancel,
    ControlNet residuals (a model input), the inpainting blend (after each step), callback, previews.
    `conditions`: the (context, pooled) batch the transformer gets, which the ControlNets get too;
    `timesteps`: the run's schedule as the model sees it (sigma * 1000)."""
    extras: list[StepExtra] = [pipe._cancellation.check]
    if canvas.control is not None:
        context, pooled = conditions
        batch = context.shape[0] // (2 if do_cfg else 1)
        units = control_units(pipe.controlnets, canvas.control, pipe.vae, s.height, s.width, batch, do_cfg, pipe.dtype)
        extras.append(
            ControlNetResiduals(
                units,
                context,
                pooled,
                timesteps,
                begin.start,
                do_cfg,
                pipe.dtype,
                velocity.transformer.pos_embed,
            )
        )
    if canvas.inpaint is not None:  # re-imposes the unmasked region after every step
        extras.append(InpaintBlend(begin.z, begin.noise, canvas.inpaint.latent_mask))
    if s.callback is not None:
        extras.append(StepCallback(s.callback))
    if s.preview is not None:
        render = latent_rgb if s.preview == "rgb" else taesd_rgb(pipe._taesd_decoder(), pipe.dtype)
        extras.append(Preview(render, s.preview_every, s.on_preview))
    return extras


def decode_output(pipe: StableDiffusion35, x: mx.array, s: GenerationSettings, canvas: Canvas):
    """Latents -> images in [0, 1] (the VAE, tiled when needed, or TAESD), as `output_type` asks; an
    inpainting crop is pasted back over the original at 8 bit."""
    if s.output_type == "latent":
        return x
    vae = pipe._taesd_decoder() if s.decoder == "taesd" else pipe.vae
    with bounded_work(pipe.work_budget):
        decode = pipe._decode if s.decoder == "vae" else vae.decode
        images = decode(vae.unscale_latents(x).astype(pipe.dtype))
        images = mx.clip(images.astype(mx.float32) / 2 + 0.5, 0.0, 1.0)
        mx.eval(images)
    if canvas.inpaint is not None and canvas.inpaint.crop is not None:
        pasted = canvas.inpaint.paste_back(to_output(images, "pil"))
        return pasted if s.output_type == "pil" else np.stack([np.asarray(p, np.float32) / 255 for p in pasted])
    return to_output(images, s.output_type)


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
