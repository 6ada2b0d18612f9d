"""Building blocks of the AutoencoderKL (resnets, mid-block attention, up/down blocks), NHWC."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

# Above this many attention scores (queries x keys) the mid-block attention runs in query chunks,
# so a 1024 px decode (16384 tokens) never holds the full 16384^2 float32 score matrix (1 GiB).
_MAX_SCORES = 1 << 26
# Above this many unfolded input elements (k * k * H * W * C) a convolution runs in bands of rows.
_MAX_UNFOLD = 1 << 24


class GroupNorm(nn.GroupNorm):
    """PyTorch's GroupNorm (eps 1e-6) on channels-last input, with statistics in float32.

    Same parameters and semantics as nn.GroupNorm(pytorch_compatible=True), which transposes the
    input twice (4x its size in temporaries) and, on MLX 0.32's CPU backend, drifts on long groups
    (this two-pass version stays as close to a float64 reference as torch's float32). The statistics
    come from per-channel means over the pixels (a reduction over one axis of (B, H*W, C)), then
    averaged within each group: reducing over two non-adjacent axes of a (B, H*W, groups, C/groups)
    view was hundreds of times slower than the convolution beside it on MLX's CUDA backend
    (figures: benchmarks/README.md).
    """

    def __init__(self, channels: int, groups: int):
        super().__init__(groups, channels, eps=1e-6, pytorch_compatible=True)

    def _group_mean(self, per_channel: mx.array) -> mx.array:
        """(B, C) per-channel values -> (B, 1, C): the mean of each channel's group, repeated."""
        b, c = per_channel.shape
        g = self.num_groups
        means = per_channel.reshape(b, g, c // g).mean(axis=-1, keepdims=True)
        return mx.broadcast_to(means, (b, g, c // g)).reshape(b, 1, c)

    # Tiled VAE passes (vae_tiling.py) set this on an instance for their duration: called as
    # `statistics_override(norm, x)` it returns the (mean, var) to normalize x with, in place of x's own.
    statistics_override: Callable[[GroupNorm, mx.array], tuple[mx.array, mx.array]] | None = None

    def statistics(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """(mean, biased variance) of each group of x (B, ..., C), float32, each (B, 1, C) (repeated per channel)."""
        b, c = x.shape[0], x.shape[-1]
        x3 = x.reshape(b, -1, c)
        mean = self._group_mean(mx.mean(x3.astype(mx.float32), axis=1))
        return mean, self._group_mean(mx.mean(_centered_square(x3, mean), axis=1))

    def __call__(self, x: mx.array) -> mx.array:
        b, c = x.shape[0], x.shape[-1]
        x3 = x.reshape(b, -1, c)
        override = self.statistics_override
        mean, var = self.statistics(x3) if override is None else override(self, x)
        scale = mx.rsqrt(var + self.eps) * self.weight
        return _scale_shift(x3, scale, self.bias - mean * scale).reshape(x.shape)


# Fused elementwise passes (one kernel, one output buffer, on every backend): unfused, GroupNorm held
# about four float32 copies of a bfloat16 activation at once.
@mx.compile
def _centered_square(x: mx.array, mean: mx.array) -> mx.array:
    return mx.square(x.astype(mx.float32) - mean)


@mx.compile
def _scale_shift(x: mx.array, scale: mx.array, shift: mx.array) -> mx.array:
    return (x.astype(mx.float32) * scale + shift).astype(x.dtype)


class Conv2d(nn.Conv2d):
    """nn.Conv2d that, on MLX's CPU backend, convolves large inputs in bands of output rows (same result).

    MLX's CPU convolution unfolds its input k * k times (im2col): 9 GiB for a 3x3 conv over a
    1024 x 1024 x 256 float32 activation. Bands bound that buffer to about 64 MiB (float32), and each
    band is evaluated on its own: left in one graph, every band's unfolded input was alive at once
    (more than unbanded; benchmarks/README.md). GPU backends convolve without unfolding the input, so
    they run the plain convolution.
    """

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        kh, kw = self.weight.shape[1:3]
        if kh * kw == 1 or kh * kw * x.size <= _MAX_UNFOLD or mx.default_device() != mx.cpu:
            return super().__call__(x)
        (sh, sw), (ph, pw) = self.stride, self.padding
        x = mx.pad(x, [(0, 0), (ph, ph), (pw, pw), (0, 0)])
        out_h = (h + 2 * ph - kh) // sh + 1
        rows = max(1, _MAX_UNFOLD // (kh * kw * b * (w + 2 * pw) * c // sw))
        bands = []
        for r in range(0, out_h, rows):
            bands.append(mx.conv2d(x[:, r * sh : (min(r + rows, out_h) - 1) * sh + kh], self.weight, (sh, sw)))
            mx.eval(bands[-1])
        y = mx.concatenate(bands, axis=1)
        return y + self.bias if "bias" in self else y


def group_norm(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(channels, groups)


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over all pixels with a residual (diffusers' VAE mid-block Attention)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        n = self.group_norm(x).reshape(b, 1, h * w, c)
        q, k, v = self.to_q(n), self.to_k(n), self.to_v(n)
        scale = c**-0.5
        chunk = max(1, _MAX_SCORES // (h * w))
        if chunk >= h * w:
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            # Softmax is per query row, so splitting the queries is exact. Each chunk is evaluated on its
            # own: left in one graph MLX schedules them together and the chunking saves nothing
            # (a quarter of the memory this way at 1024 px; benchmarks/README.md).
            mx.eval(q, k, v)
            parts = []
            for i in range(0, h * w, chunk):
                parts.append(mx.fast.scaled_dot_product_attention(q[:, :, i : i + chunk], k, v, scale=scale))
                mx.eval(parts[-1])
            o = mx.concatenate(parts, axis=2)
        return x + self.to_out[0](o).reshape(b, h, w, c)


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        # Asymmetric padding (right and bottom only), then an unpadded stride-2 conv.
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        ]
        if downsample:
            self.downsamplers = [Downsample2D(out_channels)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        ]
        if upsample:
            self.upsamplers = [Upsample2D(out_channels)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        if "upsamplers" in self:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool = True):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, groups) for _ in range(2)]
        if add_attention:
            self.attentions = [Attention(channels, groups)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        if "attentions" in self:
            x = self.attentions[0](x)
        return self.resnets[1](x)


def run_staged(steps: list[Callable[[mx.array], mx.array]], x: mx.array) -> mx.array:
    """Run a forward pass given as consecutive steps, evaluating after each, so only one step's
    intermediates are alive at a time (at 1024 px a 128-channel float32 activation is 512 MiB)."""
    for step in steps:
        x = step(x)
        mx.eval(x)
    return x
