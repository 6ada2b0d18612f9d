"""The SDE samplers' noise as ComfyUI draws it: increments of a Brownian motion from a seeded Brownian tree.

ComfyUI's dpmpp_sde, dpmpp_2m_sde and dpmpp_3m_sde (comfy/k_diffusion/sampling.py at commit
a125cd84b054a57729b5eecab930ca9408719832: BrownianTreeNoiseSampler, BatchedBrownianTree) do not draw fresh
noise per step: they ask a ``torchsde.BrownianTree(sigma_min, zeros_like(x), sigma_max, entropy=seed)``
for the increment W(sigma_next, sigma) and divide it by its standard deviation. The increment over an
interval is fixed by the seed alone, whatever else is queried, so a step's noise depends on the sigmas.

`BrownianTree` is torchsde 0.2.6's BrownianTree (torchsde/_brownian/brownian_interval.py and derived.py:
BrownianInterval with halfway_tree=True, tol=1e-6, pool_size=24, no Levy area) written over NumPy, with
each normal draw a fresh torch.Generator seeded from a NumPy SeedSequence, through our torch-compatible
sources (sampling/noise.py): ``rng="cpu"`` gives torchsde's numbers on CPU bit for bit, as ComfyUI draws
them (cpu=True). `BrownianNoise` is BrownianTreeNoiseSampler on our NHWC latents.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .noise import NoiseGenerator, check_rng, check_seed

if TYPE_CHECKING:
    import mlx.core as mx

_F32 = np.float32
TOL = 1e-6  # torchsde.BrownianTree's default: times are rounded to 6 decimals, the depth of the tree's search
POOL_SIZE = 24  # torchsde.BrownianTree's default SeedSequence pool size
# Increments kept: a sampler's query needs the paths to both its ends (~20 levels, two children each): 96
# halves the draws of 48 (torchsde keeps 45), within a memory budget for large latents.
CACHE_SIZE, MIN_CACHE_SIZE, CACHE_BYTES = 96, 48, 256 * 2**20
_NDIGITS = -int(math.log10(TOL))  # as torchsde computes it


class _Node:
    """An interval [start, end] of the tree; split once, at its (rounded) half, into left and right children."""

    __slots__ = ("start", "end", "parent", "is_left", "midway", "spawn_key", "depth", "seed", "left", "right")

    def __init__(self, start: float, end: float, parent: _Node | None, is_left: bool):
        self.start, self.end = round(start, _NDIGITS), round(end, _NDIGITS)
        self.parent, self.is_left = parent, is_left
        self.midway: float | None = None
        # torchsde's _set_spawn_key_and_depth: the path from the root in binary, and its length
        self.spawn_key = 0 if parent is None else 2 * parent.spawn_key + (not is_left)
        self.depth = 0 if parent is None else parent.depth + 1

    def split(self, entropy: int) -> None:
        # torchsde's _split_exact: the children's bridge draw is seeded by (entropy, spawn key, depth).
        midway = 0.5 * (self.end + self.start)
        self.midway = round(midway, _NDIGITS)
        sequence = np.random.SeedSequence(entropy=entropy, spawn_key=(self.spawn_key, self.depth), pool_size=POOL_SIZE)
        self.seed = int(sequence.generate_state(4)[0])  # W's seed (the other three serve the Levy area)
        self.left, self.right = _Node(self.start, midway, self, True), _Node(midway, self.end, self, False)


class BrownianTree:
    """``torchsde.BrownianTree(t0, torch.zeros(shape), t1, entropy=seed)`` over [t0, t1] (float32 values;
    ``tree(ta, tb)`` is W(tb) - W(ta) as a float32 array of `shape`, torch order, t0 <= ta <= tb <= t1).

    Times are clamped to [t0, t1] as torchsde clamps them. Two times that round to the same 6 decimals but
    differ give zeros here (torchsde fails there with a RecursionError)."""

    def __init__(self, shape: Sequence[int], t0: float, t1: float, seed: int, rng: str = "cpu"):
        t0, t1 = float(t0), float(t1)
        if not t0 <= t1:
            raise ValueError(f"the tree's interval must have t0 <= t1, got [{t0}, {t1}]")
        self.shape, self.seed, self.rng = tuple(shape), check_seed(seed), check_rng(rng)
        self._root = _Node(t0, t1, None, False)
        self._cache: OrderedDict[_Node, np.ndarray] = OrderedDict()
        self._cache_size = min(CACHE_SIZE, max(MIN_CACHE_SIZE, CACHE_BYTES // (4 * max(1, math.prod(self.shape)))))
        w_seed = int(np.random.SeedSequence(entropy=self.seed, pool_size=POOL_SIZE).generate_state(3)[0])
        self._root_w = self._randn(w_seed) * _F32(math.sqrt(t1 - t0))  # the unrounded ends, as torchsde

    def _randn(self, seed: int) -> np.ndarray:
        return NoiseGenerator(seed, self.rng).randn(self.shape)

    def __call__(self, ta: float, tb: float) -> np.ndarray:
        root = self._root
        ta, tb = (min(max(float(t), root.start), root.end) for t in (ta, tb))
        if ta > tb:
            raise ValueError(f"query times must have ta <= tb, got ta={ta}, tb={tb}")
        ta, tb = round(ta, _NDIGITS), round(tb, _NDIGITS)
        if ta == tb:
            return np.zeros(self.shape, _F32)
        pieces = self._locate(ta, tb)
        w = self._increment(pieces[0])
        for piece in pieces[1:]:
            w = w + self._increment(piece)
        return w

    def _locate(self, ta: float, tb: float) -> list[_Node]:
        """The tree's intervals that make up [ta, tb], left to right, splitting as torchsde's _loc does."""
        out, todo = [], [(self._root, ta, tb)]
        while todo:
            node, a, b = todo.pop()
            if a == node.start and b == node.end:
                out.append(node)
            elif node.midway is None:
                self._split_towards(node, b if a == node.start else a)
                todo.append((node, a, b))
            elif b <= node.midway:
                todo.append((node.left, a, b))
            elif a >= node.midway:
                todo.append((node.right, a, b))
            else:
                todo += [(node.right, node.midway, b), (node.left, a, node.midway)]
        return out

    def _split_towards(self, node: _Node, point: float) -> None:
        # halfway_tree: split at halves until a split lands on the point (all times are 6-decimal roundings)
        while True:
            node.split(self.seed)
            if point == node.midway:
                return
            node = node.right if point > node.midway else node.left

    def _increment(self, node: _Node) -> np.ndarray:
        """W over the node's interval: down from the nearest known ancestor by Brownian bridges."""
        path = []
        while node.parent is not None and node not in self._cache:
            path.append(node)
            node = node.parent
        if node.parent is None:
            w = self._root_w
        else:
            w = self._cache[node]
            self._cache.move_to_end(node)  # least recently used goes first
        for child in reversed(path):
            w = self._bridge(child.parent, w)[not child.is_left]
        return w

    def _bridge(self, parent: _Node, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both children's increments given the parent's w, in torchsde's float32 operations (left = the
        bridge's mean + its deviation times one draw, right = w - left), both cached."""
        h_reciprocal = 1 / (parent.end - parent.start)
        left_diff, right_diff = parent.midway - parent.start, parent.end - parent.midway
        mean = w * _F32(left_diff) * _F32(h_reciprocal)
        left = mean + _F32(math.sqrt(left_diff * right_diff * h_reciprocal)) * self._randn(parent.seed)
        right = w - left
        for child, value in ((parent.left, left), (parent.right, right)):
            self._cache[child] = value
            self._cache.move_to_end(child)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return left, right


def sde_sigma_bounds(sigmas: np.ndarray) -> tuple[float, float]:
    """(sigma_min, sigma_max) of the schedule a sampler runs, as ComfyUI's SDE samplers bound their tree:
    the smallest positive sigma and the largest, before the first sigma is moved off 1.0."""
    sigmas = np.asarray(sigmas, _F32)
    return float(sigmas[sigmas > 0].min()), float(sigmas.max())


class BrownianNoise:
    """ComfyUI's BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed, cpu=True) on an NHWC latent:
    ``noise(sigma, sigma_next)`` is -W(sigma_next, sigma) / sqrt(|sigma_next - sigma|) in float32, a standard
    normal draw. One seed: one tree over the whole batch (ComfyUI's KSampler); a list of seeds: one tree
    per image (its batched form), each of the image's shape."""

    def __init__(
        self, nhwc_shape: Sequence[int], sigma_min: float, sigma_max: float, seed: int | Sequence[int], rng: str = "cpu"
    ):
        b, h, w, c = nhwc_shape
        if isinstance(seed, (list, tuple)):
            if len(seed) != b:
                raise ValueError(f"{len(seed)} seeds for a batch of {b}")
            shapes = [((1, c, h, w), s) for s in seed]
        else:
            shapes = [((b, c, h, w), seed)]
        lo, hi = sorted((float(_F32(sigma_min)), float(_F32(sigma_max))))
        self.trees = [BrownianTree(shape, lo, hi, s, rng) for shape, s in shapes]

    def draw(self, sigma: float, sigma_next: float) -> np.ndarray:
        """The normalized increment in torch order (B, C, H, W), float32."""
        s, s_next = _F32(sigma), _F32(sigma_next)
        lo, hi = (s_next, s) if s_next < s else (s, s_next)
        sign = _F32(-1) if s_next < s else _F32(1)
        w = np.concatenate([tree(lo, hi) for tree in self.trees]) * sign
        return w / np.sqrt(np.abs(s_next - s))

    def __call__(self, sigma: float, sigma_next: float) -> mx.array:
        import mlx.core as mx

        return mx.array(self.draw(sigma, sigma_next).transpose(0, 2, 3, 1))


BrownianSource = Callable[[tuple[int, ...], float, float], Callable[[float, float], "mx.array"]]
