"""A transformer LoRA on our (diffusers-named) modules, written in kohya sd-scripts' SD3 layout for ComfyUI,
Forge and kohya's own tools: `lora_unet_<single-file module, dots as _>.lora_down.weight`, `.lora_up.weight`,
`.alpha` (the names `lora_sd3.py` writes and ComfyUI maps onto the single-file model).

A single-file module that is one of our layers keeps its factors and alpha (rows (shift, scale)-swapped where
the key map swaps the weight: the last context adaLN and the final layer). The fused q|k|v projections are
three of our layers, so their three rank-r LoRAs become one rank-3r LoRA on the fused weight. Saved the way
kohya's `split_qkv` saves them (block-diagonal up, the alpha of one of them), readers disagree on its strength
(sd-scripts #2204): ComfyUI and kohya without split_qkv scale by alpha / 3r, kohya with split_qkv and our own
loader by alpha / r. So the three deltas are refactored exactly into one dense product: QR of each up, one SVD
of the stacked (scaled) remainder, the scale folded into the factors and alpha = rank. Every reader that
scales by alpha / rank (all of the above) then applies the same delta, and the up is not block-diagonal, so
no reader takes it for a split_qkv file.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping

import mlx.core as mx
import numpy as np

from ..loading.keymaps import map_mmdit_weights, mmdit_module_names, swap_halves

PREFIX = "lora_unet_"
KOHYA_FILE = "lora_kohya.safetensors"


def _routes(num_layers: int) -> dict[str, tuple[str, int, int, bool]]:
    """our module path -> (single-file module, index among its targets, number of targets, rows swapped)."""
    probe = mx.arange(6, dtype=mx.float32)
    routes = {}
    for name in mmdit_module_names(num_layers):
        pairs = map_mmdit_weights(f"{name}.weight", probe, num_layers)
        for i, (key, value) in enumerate(pairs):
            swapped = len(pairs) == 1 and int(value[0].item()) != 0
            routes[key.removesuffix(".weight")] = (name, i, len(pairs), swapped)
    return routes


def _fuse(parts: list[tuple[np.ndarray, np.ndarray] | None], scale: float) -> tuple[np.ndarray, np.ndarray]:
    """[(down_i (r, in), up_i (out_i, r)) or None] -> (down (k r, in), up (sum out_i, k r)) with
    up @ down = rows [scale * up_i @ down_i] (zeros for None); up dense, not block-diagonal."""
    present = [p for p in parts if p is not None]
    r = present[0][0].shape[0]
    qs, rest = [], []
    for down, up in present:
        q, rr = np.linalg.qr(up)  # up = q rr, q (out_i, r) orthonormal columns
        qs.append(q)
        rest.append(scale * rr @ down)
    u, s, vt = np.linalg.svd(np.concatenate(rest, axis=0), full_matrices=False)  # (k r, in) = u s vt
    us = u * s
    rows, j = [], 0
    for p in parts:
        if p is None:
            rows.append(None)
            continue
        rows.append(qs[j] @ us[j * r : (j + 1) * r])
        j += 1
    missing = np.zeros((present[0][1].shape[0], us.shape[1]))  # q, k and v have the same width
    return vt, np.concatenate([x if x is not None else missing for x in rows], axis=0)


def kohya_state_dict(
    factors: Mapping[str, tuple], alpha: float, rank: int, num_layers: int, dtype=mx.float32
) -> dict[str, mx.array]:
    """`factors`: our transformer module path -> (lora_A (r, in), lora_B (out, r)), all of rank `rank`
    scaled by alpha / rank as trained. Raises ValueError for a path the single file has no module for."""
    routes = _routes(num_layers)
    groups: dict[str, list] = defaultdict(lambda: [None, None, None])
    for path, (a, b) in factors.items():
        if path not in routes:
            raise ValueError(f"kohya export: {path} has no module in the single-file layout")
        name, index, n, swapped = routes[path]
        up = swap_halves(mx.array(b)) if swapped else b  # the key map's (shift, scale) swap, undone
        groups[name][index] = (np.asarray(a, dtype=np.float64), np.asarray(up, dtype=np.float64), n)
    out: dict[str, mx.array] = {}
    for name, parts in groups.items():
        n = next(p for p in parts if p is not None)[2]
        key = PREFIX + name.replace(".", "_")
        if n == 1:
            down, up, _ = parts[0]
            weights = (down, up, float(alpha))
        else:
            down, up = _fuse([p[:2] if p is not None else None for p in parts[:n]], alpha / rank)
            weights = (down, up, float(down.shape[0]))  # scale folded in: alpha / rank = 1
        out[f"{key}.lora_down.weight"] = mx.array(weights[0].astype(np.float32)).astype(dtype)
        out[f"{key}.lora_up.weight"] = mx.array(weights[1].astype(np.float32)).astype(dtype)
        out[f"{key}.alpha"] = mx.array(weights[2], dtype=mx.float32)
    return out


def kohya_metadata(alpha: float, rank: int) -> dict[str, str]:
    """What kohya's scripts write about the network, and how the fused q|k|v factors were made."""
    return {
        "ss_network_module": "networks.lora_sd3",
        "ss_network_dim": str(rank),
        "ss_network_alpha": json.dumps(alpha),
        "sd35m_mlx_fused_qkv": "refactored exactly: dense rank-3r factors, scale folded in, alpha = rank",
    }
