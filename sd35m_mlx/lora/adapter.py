"""The canonical in-memory form of a LoRA file: per component, per module path in OUR module tree
(diffusers names), the factors of its weight delta. Every file format converts to this."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


class LoraError(ValueError):
    """A LoRA that cannot be used as asked; the one-line message names the file and what is wrong."""


@dataclass(frozen=True)
class Factor:
    """One adapter on one layer: delta W = scale * (up @ down) (+ dense `delta`, + `bias` on the output).

    down (rank, in), up (out, rank), in the file's float dtype. `scale` is alpha / rank (or what the format's
    alpha rule says); the user's adapter weight multiplies it later. With `magnitude` it is a DoRA adapter
    (peft's rule, layers.py: rows rescaled to magnitude / ||W + scale * up @ down||). LyCORIS LoKr / LoHa
    products, which are not low rank, come as a dense (out, in) `delta` instead of down / up.
    """

    down: mx.array | None = None
    up: mx.array | None = None
    scale: float = 1.0
    delta: mx.array | None = None
    bias: mx.array | None = None
    magnitude: mx.array | None = None  # DoRA (peft): per-output-row magnitude of the adapted weight

    @property
    def rank(self) -> int:
        return 0 if self.down is None else self.down.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight shape of the layer this factor adapts: (out, in), or (out, kh, kw, in) for a Conv2d
        (whose `down` is the (rank, kh, kw, in) convolution, MLX layout)."""
        if self.delta is not None:
            return tuple(self.delta.shape)
        return (self.up.shape[0], *self.down.shape[1:])

    def dense(self) -> mx.array:
        """scale * delta W as one float32 array of the layer's weight shape (for fusing)."""
        w = mx.zeros(self.shape, dtype=mx.float32)
        if self.down is not None:
            down = self.down.astype(mx.float32).reshape(self.rank, -1)
            w = w + (self.up.astype(mx.float32) @ down).reshape(self.shape)
        if self.delta is not None:
            w = w + self.delta.astype(mx.float32)
        return self.scale * w

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.down, self.up, self.delta, self.bias, self.magnitude) if a is not None)


@dataclass
class Adapter:
    """A loaded LoRA file: `factors[component][module path] -> [Factor, ...]`."""

    name: str
    source: str  # the path or Hub id it came from
    sha256: str  # of the file; the short form (first 10 hex digits, as A1111 and Civitai show) names it
    format: str  # what the keys looked like: "diffusers", "kohya", "stability", ...
    factors: dict[str, dict[str, list[Factor]]] = field(default_factory=dict)

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for layers in self.factors.values() for fs in layers.values() for f in fs)

    def targets(self, component: str) -> dict[str, list[Factor]]:
        return self.factors.get(component, {})
