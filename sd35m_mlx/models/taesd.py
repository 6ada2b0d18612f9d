"""madebyollin's tiny autoencoder (TAESD3 for SD3) in mlx.nn, NHWC: diffusers' `AutoencoderTiny`.

Attribute names equal diffusers' state-dict keys (`decoder.layers.3.conv.0.weight`), so a diffusers
folder loads strictly with no renaming. The decoder is Conv + ReLU residual blocks and 2x nearest
upsampling (1.2 M parameters for TAESD3, against 49 M in the SD3 VAE decoder), so a full-size decode
costs a small fraction of the VAE's.

Latent spaces. TAESD models are trained on the diffusion model's latents as the model sees them
(madebyollin/taesd README: TAESD's "scale_factor" is 1), so TAESD3's published config has
scaling_factor 1.0 and shift_factor 0.0 and `decode(unscale_latents(x))` is `decode(x)`. The
scaling is kept general, as diffusers' SD3 pipeline applies it: `latents / scaling_factor + shift_factor`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .vae_blocks import Conv2d, run_staged

# diffusers' get_activation names -> MLX modules (no parameters); the residual fuse is always ReLU.
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "mish": nn.Mish,
}


@dataclass(frozen=True)
class TAESDConfig:
    """diffusers `AutoencoderTiny` config.json; defaults are TAESD3's (madebyollin/taesd3)."""

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    latent_channels: int = 16
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_magnitude: float = 3.0
    latent_shift: float = 0.5
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    @classmethod
    def from_dict(cls, d: Mapping) -> TAESDConfig:
        if d.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
            raise ValueError(f"it describes a {d['_class_name']}, not an AutoencoderTiny (TAESD)")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        for side in ("encoder", "decoder"):
            for key in (f"{side}_block_out_channels", f"num_{side}_blocks"):
                if key in kwargs:
                    kwargs[key] = tuple(kwargs[key])
        if kwargs.get("shift_factor") is None:  # configs written before diffusers had the key
            kwargs["shift_factor"] = 0.0
        config = cls(**kwargs)
        if config.act_fn not in _ACTIVATIONS:
            raise ValueError(f"act_fn={config.act_fn!r} is not supported (only {', '.join(_ACTIVATIONS)})")
        if config.upsample_fn != "nearest":
            raise ValueError(f"upsample_fn={config.upsample_fn!r} is not supported (only 'nearest')")
        for side in ("encoder", "decoder"):
            channels, blocks = getattr(config, f"{side}_block_out_channels"), getattr(config, f"num_{side}_blocks")
            if len(channels) != len(blocks):
                raise ValueError(f"{side}_block_out_channels and num_{side}_blocks differ in length")
        return config

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        """As diffusers registers it (the decoder's): the pipeline's downscale is 2 ** (len - 1)."""
        return self.decoder_block_out_channels

    @property
    def downscale(self) -> int:
        return self.upsampling_scaling_factor ** (len(self.decoder_block_out_channels) - 1)


class AutoencoderTinyBlock(nn.Module):
    """Three 3x3 convs with activations, plus a (1x1 when widths differ) skip, fused by a ReLU."""

    def __init__(self, in_channels: int, out_channels: int, act_fn: str):
        super().__init__()
        act = _ACTIVATIONS[act_fn]
        self.conv = [
            Conv2d(in_channels, out_channels, 3, padding=1),
            act(),
            Conv2d(out_channels, out_channels, 3, padding=1),
            act(),
            Conv2d(out_channels, out_channels, 3, padding=1),
        ]
        if in_channels != out_channels:
            self.skip = Conv2d(in_channels, out_channels, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        h = x
        for layer in self.conv:
            h = layer(h)
        return nn.relu(h + (self.skip(x) if "skip" in self else x))


class Upsample(nn.Module):
    """Nearest-neighbour upsampling by an integer factor (no parameters)."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        f = self.factor
        return mx.broadcast_to(x[:, :, None, :, None, :], (b, h, f, w, f, c)).reshape(b, h * f, w * f, c)


class EncoderTiny(nn.Module):
    """Images in [-1, 1] -> latents (raw: no scaling), as diffusers' EncoderTiny."""

    def __init__(self, config: TAESDConfig):
        super().__init__()
        ch = config.encoder_block_out_channels
        layers: list[nn.Module] = []
        for i, num_blocks in enumerate(config.num_encoder_blocks):
            if i == 0:
                layers.append(Conv2d(config.in_channels, ch[i], 3, padding=1))
            else:
                layers.append(Conv2d(ch[i], ch[i], 3, padding=1, stride=2, bias=False))
            layers += [AutoencoderTinyBlock(ch[i], ch[i], config.act_fn) for _ in range(num_blocks)]
        layers.append(Conv2d(ch[-1], config.latent_channels, 3, padding=1))
        self.layers = layers

    def stages(self) -> list[Callable[[mx.array], mx.array]]:
        """The forward pass as consecutive steps, so a caller can evaluate (and free) between them."""
        return [lambda x: (x + 1) / 2, *self.layers]  # TAESD works on images in [0, 1]

    def __call__(self, x: mx.array) -> mx.array:
        for step in self.stages():
            x = step(x)
        return x


class DecoderTiny(nn.Module):
    """Latents -> images in [-1, 1], as diffusers' DecoderTiny (tanh clamp of the input to +-3 first)."""

    def __init__(self, config: TAESDConfig):
        super().__init__()
        ch, blocks = config.decoder_block_out_channels, config.num_decoder_blocks
        layers: list[nn.Module] = [Conv2d(config.latent_channels, ch[0], 3, padding=1), _ACTIVATIONS[config.act_fn]()]
        for i, num_blocks in enumerate(blocks):
            last = i == len(blocks) - 1
            layers += [AutoencoderTinyBlock(ch[i], ch[i], config.act_fn) for _ in range(num_blocks)]
            if not last:
                layers.append(Upsample(config.upsampling_scaling_factor))
            layers.append(Conv2d(ch[i], config.out_channels if last else ch[i], 3, padding=1, bias=last))
        self.layers = layers

    def stages(self) -> list[Callable[[mx.array], mx.array]]:
        """The forward pass as consecutive steps, so a caller can evaluate (and free) between them."""
        return [lambda z: mx.tanh(z / 3) * 3, *self.layers, lambda x: x * 2 - 1]

    def __call__(self, z: mx.array) -> mx.array:
        for step in self.stages():
            z = step(z)
        return z


class AutoencoderTiny(nn.Module):
    """TAESD: `decode` (and `encode` when built with the encoder) with the AutoencoderKL's interface.

    `encoder=False` builds the decoder alone (madebyollin's raw `taesd3_decoder.safetensors` has no
    encoder), and `encode` then raises.
    """

    def __init__(self, config: TAESDConfig, *, encoder: bool = True):
        super().__init__()
        self.config = config
        if encoder:
            self.encoder = EncoderTiny(config)
        self.decoder = DecoderTiny(config)

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.layers[0].weight.dtype

    # --- latent scaling, as the SD3 pipeline applies it (identities for TAESD3's config) ---

    def scale_latents(self, z: mx.array) -> mx.array:
        """This autoencoder's latent -> model latent: (z - shift_factor) * scaling_factor.

        Not diffusers' AutoencoderTiny.scale_latents (which maps latents into [0, 1] for storing
        them as images): the name and meaning follow our AutoencoderKL, so the two are interchangeable.
        """
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z: mx.array) -> mx.array:
        """Model latent -> this autoencoder's latent: z / scaling_factor + shift_factor."""
        return z / self.config.scaling_factor + self.config.shift_factor

    # --- encoding / decoding ---

    def encode(self, images: mx.array) -> mx.array:
        """Images NHWC in [-1, 1] -> latents NHWC (B, H/8, W/8, latent_channels), unscaled."""
        if "encoder" not in self:
            raise ValueError("this TAESD was loaded without its encoder (a decoder-only checkpoint)")
        return run_staged(self.encoder.stages(), images)

    def decode(self, z: mx.array) -> mx.array:
        """Latents NHWC (unscaled) -> images NHWC, roughly in [-1, 1] (not clipped), as diffusers'
        `AutoencoderTiny.decode(...).sample`."""
        return run_staged(self.decoder.stages(), z)
