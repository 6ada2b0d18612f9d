"""ControlNet conditioning with diffusers' StableDiffusion3ControlNetPipeline conventions, as a StepExtra.

Each ControlNet sees the same latents, timestep and prompt as the transformer (its own context embedder;
zero pooled text when `force_zeros_for_pooled_projection`), plus its control image encoded by the VAE (posterior
mean; without the VAE shift when `force_zeros_for_pooled_projection`, as InstantX trained). Its block residuals,
times `controlnet_conditioning_scale`, are summed over ControlNets and handed to the velocity function as
`block_residuals`. A ControlNet acts on step i of N when not (i / N < start or (i + 1) / N > end); off-steps skip
its forward (diffusers runs it and multiplies by 0: the same sum).

Differences from diffusers, on purpose: the VAE posterior mean instead of a sample (as our img2img); with several
ControlNets each follows its own config (diffusers applies the first one's `force_zeros_for_pooled_projection` to all).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from PIL import Image

from ..images import from_pil_or_array
from ..models.controlnet import SD3ControlNetModel
from ..sampling.guidance import ModulationTable
from ..sampling.loop import Step, StepExtra


@dataclass
class ControlUnit:
    """One ControlNet with its control latents (model batch: [uncond, cond] halves with CFG) and settings."""

    net: SD3ControlNetModel
    latents: mx.array
    scale: float
    start: float
    end: float

    def active(self, i: int, n: int) -> bool:
        return not (i / n < self.start or (i + 1) / n > self.end)


def check_fits(net: SD3ControlNetModel, transformer_config, what: str = "controlnet") -> None:
    """Refuse a ControlNet made for another transformer (e.g. an SD3.5 Large one on Medium) before any work."""
    c, t = net.config, transformer_config
    if c.hidden_size != t.num_attention_heads * t.attention_head_dim:
        raise ValueError(
            f"{what} has width {c.hidden_size} but this transformer has "
            f"{t.num_attention_heads * t.attention_head_dim}: it was made for another model "
            "(SD3.5 Large ControlNets, width 2432, do not fit SD3.5 Medium)"
        )
    if (c.in_channels, c.patch_size) != (t.in_channels, t.patch_size):
        raise ValueError(
            f"{what} takes {c.in_channels}-channel latents in {c.patch_size}x{c.patch_size} patches, "
            f"the transformer {t.in_channels} in {t.patch_size}x{t.patch_size}"
        )
    if c.joint_attention_dim not in (None, t.joint_attention_dim):
        raise ValueError(
            f"{what} expects {c.joint_attention_dim}-wide text features, the transformer uses {t.joint_attention_dim}"
        )


def as_list(value, n: int, name: str) -> list:
    """A scalar for every ControlNet, or one value per ControlNet."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} ControlNet(s)")
        return list(value)
    return [value] * n


@dataclass(frozen=True)
class ControlRequest:
    """The validated per-ControlNet arguments of a generate() call."""

    images: list
    scales: list[float]
    starts: list[float]
    ends: list[float]

    def default_size(self) -> tuple[int, int]:
        """(height, width) of the first control image, rounded down to 16 px (the size when none is given)."""
        image = self.images[0]
        if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
            with Image.open(image) as im:
                w, h = im.size
        elif isinstance(image, Image.Image):
            w, h = image.size
        else:
            a = np.asarray(image)
            h, w = a.shape[-3:-1]
        return h // 16 * 16, w // 16 * 16


def check_control(nets, transformer_config, images, scales, starts, ends) -> ControlRequest:
    """Validate a ControlNet request before any work: the nets fit the transformer, one image per net."""
    n = len(nets)
    if not n:
        raise ValueError("control_image needs a ControlNet: from_pretrained(..., controlnet=...) or load_controlnet")
    for k, net in enumerate(nets):
        check_fits(net, transformer_config, f"controlnet {k}")
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if len(images) != n or any(im is None for im in images):
        raise ValueError(f"control_image has {len(images)} image(s) for {n} ControlNet(s); give one per ControlNet")
    if len({len(net.controlnet_blocks) for net in nets}) > 1:
        raise ValueError("ControlNets used together must have the same number of blocks (their residuals are summed)")
    request = ControlRequest(
        images,
        [float(s) for s in as_list(scales, n, "controlnet_conditioning_scale")],
        [float(s) for s in as_list(starts, n, "control_guidance_start")],
        [float(e) for e in as_list(ends, n, "control_guidance_end")],
    )
    for k, (start, end) in enumerate(zip(request.starts, request.ends, strict=True)):
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(
                f"control_guidance_start/end must satisfy 0 <= start < end <= 1, got {start}, {end} (ControlNet {k})"
            )
    return request


def control_units(
    nets: Sequence[SD3ControlNetModel],
    request: ControlRequest,
    vae,
    height: int,
    width: int,
    batch: int,
    cfg: bool,
    dtype: mx.Dtype,
) -> list[ControlUnit]:
    """Encode the control images (NHWC latents, spread over the batch, doubled for CFG)."""
    units = []
    for net, image, scale, start, end in zip(
        nets, request.images, request.scales, request.starts, request.ends, strict=True
    ):
        z = encode_control_image(vae, image, height, width, net.config.force_zeros_for_pooled_projection, dtype)
        if z.shape[0] != batch:
            if batch % z.shape[0]:
                raise ValueError(f"cannot spread {z.shape[0]} control images over a batch of {batch}")
            z = mx.repeat(z, batch // z.shape[0], axis=0)
        z = mx.concatenate([z, z]) if cfg else z
        units.append(ControlUnit(net, z.astype(dtype), scale, start, end))
    return units


def encode_control_image(vae, image, height: int, width: int, no_shift: bool, dtype: mx.Dtype) -> mx.array:
    """Control image (resized to height x width) -> model-space latents: (mean - shift) * scale, shift 0 if asked."""
    pixels = from_pil_or_array(image, height, width, multiple=16)
    z = vae.encode(pixels.astype(dtype)).astype(mx.float32)
    shift = 0.0 if no_shift else vae.config.shift_factor
    return (z - shift) * vae.config.scaling_factor


def _modulations_of(net: SD3ControlNetModel, pooled: mx.array):
    return lambda timesteps: net.schedule_modulations(mx.array(timesteps), pooled)


class ControlNetResiduals(StepExtra):
    """Gives the velocity function `block_residuals`: the ControlNets' outputs summed, on their active steps.

    Every model evaluation gets them at its own sigma (timestep sigma * 1000), a sampler's midpoints too; the
    on/off window goes by step index."""

    def __init__(
        self,
        units: Sequence[ControlUnit],
        context: mx.array,
        pooled: mx.array,
        timesteps: Sequence[float],
        start: int,
        cfg: bool,
        dtype: mx.Dtype,
        patch_embed=None,
    ):
        self.units = list(units)
        self.num_steps = len(timesteps)
        self.start = start
        self.cfg = cfg
        self.dtype = dtype
        self.patch_embed = patch_embed  # the transformer's, for ControlNets without their own
        self.contexts, self.tables = [], []
        for u in self.units:  # the text side and adaLN vectors of each ControlNet, for every step, once
            ctx = u.net.context_embedder(context.astype(dtype)) if u.net.joint else None
            pooled_in = mx.zeros_like(pooled) if u.net.config.force_zeros_for_pooled_projection else pooled
            self.contexts.append(ctx)
            self.tables.append(ModulationTable(_modulations_of(u.net, pooled_in.astype(dtype)), timesteps[start:]))
        self.pos: list = [None] * len(self.units)
        mx.eval(self.contexts)

    def model_inputs(self, step: Step, x: mx.array) -> dict:
        i = step.index
        xin = (mx.concatenate([x, x]) if self.cfg else x).astype(self.dtype)
        total = None
        for k, u in enumerate(self.units):
            if not u.active(i, self.num_steps) or u.scale == 0:
                continue
            embed = u.net.pos_embed if u.net.config.use_pos_embed else self.patch_embed
            if self.pos[k] is None:
                p = u.net.config.patch_size
                self.pos[k] = embed.cropped_pos_embed(x.shape[1] // p, x.shape[2] // p)
            mods = self.tables[k].at(step.sigma)  # the timestep of this evaluation (a sampler's midpoint too)
            r = u.net.residuals(xin, u.latents, self.contexts[k], mods, u.scale, embed, self.pos[k])
            total = r if total is None else [a + b for a, b in zip(total, r, strict=True)]
        return {} if total is None else {"block_residuals": total}
