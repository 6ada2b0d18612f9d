"""diffusers' LoRA API on the pipeline (load_lora_weights, set_adapters, fuse_lora, ...).

Adapters live on the pipeline, not in the layers: every time a component is materialised (at load, and
again at each low_memory reload) `_lora_attach` gives it the active adapters. Because the LoRA sits in
the layers themselves, adaLN (norm1.linear, norm_out.linear) and embedder LoRAs are in place before
`GuidedDenoiser` precomputes the schedule's modulations, and a `set_adapters` change takes effect at
the next `generate`.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..sampling.memory import default_cache_bytes, least_recent_over_budget
from . import files, layers
from .adapter import COMPONENTS, Adapter, Factor, LoraError
from .convert import KeyTables, convert

log = logging.getLogger(__name__)

LoraSpec = str | os.PathLike | tuple[str | os.PathLike, float]


@dataclass
class _LoraState:
    adapters: dict[str, Adapter] = field(default_factory=dict)
    active: dict[str, float] = field(default_factory=dict)  # name -> weight, in load order
    fused_scale: float | None = None
    tables: KeyTables | None = None
    # use_loras' files: (real path, size, mtime) -> adapter name, least recently used first
    cached: OrderedDict[tuple[str, int, int], str] = field(default_factory=OrderedDict)


class LoraMixin:
    """LoRA adapters for StableDiffusion35 (see sd35m_mlx/lora/convert.py for the file formats)."""

    lora_cache_bytes: int | None = None  # use_loras' budget when a call gives none; None: default_cache_bytes()

    @property
    def _loras(self) -> _LoraState:
        state = self.__dict__.get("_lora_state")
        if state is None:
            state = self.__dict__["_lora_state"] = _LoraState()
        return state

    # -- public API (diffusers names) ----------------------------------------------------------

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | Mapping,
        weight_name: str | None = None,
        adapter_name: str | None = None,
        *,
        revision: str | None = None,
    ) -> str:
        """Load a LoRA file (any SD3.5 layout) and return its adapter name (`default_N` unless given).

        As in diffusers, the new adapter becomes the only active one (weight 1.0); combine loaded
        adapters with `set_adapters(names, weights)`."""
        state = self._loras
        name = adapter_name if adapter_name is not None else _next_name(state.adapters)
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
        if name in state.adapters:
            raise ValueError(f"adapter_name {name!r} is already loaded; pick another name or unload it first")
        if state.fused_scale is not None:
            raise ValueError("load_lora_weights while LoRAs are fused: call unfuse_lora() first")
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, Mapping):
            tensors, metadata, path, digest = _tensors_from_dict(source), {}, "<state dict>", ""
        else:
            path = files.resolve(source, weight_name, revision)
            tensors, metadata = files.read(path)
            digest = files.sha256(path)
        converted = convert(tensors, metadata, self._lora_tables(), str(path))
        if converted.unmapped:
            n = len(converted.unmapped)
            first = ", ".join(converted.unmapped[:3])
            warnings.warn(
                f"LoRA {path}: {n} of {converted.total} tensors adapt no layer of this model and are ignored "
                f"({first}{', ...' if n > 3 else ''})",
                stacklevel=2,
            )
        mx.eval([a for fs in converted.factors.values() for f in _all(fs) for a in _arrays(f)])
        display = Path(str(source)).stem if not isinstance(source, Mapping) else name
        state.adapters[name] = Adapter(
            name=name,
            source=str(source) if not isinstance(source, Mapping) else display,
            sha256=digest,
            format=converted.format,
            factors=converted.factors,
        )
        state.active = {name: 1.0}
        self._lora_refresh()
        return name

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights=None) -> None:
        """Activate exactly these adapters with these weights (default 1.0 each); others stay loaded, off.

        Weight 0 is exactly no adapter, DoRA included (peft would still rescale a DoRA layer's rows)."""
        state = self._loras
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (int, float)):
            weights = [float(adapter_weights)] * len(names)
        else:
            weights = [float(w) for w in adapter_weights]
        if len(weights) != len(names):
            raise ValueError(f"adapter_weights has {len(weights)} entries for {len(names)} adapter_names")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"adapter_weights must be finite numbers, got {weights}")
        unknown = [n for n in names if n not in state.adapters]
        if unknown:
            loaded = ", ".join(state.adapters) or "none"
            raise ValueError(f"adapter_names: {unknown[0]!r} is not loaded (loaded: {loaded})")
        if state.fused_scale is not None:
            raise ValueError("set_adapters while LoRAs are fused: call unfuse_lora() first")
        state.active = dict(zip(names, weights, strict=True))
        self._lora_refresh()

    def use_loras(self, loras: Sequence[tuple[str | os.PathLike, float]], cache_bytes: int | None = None) -> list[str]:
        """Make exactly these LoRAs active (files, folders or Hub ids as `load_lora_weights` takes them), with these
        weights; every other adapter is off. Returns the adapter name of each entry.

        For a server that switches LoRAs per request: a file loaded by an earlier call is reused (keyed by its
        real path, size and modification time, so an edited file loads again), and while the files loaded this
        way hold more than `cache_bytes` of parameters (None: `self.lora_cache_bytes`, else
        `default_cache_bytes()`), the least recently used one not asked for now is unloaded. The same file twice
        adds its weights."""
        if cache_bytes is None:
            cache_bytes = self.lora_cache_bytes if self.lora_cache_bytes is not None else default_cache_bytes()
        if not isinstance(cache_bytes, int) or isinstance(cache_bytes, bool) or cache_bytes < 0:
            raise ValueError(f"cache_bytes must be a whole number of bytes >= 0, got {cache_bytes!r}")
        state = self._loras
        weights: dict[str, float] = {}
        names = []
        for source, weight in loras:
            real = files.resolve(source).resolve(strict=True)  # a Hub id too (from the HF cache), as at load
            stat = real.stat()
            key = (str(real), stat.st_size, stat.st_mtime_ns)
            name = state.cached.get(key)
            if name is None or name not in state.adapters:
                name = self.load_lora_weights(real, adapter_name=_next_name(state.adapters, "cached"))
                state.cached[key] = name
            state.cached.move_to_end(key)
            weights[name] = weights.get(name, 0.0) + float(weight)
            names.append(name)
        for key in [k for k, n in state.cached.items() if n not in state.adapters]:  # deleted by other calls
            del state.cached[key]
        sizes = {key: state.adapters[n].nbytes for key, n in state.cached.items()}  # least recently used first
        requested = {key for key, n in state.cached.items() if n in weights}  # the most recent ones
        for key in least_recent_over_budget(sizes, cache_bytes, keep=requested):
            name = state.cached.pop(key)
            state.adapters.pop(name, None)
            state.active.pop(name, None)
        self.set_adapters(list(weights), list(weights.values()))
        return names

    def get_active_adapters(self) -> list[str]:
        return list(self._loras.active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Component -> the loaded adapters that adapt it (diffusers' form)."""
        out: dict[str, list[str]] = {}
        for name, adapter in self._loras.adapters.items():
            for component in adapter.factors:
                out.setdefault(component, []).append(name)
        return out

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        state = self._loras
        for name in [adapter_names] if isinstance(adapter_names, str) else list(adapter_names):
            if name not in state.adapters:
                raise ValueError(f"adapter_names: {name!r} is not loaded")
            del state.adapters[name]
            state.active.pop(name, None)
        self._lora_refresh()

    def fuse_lora(self, lora_scale: float = 1.0) -> None:
        """Merge the active adapters (times `lora_scale`) into the full-precision weights. Quantized layers
        keep the LoRA as a side path (it is never baked into a quantized weight); a warning says how many.
        `unfuse_lora` restores the original weights exactly (they are kept while fused)."""
        state = self._loras
        if state.fused_scale is not None:
            raise ValueError("LoRAs are already fused: call unfuse_lora() first")
        if not math.isfinite(float(lora_scale)):
            raise ValueError(f"lora_scale must be a finite number, got {lora_scale}")
        state.fused_scale = float(lora_scale)
        reports = self._lora_refresh()
        kept = sum(r.quantized_side_paths for r in reports)
        fused = sum(r.fused for r in reports)
        if kept:
            warnings.warn(
                f"fuse_lora: {kept} quantized layers keep their LoRA as a side path (a LoRA is never baked "
                f"into quantized weights); {fused} full-precision layers fused",
                stacklevel=2,
            )
        log.info("fuse_lora: %d layers fused, %d quantized layers keep the side path", fused, kept)

    def unfuse_lora(self) -> None:
        self._loras.fused_scale = None
        self._lora_refresh()

    def unload_lora_weights(self) -> None:
        """Remove every adapter; the model is again exactly the base model."""
        state = self._loras
        state.adapters.clear()
        state.active.clear()
        state.fused_scale = None
        self._lora_refresh()

    def lora_info(self) -> list[dict]:
        """The active adapters: name, source, short sha256, weight, format (for image metadata)."""
        state = self._loras
        return [
            {
                "name": name,
                "source": state.adapters[name].source,
                "sha256": state.adapters[name].short_hash,
                "scale": weight,
                "format": state.adapters[name].format,
            }
            for name, weight in state.active.items()
        ]

    def lora_bytes(self) -> int:
        """Bytes the loaded adapters' factors take (side paths add their active, cast copies)."""
        return sum(a.nbytes for a in self._loras.adapters.values())

    # -- wiring ---------------------------------------------------------------------------------

    def _load_loras(self, loras: Sequence[LoraSpec] | None) -> None:
        """`from_pretrained(loras=[path, (path, scale), ...])`."""
        if not loras:
            return
        names, weights = [], []
        for spec in loras:
            path, scale = spec if isinstance(spec, tuple) else (spec, 1.0)
            names.append(self.load_lora_weights(path))
            weights.append(float(scale))
        self.set_adapters(names, weights)

    def _lora_models(self, part_name: str, part) -> dict[str, object]:
        if part is None:
            return {}
        if part_name == "transformer":
            return {"transformer": part}
        if part_name == "prompt_encoder":
            return {c: getattr(part, c) for c in COMPONENTS[1:] if getattr(part, c, None) is not None}
        return {}

    def _lora_targets(self, component: str) -> dict[str, list[tuple[float, Factor]]]:
        state = self._loras
        targets: dict[str, list[tuple[float, Factor]]] = {}
        for name, weight in state.active.items():
            for path, factors in state.adapters[name].targets(component).items():
                targets.setdefault(path, []).extend((weight, f) for f in factors)
        return targets

    def _lora_attach(self, part_name: str, part) -> list[layers.ApplyReport]:
        """Give a (re)materialised component the active adapters (also: none, restoring the base)."""
        state = self._loras
        if not state.adapters and state.tables is None:
            return []  # no LoRA was ever loaded: leave the component untouched
        return [
            layers.apply(model, self._lora_targets(component), state.fused_scale)
            for component, model in self._lora_models(part_name, part).items()
        ]

    def _lora_refresh(self) -> list[layers.ApplyReport]:
        self._prompt_cache = None  # text encoder LoRAs change the embeddings
        reports = []
        for part_name in ("transformer", "prompt_encoder"):
            reports += self._lora_attach(part_name, getattr(self, part_name, None))
        return reports

    def _lora_tables(self) -> KeyTables:
        state = self._loras
        if state.tables is None:
            from ..models.mmdit import SD3Transformer2DModel

            transformer = self.transformer
            if transformer is None:  # released (low_memory): a skeleton's lazy arrays cost no memory
                transformer = SD3Transformer2DModel(self.transformer_config)
            encoder = self.prompt_encoder
            if encoder is None and self._reload is not None:
                # released (low_memory): a reload for no stage quantizes nothing, so it reads nothing either
                encoder = self._reload("lora key tables").prompt_encoder
            tables = {"transformer": layers.layer_table(transformer)}
            for component, model in self._lora_models("prompt_encoder", encoder).items():
                tables[component] = layers.layer_table(model)
            state.tables = KeyTables(tables, self.transformer_config.num_layers)
        return state.tables


def _next_name(adapters: Mapping[str, Adapter], prefix: str = "default") -> str:
    i = 0
    while f"{prefix}_{i}" in adapters:
        i += 1
    return f"{prefix}_{i}"


def _tensors_from_dict(d: Mapping) -> dict[str, mx.array]:
    out = {}
    for k, v in d.items():
        if not isinstance(v, mx.array):
            v = v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
            v = mx.array(v)
        out[str(k)] = v
    return out


def _all(by_path: Mapping[str, list[Factor]]):
    for fs in by_path.values():
        yield from fs


def _arrays(f: Factor):
    return [a for a in (f.down, f.up, f.delta, f.bias) if a is not None]


__all__ = ["LoraMixin", "LoraError"]
