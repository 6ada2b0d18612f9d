"""A folder of LoRA files (A1111's `--lora-dir`): names as A1111 shows them, their metadata, safe lookup.

A name is the file's path relative to the folder without `.safetensors`, with "/" separators
("styles/ink" for styles/ink.safetensors). Lookup only ever returns a file found by listing the folder
and whose real path (symlinks resolved) is inside it: a name is a key, never a path to open, so `..`,
absolute paths and links out of the folder cannot reach anything else.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..loading.safetensors_io import WeightsError, read_header
from ..prompts.syntax import extract_lora_tags

SUFFIX = ".safetensors"
TRIGGER_KEYS = ("modelspec.trigger_phrase", "ss_trigger_words", "trigger_words")  # writers that record one


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA file: the fields of A1111's `GET /sdapi/v1/loras` (name, alias, path, metadata)."""

    name: str
    alias: str  # the training run's name (kohya's ss_output_name) if recorded, else the name (as A1111)
    path: Path
    metadata: dict = field(default_factory=dict)  # the header's __metadata__; JSON-looking values parsed

    @property
    def trigger_words(self) -> list[str]:
        """Trigger words recorded in the metadata, if any writer recorded them (comma-separated)."""
        for key in TRIGGER_KEYS:
            value = self.metadata.get(key)
            if isinstance(value, str) and value.strip():
                return [w.strip() for w in value.split(",") if w.strip()]
        return []


def read_metadata(path: str | os.PathLike) -> dict:
    """A safetensors file's `__metadata__`, read from the header only (no tensor is loaded).

    Values that look like JSON objects (kohya's ss_tag_frequency, ss_dataset_dirs) are parsed, as A1111's
    `read_metadata_from_safetensors` does. A file without a readable header gives {}.
    """
    try:
        raw = read_header(path).get("__metadata__") or {}
    except (OSError, WeightsError, KeyError, TypeError, AttributeError):
        return {}
    if not isinstance(raw, dict):
        return {}
    metadata = {}
    for key, value in raw.items():
        metadata[key] = value
        if isinstance(value, str) and value.startswith("{"):
            try:
                metadata[key] = json.loads(value)
            except ValueError:
                pass
    return metadata


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve(strict=True).is_relative_to(root)
    except (OSError, RuntimeError):  # a broken link, a symlink loop
        return False


class LoraLibrary:
    """The LoRA files under `folder` (recursively), listed on construction and on `refresh()`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(os.path.expanduser(str(folder)))
        if not self.folder.is_dir():
            raise ValueError(f"LoRA folder {self.folder} does not exist or is not a folder")
        self._root = self.folder.resolve()
        self._entries: dict[str, LoraEntry] = {}
        self.refresh()

    def refresh(self) -> None:
        """List the folder again (A1111's `POST /sdapi/v1/refresh-loras`)."""
        entries = {}
        for dirpath, dirnames, filenames in os.walk(self._root):  # does not enter linked folders
            dirnames.sort()
            for filename in sorted(filenames):
                if not filename.lower().endswith(SUFFIX):
                    continue
                path = Path(dirpath) / filename
                if not _inside(path, self._root):
                    continue
                name = path.relative_to(self._root).as_posix()[: -len(SUFFIX)]
                metadata = read_metadata(path)
                alias = metadata.get("ss_output_name")
                alias = alias if isinstance(alias, str) and alias else name
                entries[name] = LoraEntry(name=name, alias=alias, path=path, metadata=metadata)
        self._entries = dict(sorted(entries.items()))

    def entries(self) -> list[LoraEntry]:
        """Every LoRA, sorted by name."""
        return list(self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> LoraEntry:
        """The entry for `name`: its relative name ("sub/file"), or, as A1111 tags write them, its file
        name or alias when exactly one LoRA has it. ValueError (one line) for anything else."""
        if not isinstance(name, str):
            raise TypeError(f"a LoRA name must be a string, got {type(name).__name__}")
        if not name or "\0" in name or "\\" in name or name.startswith("/") or os.path.isabs(name):
            raise ValueError(f"LoRA name {name!r} is not a name in {self.folder}: give the file's name relative to it")
        if any(part in ("", ".", "..") for part in name.split("/")):
            raise ValueError(f"LoRA name {name!r} may not contain '..', '.' or empty parts")
        key = name[: -len(SUFFIX)] if name.lower().endswith(SUFFIX) else name
        entry = self._entries.get(key)
        if entry is None:
            matches = [e for e in self._entries.values() if key in (e.alias, e.name.rsplit("/", 1)[-1])]
            if len(matches) > 1:
                raise ValueError(
                    f"LoRA name {name!r} is ambiguous in {self.folder}: " + ", ".join(e.name for e in matches)
                )
            if not matches:
                close = difflib.get_close_matches(key, list(self._entries), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else f" ({len(self._entries)} LoRAs there)"
                raise ValueError(f"no LoRA named {name!r} in {self.folder}{hint}")
            entry = matches[0]
        if not _inside(entry.path, self._root):  # replaced by a link since the listing
            raise ValueError(f"LoRA {entry.name!r} now points outside {self.folder}; refusing it")
        return entry

    def resolve(self, name: str) -> Path:
        """The file of the LoRA `name` (see `get`), its real path inside the folder."""
        return self.get(name).path.resolve(strict=True)


def tagged_loras(
    prompt: str, negative_prompt: str, library: LoraLibrary | None, no_folder: str
) -> list[tuple[LoraEntry, float]]:
    """The prompt's `<lora:NAME:WEIGHT>` tags found in `library`: [(entry, weight)], in order (the CLI's and the
    server's). ValueError (one line) for a bad tag, a tag in the negative prompt (a LoRA is not applied
    negatively, and dropping it silently would hide a mistake), a name the library refuses, or tags without
    a library (`no_folder` says how to give one)."""
    _, tags = extract_lora_tags(prompt)
    _, negative_tags = extract_lora_tags(negative_prompt)
    if negative_tags:
        raise ValueError(
            f"<lora:{negative_tags[0][0]}>: LoRA tags apply in the prompt only, not in the negative prompt"
        )
    if tags and library is None:
        raise ValueError(f"the prompt names <lora:{tags[0][0]}>, but there is no LoRA folder: {no_folder}")
    return [(library.get(name), weight) for name, weight in tags]
