"""Training checkpoints (safetensors + json, never pickle) and the final LoRA in diffusers / PEFT format."""

from __future__ import annotations

import json
import math
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


# Settings a resumed run may change: they decide when checkpoints and validation images are written and
# where, or (compile, gradient_checkpointing) trade speed for memory with the same arithmetic up to rounding.
# Everything else recorded in state.json must match; `steps` may change (see check_resume).
RESUME_MAY_CHANGE = (
    "save_every",
    "validation_every",
    "validation_prompt",
    "validation_seeds",
    "validation_steps",
    "output",
    "resume",
    "overwrite",
    "export_kohya",
    "compile",
    "gradient_checkpointing",
)
_PATHS = ("data", "model")  # compared as the folders they name when both exist


def read_state(folder: str | os.PathLike) -> dict:
    """The run state (state.json) of a checkpoint folder; one-line errors name the folder or file."""
    folder = Path(folder)
    missing = [n for n in (LORA_FILE, "optimizer.safetensors", "state.json") if not (folder / n).is_file()]
    if missing:
        raise ValueError(f"resume: {folder} is not a training checkpoint (missing {', '.join(missing)})")
    path = folder / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"resume: {path} is not valid JSON ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"resume: {path} holds no run state (no step)")
    return state


def check_resume(folder: str | os.PathLike, settings: dict) -> dict:
    """The checkpoint's run state, if a run with `settings` may continue it: every setting it recorded must
    be the same except RESUME_MAY_CHANGE; `steps` may change, beyond the checkpoint's step, unless the schedule
    is cosine (it spans all steps, so every step's rate would change)."""
    state = read_state(folder)
    if settings.get("steps", math.inf) <= state["step"]:
        raise ValueError(
            f"resume: {folder} is at step {state['step']} already; steps ({settings['steps']}) must be more"
        )
    old = state.get("settings") or {}
    changed = []
    for key in sorted(set(old) & set(settings)):
        a, b = old[key], settings[key]
        if key in RESUME_MAY_CHANGE or a == b or (key in _PATHS and _same_path(a, b)):
            continue
        if key == "steps" and settings.get("lr_schedule") != "cosine":
            continue
        changed.append(f"{key}: {a!r} -> {b!r}")
    if changed:
        raise ValueError(
            f"resume: {folder} was trained with other settings ({'; '.join(changed)}); only "
            f"{', '.join(RESUME_MAY_CHANGE)} may change, and steps unless lr_schedule is cosine"
        )
    return state


def _same_path(a, b) -> bool:
    if not (isinstance(a, str) and isinstance(b, str)) or not (Path(a).exists() and Path(b).exists()):
        return False
    return Path(a).resolve() == Path(b).resolve()


def load_checkpoint(folder: str | os.PathLike, lora: TrainableLora, optimizer) -> dict:
    """Restore the LoRA factors and the optimizer state in place; return the run state."""
    folder = Path(folder)
    state = read_state(folder)
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
    return state


def _atomic(path: Path, write) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written file under the real name."""
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    write(tmp)
    os.replace(tmp, path)
