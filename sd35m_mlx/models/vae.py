"""SD3 AutoencoderKL (16 latent channels) in mlx.nn: NHWC images in [-1, 1] <-> NHWC latents.

Memory. The whole float32 decoder activation stack at 1024 x 1024 is tens of GiB, and MLX's CPU
convolution unfolds its input 9x (im2col: 9 GiB for one 3x3 conv over 1024 x 1024 x 256). So:
- `encode` / `decode` evaluate stage by stage (one resnet, attention or resampler at a time, an
  `mx.eval` in between): only one stage's intermediates are ever alive;
- convolutions over large inputs run in bands of rows (`vae_blocks.Conv2d`, exact), and the
  mid-block attention in query chunks (exact), so no single op needs a huge buffer and MLX can
  throttle under its memory limit (`mx.set_memory_limit`);
- GroupNorm reduces in place of nn.GroupNorm's transposed copies (and is more accurate on CPU);
- tiled decoding and encoding (vae_tiling.py) bound memory by one tile for any size.

Peak memory of these choices at 512 and 1024 px: benchmarks/README.md ("Figures behind library choices").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .vae_blocks import Conv2d, DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D, group_norm, run_staged


@dataclass(frozen=True)
class VAEConfig:
    """diffusers `vae/config.json`; defaults are SD3 / SD3.5's."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: Mapping) -> VAEConfig:
        for key, allowed in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
            ("act_fn", "silu"),
        ):
            values = d.get(key, allowed)
            values = [values] if isinstance(values, str) else values
            if any(v != allowed for v in values):
                raise ValueError(f"{key}={d[key]!r} is not supported (only {allowed})")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "block_out_channels" in kwargs:
            kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        # diffusers' AutoencoderKL defaults, for keys a config leaves out (SD3's config sets them all).
        kwargs.setdefault("use_quant_conv", True)
        kwargs.setdefault("use_post_quant_conv", True)
        if kwargs.get("shift_factor") is None:
            kwargs["shift_factor"] = 0.0
        return cls(**kwargs)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], config.layers_per_block, groups, downsample=i < len(ch) - 1)
            for i in range(len(ch))
        ]
        self.mid_block = UNetMidBlock2D(ch[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = group_norm(ch[-1], groups)
        self.conv_out = Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def stages(self) -> list[Callable[[mx.array], mx.array]]:
        """The forward pass as consecutive steps, so a caller can evaluate (and free) between them."""
        steps: list[Callable[[mx.array], mx.array]] = [self.conv_in]
        for block in self.down_blocks:
            steps += block.resnets + block.get("downsamplers", [])
        steps += [self.mid_block, lambda x: self.conv_out(nn.silu(self.conv_norm_out(x)))]
        return steps

    def __call__(self, x: mx.array) -> mx.array:
        for step in self.stages():
            x = step(x)
        return x


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(ch[0], groups, config.mid_block_add_attention)
        self.up_blocks = [
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, groups, upsample=i < len(ch) - 1)
            for i in range(len(ch))
        ]
        self.conv_norm_out = group_norm(ch[-1], groups)
        self.conv_out = Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def stages(self) -> list[Callable[[mx.array], mx.array]]:
        """The forward pass as consecutive steps, so a caller can evaluate (and free) between them."""
        steps: list[Callable[[mx.array], mx.array]] = [self.conv_in, self.mid_block]
        for block in self.up_blocks:
            steps += block.resnets + block.get("upsamplers", [])
        steps.append(lambda x: self.conv_out(nn.silu(self.conv_norm_out(x))))
        return steps

    def __call__(self, z: mx.array) -> mx.array:
        for step in self.stages():
            z = step(z)
        return z


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = Conv2d(2 * c, 2 * c, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = Conv2d(c, c, 1)

    # --- latent scaling (the transformer works on scaled latents) ---

    def scale_latents(self, z: mx.array) -> mx.array:
        """VAE latent -> model latent: (z - shift_factor) * scaling_factor."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z: mx.array) -> mx.array:
        """Model latent -> VAE latent: z / scaling_factor + shift_factor."""
        return z / self.config.scaling_factor + self.config.shift_factor

    # --- encoding ---

    def encode_moments(self, images: mx.array) -> tuple[mx.array, mx.array]:
        """(mean, logvar) of the latent distribution, NHWC; logvar clamped to [-30, 20] like diffusers.

        A sample is mean + exp(0.5 * logvar) * noise (`sample_latents`).
        """
        steps = self.encoder.stages()
        if "quant_conv" in self:
            steps.append(self.quant_conv)
        h = run_staged(steps, images)
        mean, logvar = mx.split(h, 2, axis=-1)
        return mean, mx.clip(logvar, -30.0, 20.0)

    def encode(self, images: mx.array) -> mx.array:
        """Images NHWC in [-1, 1] -> latent mean NHWC (B, H/8, W/8, latent_channels), unscaled."""
        return self.encode_moments(images)[0]

    @staticmethod
    def sample_latents(mean: mx.array, logvar: mx.array, noise: mx.array) -> mx.array:
        """diffusers' latent_dist.sample() with caller-supplied standard normal noise."""
        return mean + mx.exp(0.5 * logvar) * noise

    # --- decoding ---

    def decode(self, z: mx.array) -> mx.array:
        """VAE latents NHWC (unscaled) -> images NHWC, roughly in [-1, 1] (not clipped)."""
        steps = self.decoder.stages()
        if "post_quant_conv" in self:
            steps.insert(0, self.post_quant_conv)
        return run_staged(steps, z)
