"""The training configuration: defaults, then a TOML / JSON file, then command-line flags; saved with the run."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..loading.hub import DEFAULT_REPO
from .trainer import TrainSettings


@dataclass
class TrainConfig:
    data: str | None = None
    output: str | None = None
    model: str = DEFAULT_REPO
    dtype: str = "bfloat16"
    quantize: int | None = None  # 8 or 4: the frozen base's linear layers (LoRA runs beside them)
    no_t5: bool = False
    resolution: int = 1024
    trigger_word: str | None = None
    default_caption: str | None = None
    validation_prompt: str | None = None
    validation_seeds: list[int] = field(default_factory=lambda: [0])
    validation_steps: int = 28
    resume: str | None = None
    overwrite: bool = False  # replace an earlier run in `output` (run.prepare_output)
    export_kohya: bool = False  # also write the LoRA in kohya's SD3 layout (lora/kohya_export.py)
    train: TrainSettings = field(default_factory=TrainSettings)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(d.pop("train"))
        return d


_TOP = {f.name for f in dataclasses.fields(TrainConfig)} - {"train"}
_TRAIN = {f.name for f in dataclasses.fields(TrainSettings)}
KEYS = sorted(_TOP | _TRAIN)


def read_config_file(path: str | os.PathLike) -> dict:
    """A flat table of the keys in KEYS, from a .toml or .json file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config: no such file {path}")
    if path.suffix.lower() not in (".json", ".toml"):
        raise ValueError(f"config: {path.name} must be a .toml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"config: {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at {e.start})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config: {path} is not valid JSON ({e})") from None
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            try:
                import tomli as tomllib
            except ImportError:
                raise ValueError(
                    "config: TOML needs python 3.11+ or `pip install tomli`; or use a .json file"
                ) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config: {path} is not valid TOML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config: {path.name} must hold a table of settings")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ValueError(f"config: unknown key {unknown[0]!r} in {path.name} (known: {', '.join(KEYS)})")
    return data


def build_config(file_values: dict, overrides: dict) -> TrainConfig:
    """Defaults < config file < overrides (flags given on the command line; None means not given)."""
    values = {**file_values, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r}")
    train = TrainSettings(**{k: v for k, v in values.items() if k in _TRAIN})
    config = TrainConfig(**{k: v for k, v in values.items() if k in _TOP}, train=train)
    if not config.data:
        raise ValueError("data: give the folder of training images (--data or `data` in the config file)")
    if not config.output:
        raise ValueError("output: give the output folder (--output or `output` in the config file)")
    if config.quantize not in (None, 4, 8):
        raise ValueError(f"quantize must be 4 or 8, got {config.quantize!r}")
    if config.resolution < 64 or config.resolution % 64:
        raise ValueError(f"resolution must be a multiple of 64 (512, 768, 1024, ...), got {config.resolution}")
    return config
