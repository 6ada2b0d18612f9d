"""LoRA tensors of every published SD3.5 layout -> factors on OUR module paths (diffusers names).

Layouts (a file may mix them; each tensor is routed on its own):
- diffusers / PEFT: `transformer.<path>.lora_A.weight` / `lora_B`, `text_encoder{,_2,_3}.<path>...`, with or
  without `base_model.model.`; alpha from `.alpha` tensors (SimpleTuner's "comfyui" export), else from
  diffusers' `lora_adapter_metadata` header entry, else alpha = rank.
- Stability / ComfyUI: `diffusion_model.joint_blocks.N.x_block.attn.qkv...`, `text_encoders.clip_l.transformer.`:
  routed through the single-file key map (loading/keymaps.py), so fused qkv splits and the (shift, scale)
  half swap of the last context adaLN and of final_layer apply to the deltas exactly as to the weights.
- kohya sd-scripts: `lora_unet_<single-file name with _>`, `lora_te1_` / `lora_te2_` / `lora_te3_` (CLIP-L,
  CLIP-G, T5); OneTrainer legacy `lora_transformer_<diffusers name with _>`; the LyCORIS library's own naming
  `lycoris_<diffusers transformer path with _>` (what its wrapper writes around the transformer: SimpleTuner's
  default output). The `_`-joined names are looked up in tables built from our module tree and the
  single-file key map, never unflattened by guessing.
- ComfyUI prefix on diffusers names: `diffusion_model.transformer_blocks.N.attn.to_q.lora_A.weight`.
- suffixes lora_A/lora_B, lora_down/lora_up, lora.down/lora.up, lora_linear_layer.down/up, `.alpha`;
  LyCORIS LoKr (lokr_w1[_a/_b], lokr_w2[_a/_b]) and LoHa (hada_w{1,2}_{a,b}); full `.diff` / `.diff_b`;
  peft DoRA (`lora_magnitude_vector`). LyCORIS DoRA (`dora_scale`, another norm convention) is refused.

Fused qkv: delta rows split into q / k / v, so a shared `down` serves all three and `up` splits by rows.
kohya's `split_qkv` saves three rank-r LoRAs as one rank-3r LoRA with a block-diagonal `up` and the
alpha of ONE of them (sd-scripts #2204): read naively (alpha / 3r) it is 3x too weak. We detect the
block-diagonal `up` and load it back as three rank-r LoRAs with scale alpha / r, as they were trained.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import mlx.core as mx

from ..loading.keymaps import map_mmdit_weights, mmdit_module_names
from .adapter import COMPONENTS, Factor, LoraError

# suffix -> part name; longest first so `.lora_B.weight` wins over `.weight`-like tails
_SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_B.bias": "up_bias",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha",
    ".dora_scale": "dora",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
    ".lokr_w1": "lokr_w1",
    ".lokr_w1_a": "lokr_w1_a",
    ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2",
    ".lokr_w2_a": "lokr_w2_a",
    ".lokr_w2_b": "lokr_w2_b",
    ".lokr_t2": "tucker",
    ".hada_w1_a": "hada_w1_a",
    ".hada_w1_b": "hada_w1_b",
    ".hada_w2_a": "hada_w2_a",
    ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "tucker",
    ".hada_t2": "tucker",
    ".diff": "diff",
    ".diff_b": "diff_b",
}
_SUFFIX_ORDER = sorted(_SUFFIXES, key=len, reverse=True)
_STABILITY_TE = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}
_KOHYA_TE = {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3"}
_FLAT_FORMATS = {"lora_transformer_": "onetrainer", "lycoris_": "lycoris"}  # other flat prefixes: "kohya"


def split_key(key: str) -> tuple[str, str] | None:
    """(module prefix, part) of a LoRA tensor name, None if its suffix is no LoRA part we know."""
    for suffix in _SUFFIX_ORDER:
        if key.endswith(suffix):
            return key[: -len(suffix)], _SUFFIXES[suffix]
    return None


@dataclass
class KeyTables:
    """What a file's module names can refer to, built from the model: per component, module path ->
    (out, in) of each Linear (None: a layer a LoRA cannot adapt here, e.g. the patch-embedding conv)."""

    layers: dict[str, dict[str, tuple[int, int] | None]]
    num_layers: int
    stability: dict[str, list[str]] = field(init=False)  # single-file MMDiT module -> our module(s)
    flat: dict[str, dict[str, tuple[str, str]]] = field(init=False)  # kohya-style prefix -> flat -> route

    def __post_init__(self):
        transformer = self.layers.get("transformer", {})
        self.stability = {}
        probe = mx.zeros((6,))  # any row count that splits in 3 and in 2
        for name in mmdit_module_names(self.num_layers):
            ours = [k.removesuffix(".weight") for k, _ in map_mmdit_weights(f"{name}.weight", probe, self.num_layers)]
            if all(o in transformer for o in ours):
                self.stability[name] = ours
        unet = _flatten({n: ("stability", n) for n in self.stability})
        diffusers = _flatten({p: ("transformer", p) for p in transformer})
        self.flat = {
            "lora_unet_": {**diffusers, **unet},
            "lora_transformer_": {**unet, **diffusers},
            "lycoris_": diffusers,  # lycoris' wrapper names modules by their path under the wrapped transformer
            **{pre: _flatten({p: (c, p) for p in self.layers.get(c, {})}) for pre, c in _KOHYA_TE.items()},
        }


def _flatten(names: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for name, route in names.items():
        flat = name.replace(".", "_")
        if flat in out and out[flat] != route:
            raise RuntimeError(f"module names {name} and {out[flat][1]} flatten to the same {flat}")
        out[flat] = route
    return out


def route(prefix: str, tables: KeyTables) -> tuple[str, str, str] | None:
    """(format, component, name) of a module prefix; component "stability" means a single-file MMDiT name."""
    p = prefix.removeprefix("base_model.model.")
    for component in sorted(COMPONENTS, key=len, reverse=True):
        if p.startswith(component + "."):
            rest = p[len(component) + 1 :].removeprefix("base_model.model.")
            if rest in tables.layers.get(component, {}):
                return "diffusers", component, rest
            if component == "transformer" and rest in tables.stability:
                return "diffusers", "stability", rest
    if p in tables.layers.get("transformer", {}):
        return "peft", "transformer", p
    for head in ("model.diffusion_model.", "diffusion_model.", ""):
        if p.startswith(head) and p[len(head) :] in tables.stability:
            return "stability", "stability", p[len(head) :]
        if head and p.startswith(head) and p[len(head) :] in tables.layers.get("transformer", {}):
            return "comfyui", "transformer", p[len(head) :]  # ComfyUI's prefix on diffusers names (ai-toolkit)
    for name, component in _STABILITY_TE.items():
        head = f"text_encoders.{name}.transformer."
        if p.startswith(head) and p[len(head) :] in tables.layers.get(component, {}):
            return "stability", component, p[len(head) :]
    for head, table in tables.flat.items():
        if p.startswith(head) and p[len(head) :] in table:
            component, name = table[p[len(head) :]]
            return _FLAT_FORMATS.get(head, "kohya"), component, name
    return None


# ---------------------------------------------------------------------------------------------
# alpha


@dataclass(frozen=True)
class _PeftConfig:
    lora_alpha: float | None
    alpha_pattern: dict
    use_rslora: bool

    def alpha(self, module: str) -> float | None:
        # PEFT's pattern rule: a key matches a module name ending in it at a `.` boundary
        for key, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return float(value)
        return self.lora_alpha


def peft_configs(metadata: Mapping[str, str] | None) -> dict[str, _PeftConfig]:
    """diffusers' `lora_adapter_metadata` header entry ({"transformer.lora_alpha": ..., ...}) per component."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    out = {}
    for component in COMPONENTS:
        entry = {k[len(component) + 1 :]: v for k, v in flat.items() if k.startswith(component + ".")}
        if entry:
            alpha = entry.get("lora_alpha")
            out[component] = _PeftConfig(
                None if alpha is None else float(alpha),
                dict(entry.get("alpha_pattern") or {}),
                bool(entry.get("use_rslora", False)),
            )
    return out


# ---------------------------------------------------------------------------------------------
# one module's tensors -> a Factor in the file's namespace


def _f32(a: mx.array) -> mx.array:
    return a.astype(mx.float32)


def _float(a: mx.array) -> mx.array:
    """Low-rank factors stay in the file's float dtype (memory = the file's size); others become float32."""
    return a if a.dtype in (mx.float32, mx.float16, mx.bfloat16) else _f32(a)


def _kron(a: mx.array, b: mx.array) -> mx.array:
    """LoKr's product; a convolution's `b` is (b, d, kh, kw) and `a` (a, c) spans its first two axes."""
    if b.ndim == 4:
        a = a[:, :, None, None]
    return mx.kron(a, b)


def _conv_delta(factor: Factor, shape: tuple[int, ...] | None) -> Factor:
    """A dense delta for a Conv2d arrives in PyTorch's (out, in, kh, kw) layout, or flattened to
    (out, in * kh * kw) (LoHa, LoKr with a decomposed w2): to ours, (out, kh, kw, in)."""
    if factor.delta is None or shape is None or len(shape) != 4 or tuple(factor.delta.shape) == tuple(shape):
        return factor
    out, kh, kw, cin = shape
    if factor.delta.size != out * kh * kw * cin:
        return factor  # the shape check that follows names the mismatch
    delta = factor.delta.reshape(out, cin, kh, kw).transpose(0, 2, 3, 1)
    return Factor(delta=delta, scale=factor.scale, bias=factor.bias)


def make_factor(parts: dict[str, mx.array], alpha: float | None, rslora: bool, where: str) -> Factor:
    """The factor of one module's tensors; `alpha` None means alpha = rank (scale 1)."""
    if "dora" in parts:
        raise LoraError(
            f"{where}: LyCORIS / kohya DoRA (dora_scale) is not supported (peft's lora_magnitude_vector is); "
            "its weight-norm rescaling cannot be dropped without changing the result, so the file is refused"
        )
    if "magnitude" in parts and not ("down" in parts and parts["down"].ndim == 2):
        raise LoraError(f"{where}: DoRA (lora_magnitude_vector) is supported on Linear LoRAs only")
    if "tucker" in parts:
        raise LoraError(f"{where}: LyCORIS Tucker factors (lokr_t2 / hada_t1 / hada_t2) are for conv layers only")
    if "down" in parts or "up" in parts:
        if not ("down" in parts and "up" in parts):
            raise LoraError(f"{where}: has lora_{'down' if 'down' in parts else 'up'} but not its partner")
        down, up = parts["down"], parts["up"]
        if down.ndim == 4 and up.ndim == 4 and up.shape[2:] == (1, 1):
            # a convolution LoRA (PyTorch layout): down (r, in, kh, kw) -> ours (r, kh, kw, in), up 1x1
            down, up = down.transpose(0, 2, 3, 1), up.reshape(up.shape[:2])
        if down.ndim not in (2, 4) or up.ndim != 2:
            raise LoraError(f"{where}: unsupported LoRA factor shapes {tuple(down.shape)} / {tuple(up.shape)}")
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise LoraError(f"{where}: lora_up {tuple(up.shape)} does not fit lora_down {tuple(down.shape)}")
        a = float(rank) if alpha is None else alpha
        scale = a / math.sqrt(rank) if rslora else a / rank
        bias = _f32(parts["up_bias"]) if "up_bias" in parts else None
        magnitude = _f32(parts["magnitude"]).reshape(-1) if "magnitude" in parts else None
        return Factor(down=_float(down), up=_float(up), scale=scale, bias=bias, magnitude=magnitude)
    if any(k.startswith("lokr_") for k in parts):
        dim = None
        w1 = parts.get("lokr_w1")
        if w1 is None:
            w1, dim = _f32(parts["lokr_w1_a"]) @ _f32(parts["lokr_w1_b"]), parts["lokr_w1_b"].shape[0]
        w2 = parts.get("lokr_w2")
        if w2 is None:
            w2, dim = _f32(parts["lokr_w2_a"]) @ _f32(parts["lokr_w2_b"]), parts["lokr_w2_b"].shape[0]
        scale = alpha / dim if alpha is not None and dim is not None else 1.0  # LyCORIS: no alpha on full factors
        return Factor(delta=_kron(_f32(w1), _f32(w2)), scale=scale)
    if any(k.startswith("hada_") for k in parts):
        w1 = _f32(parts["hada_w1_a"]) @ _f32(parts["hada_w1_b"])
        w2 = _f32(parts["hada_w2_a"]) @ _f32(parts["hada_w2_b"])
        scale = alpha / parts["hada_w1_b"].shape[0] if alpha is not None else 1.0
        return Factor(delta=w1 * w2, scale=scale)
    if "diff" in parts or "diff_b" in parts:
        diff = _f32(parts["diff"]) if "diff" in parts else None
        return Factor(delta=diff, bias=_f32(parts["diff_b"]) if "diff_b" in parts else None)
    raise LoraError(f"{where}: only an alpha, no LoRA factors")


def _split_stability(factor: Factor, name: str, alpha: float | None, num_layers: int) -> list[tuple[str, Factor]]:
    """A factor on a single-file module -> (our path, factor) for each of its targets, through the key map."""

    def rows(a):  # the key map's qkv split / half swap act on the rows (axis 0) of the delta
        if a is None:
            return None
        return [v for _, v in map_mmdit_weights(f"{name}.weight", a, num_layers)]

    targets = [k.removesuffix(".weight") for k, _ in map_mmdit_weights(f"{name}.weight", mx.zeros((6,)), num_layers)]
    ups, deltas, biases = rows(factor.up), rows(factor.delta), rows(factor.bias)
    magnitudes = rows(factor.magnitude)
    n = len(targets)
    split = n == 3 and factor.magnitude is None and factor.down is not None and factor.rank % 3 == 0
    if split and _block_diagonal(ups):
        r = factor.rank // 3
        scale = (float(r) if alpha is None else alpha) / r
        return [
            (t, Factor(down=factor.down[i * r : (i + 1) * r], up=ups[i][:, i * r : (i + 1) * r], scale=scale))
            for i, t in enumerate(targets)
        ]
    out = []
    for i, t in enumerate(targets):
        out.append(
            (
                t,
                Factor(
                    down=factor.down,
                    up=None if ups is None else ups[i],
                    scale=factor.scale,
                    delta=None if deltas is None else deltas[i],
                    bias=None if biases is None else biases[i],
                    magnitude=None if magnitudes is None else magnitudes[i],
                ),
            )
        )
    return out


def _block_diagonal(ups: list[mx.array] | None) -> bool:
    """kohya split_qkv: q / k / v rows of `up` use only their own third of the rank columns."""
    if ups is None:
        return False
    r = ups[0].shape[1] // 3
    for i, u in enumerate(ups):
        off = mx.concatenate([u[:, : i * r], u[:, (i + 1) * r :]], axis=1)
        if not bool(mx.all(off == 0)) or not bool(mx.any(u[:, i * r : (i + 1) * r] != 0)):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# a whole file


@dataclass
class Converted:
    factors: dict[str, dict[str, list[Factor]]]
    format: str
    unmapped: list[str]  # tensor names that adapt nothing here, with the reason when there is one
    total: int


def convert(
    tensors: Mapping[str, mx.array], metadata: Mapping[str, str] | None, tables: KeyTables, source: str
) -> Converted:
    """Every tensor of one LoRA file -> factors per component and module path of ours.

    Raises LoraError when no tensor adapts anything (naming what the file looks like), for DoRA, and for a
    layer whose LoRA has the wrong shape; tensors that adapt nothing are returned in `unmapped`.
    """
    check_finite(tensors, source)
    groups: dict[str, dict[str, mx.array]] = defaultdict(dict)
    unmapped: list[str] = []
    for key, value in tensors.items():
        split = split_key(key)
        if split is None:
            unmapped.append(key)
        else:
            groups[split[0]][split[1]] = value
    configs = peft_configs(metadata)
    factors: dict[str, dict[str, list[Factor]]] = defaultdict(lambda: defaultdict(list))
    formats: Counter = Counter()
    for prefix, parts in groups.items():
        found = route(prefix, tables)
        names = [f"{prefix}.{p}" for p in parts]  # approximate key names, for the unmapped list
        if found is None:
            unmapped += names
            continue
        fmt, component, name = found
        where = f"{source}: {prefix}"
        config = configs.get("transformer" if component == "stability" else component)
        alpha = float(parts.pop("alpha").item()) if "alpha" in parts else None
        if alpha is None and config is not None:
            alpha = config.alpha(name)
        if not parts:
            unmapped += names
            continue
        factor = make_factor(parts, alpha, bool(config and config.use_rslora), where)
        target = tables.stability[name][0] if component == "stability" else name
        factor = _conv_delta(factor, tables.layers["transformer" if component == "stability" else component][target])
        if component == "stability":
            shape = tables.layers["transformer"][tables.stability[name][0]]
            if shape is None or factor.shape[1:] != shape[1:] or factor.shape[0] % len(tables.stability[name]):
                _wrong_shape(source, name, factor.shape, shape, len(tables.stability[name]))
            placed = [("transformer", t, f) for t, f in _split_stability(factor, name, alpha, tables.num_layers)]
        else:
            placed = [(component, name, factor)]
        for comp, path, f in placed:
            shape = tables.layers[comp][path]
            if shape is None:
                unmapped.append(f"{prefix} ({comp}.{path} is not a Linear layer: not supported)")
                break
            if tuple(f.shape) != tuple(shape):
                _wrong_shape(source, f"{comp}.{path}", f.shape, shape, 1)
            factors[comp][path].append(f)
        else:
            formats[fmt] += 1
    if not formats:
        raise LoraError(f"{source}: {describe(list(tensors))}")
    if "transformer" not in factors and _looks_like_other_model(unmapped):
        raise LoraError(f"{source}: {describe(unmapped)}")
    fmt = "+".join(f for f, _ in formats.most_common())
    return Converted({c: dict(v) for c, v in factors.items()}, fmt, unmapped, len(tensors))


def check_finite(tensors: Mapping[str, mx.array], source: str) -> None:
    """Refuse a file holding NaN or Inf (a damaged download, or a float16 save after an overflow): added to
    the model it would make every image black without an error. One reduction per tensor, evaluated once."""
    floats = [(k, v) for k, v in tensors.items() if mx.issubdtype(v.dtype, mx.floating)]
    if not floats:
        return
    finite = mx.stack([mx.all(mx.isfinite(v)) for _, v in floats]).tolist()
    bad = [k for (k, _), ok in zip(floats, finite, strict=True) if not ok]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise LoraError(f"{source}: tensor {bad[0]}{more} holds NaN or Inf values; the file is damaged, refused")


def _wrong_shape(source: str, layer: str, got, expected, parts: int) -> None:
    exp = "no Linear layer" if expected is None else f"(out, in) = {tuple(expected)}"
    if parts > 1 and expected is not None:
        exp = f"(out, in) = ({parts} x {expected[0]}, {expected[1]}) (fused q|k|v)"
    raise LoraError(
        f"{source}: the LoRA for {layer} has shape (out, in) = {tuple(got)}, this model's layer {exp}: "
        "a LoRA for another model (SD3 Medium, SD3.5 Large?)"
    )


_OTHER_MODELS = (
    (("double_blocks", "single_blocks", "single_transformer_blocks"), "a FLUX LoRA (double_blocks / single_blocks)"),
    (("input_blocks", "output_blocks", "lora_te2_", "text_encoder_2.", "add_embedding"), "an SDXL LoRA (UNet)"),
    (("down_blocks", "up_blocks", "mid_block", "lora_te_"), "a Stable Diffusion 1.x/2.x LoRA (UNet)"),
)


def _looks_like_other_model(keys: list[str]) -> bool:
    return any(f in k for k in keys for fragments, _ in _OTHER_MODELS for f in fragments)


def describe(keys: list[str]) -> str:
    """What a LoRA file that adapts nothing here looks like, in a few words."""
    unet = any(f in k for k in keys for f in ("input_blocks", "down_blocks", "up_blocks", "mid_block"))
    for fragments, what in _OTHER_MODELS:
        if any(f in k for k in keys for f in fragments):
            if what.startswith("an SDXL") and not unet:
                continue
            return f"looks like {what}, not an SD3 / SD3.5 LoRA"
    sample = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    return f"no tensor matches a layer of this model: not an SD3.5 LoRA we know ({len(keys)} tensors: {sample})"
