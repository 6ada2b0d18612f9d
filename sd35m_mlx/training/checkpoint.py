"""Training checkpoints (safetensors + json, never pickle) and the final LoRA in diffusers / PEFT format."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx

from ..lora.kohya_export import kohya_metadata, kohya_state_dict
from .lora_params import TrainableLora

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights name
_SEP = "/"  # module paths contain dots, so nested trees are flattened with a slash


def flatten(tree, prefix: str = "") -> dict[str, mx.array]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}{_SEP}"))
        return out
    return {prefix[: -len(_SEP)]: tree}


def unflatten(flat: dict[str, mx.array]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(_SEP)
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def adapter_metadata(lora: TrainableLora) -> dict:
    """peft LoraConfig fields, as diffusers' save_lora_weights packs them under `lora_adapter_metadata`."""
    config = {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": sorted(lora.params)}
    return {f"transformer.{k}": v for k, v in config.items()}


def save_lora(lora: TrainableLora, folder: str | os.PathLike, dtype: mx.Dtype = mx.float32) -> Path:
    """`pytorch_lora_weights.safetensors` in `folder`, loadable by diffusers' load_lora_weights and ours."""
    path = Path(folder) / LORA_FILE
    tensors = {k: v.astype(dtype) for k, v in lora.state_dict().items()}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter_metadata(lora), indent=2, sort_keys=True)}
    _atomic(path, lambda tmp: mx.save_safetensors(str(tmp), tensors, metadata=metadata))
    return path


def export_kohya(lora: TrainableLora, path: str | os.PathLike) -> Path:
    """The LoRA in kohya sd-scripts' SD3 layout (ComfyUI, Forge, kohya's tools): lora/kohya_export.py."""
    factors = {p: (f["lora_A"], f["lora_B"]) for p, f in lora.params.items()}
    tensors = kohya_state_dict(factors, lora.alpha, lora.rank, lora.model.config.num_layers)
    metadata = kohya_metadata(lora.alpha, lora.rank)
    _atomic(Path(path), lambda tmp: mx.save_safetensors(str(tmp), tensors, metadata=metadata))
    return Path(path)


def save_checkpoint(folder: str | os.PathLike, lora: TrainableLora, optimizer, state: dict) -> Path:
    """LoRA (float32 master factors), optimizer state and the run state (step, seed, data order, config)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_lora(lora, folder)
    opt = flatten(optimizer.state)
    _atomic(folder / "optimizer.safetensors", lambda tmp: mx.save_safetensors(str(tmp), opt))
    _atomic(folder / "state.json", lambda tmp: Path(tmp).write_text(json.dumps(state, indent=2) + "\n"))
    return folder


def load_checkpoint(folder: str | os.PathLike, lora: TrainableLora, optimizer) -> dict:
    """Restore the LoRA factors and the optimizer state in place; return the run state."""
    folder = Path(folder)
    missing = [n for n in (LORA_FILE, "optimizer.safetensors", "state.json") if not (folder / n).is_file()]
    if missing:
        raise ValueError(f"resume: {folder} is not a training checkpoint (missing {', '.join(missing)})")
    tensors = mx.load(str(folder / LORA_FILE))
    params = {}
    for path in lora.params:
        try:
            params[path] = {
                n: tensors[f"transformer.{path}.{n}.weight"].astype(mx.float32) for n in ("lora_A", "lora_B")
            }
        except KeyError:
            raise ValueError(f"resume: {folder} has no factors for {path} (different targets or model?)") from None
        if params[path]["lora_A"].shape != lora.params[path]["lora_A"].shape:
            raise ValueError(f"resume: {folder} was trained with another rank or model ({path})")
    lora.params = params
    lora.bind(params)
    optimizer.state = unflatten(mx.load(str(folder / "optimizer.safetensors")))
    return json.loads((folder / "state.json").read_text())


def _atomic(path: Path, write) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written file under the real name."""
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    write(tmp)
    os.replace(tmp, path)
