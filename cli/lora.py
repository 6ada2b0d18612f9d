"""--lora / --lora-scale: which LoRAs to apply, their PNG metadata, and re-applying them from --from-image."""

from __future__ import annotations

import os
from pathlib import Path

import click

from sd35m_mlx.record import Loras  # (source as given, weight, short sha256 once loaded)

from .errors import UsageError

OPTIONS = [
    click.option(
        "--lora",
        "loras",
        multiple=True,
        metavar="PATH_OR_REPO",
        help="A LoRA to apply (repeatable): a .safetensors file, a Hub id owner/repo (its one LoRA file) or "
        "owner/repo/file.safetensors. Every SD3.5 layout is read (diffusers/PEFT, kohya, ComfyUI/Stability, "
        "SimpleTuner, OneTrainer, LyCORIS LoKr/LoHa); pickle files (.pt, .ckpt, .bin) are refused.",
    ),
    click.option(
        "--lora-scale",
        "lora_scales",
        multiple=True,
        type=float,
        help="Weight of each --lora, in the same order (repeatable); with --from-image alone, re-weights "
        "the image's LoRAs.  [default: 1.0 each]",
    ),
    click.option(
        "--lora-dir",
        envvar="SD35M_MLX_LORA_DIR",
        metavar="FOLDER",
        help="A folder of LoRA .safetensors files (sub-folders too) that `<lora:NAME:WEIGHT>` tags in PROMPT name, "
        "as in AUTOMATIC1111: NAME is the file's path in the folder without .safetensors (or its file name when "
        "unique); the tag is removed from the text the encoders read. Also SD35M_MLX_LORA_DIR.",
    ),
]

TagFiles = list[tuple[str, float]]  # (file, weight) per tag, for from_pretrained(loras=...)


def resolve_tags(prompt: str, negative_prompt: str, lora_dir: str | None) -> tuple[Loras, TagFiles]:
    """The prompt's `<lora:NAME:WEIGHT>` tags found in --lora-dir (lora/library.py `tagged_loras`): ((NAME,
    weight, "") for the record, files to load). Every failure is one line (exit 2)."""
    from sd35m_mlx.lora.library import LoraLibrary, tagged_loras

    try:
        library = LoraLibrary(lora_dir) if lora_dir else None
        found = tagged_loras(prompt, negative_prompt, library, "give it with --lora-dir (or SD35M_MLX_LORA_DIR)")
    except (ValueError, TypeError) as e:
        raise UsageError(f"PROMPT: {e}") from None
    return tuple((e.name, w, "") for e, w in found), [(str(e.path.resolve()), w) for e, w in found]


def plan(given: bool, params: dict, stored: Loras | None) -> tuple[Loras, list[str]]:
    """The LoRAs to apply and notes: the command line's, else (with --from-image) the stored ones that
    are found; a missing stored LoRA is named and left out."""
    sources, scales = params.pop("loras", ()), params.pop("lora_scales", ())
    if not given and stored:
        if len(scales) > len(stored):
            raise UsageError(f"{len(scales)} --lora-scale values for the image's {len(stored)} LoRAs")
        # --lora-scale alone re-weights the image's LoRAs, in their stored order
        stored = tuple((src, scales[i] if i < len(scales) else w, sha) for i, (src, w, sha) in enumerate(stored))
        found = [entry for entry in stored if _available(entry[0])]
        notes = [
            f"Warning: LoRA {src} (sha256 {sha or '?'}, scale {w}) from the image is not found; generating without it"
            for src, w, sha in stored
            if not _available(src)
        ]
        return tuple((src, float(w), str(sha)) for src, w, sha in found), notes
    if len(scales) > len(sources):
        raise UsageError(f"{len(scales)} --lora-scale values for {len(sources)} --lora; give one scale per LoRA")
    out = []
    for i, source in enumerate(sources):
        if Path(source).suffix.lower() in (".pt", ".pth", ".ckpt", ".bin", ".pkl"):
            raise UsageError(f"--lora {source}: pickle files can run code and are never loaded; use .safetensors")
        if not _available(source):
            raise UsageError(f"--lora {source}: no such file (nor a Hugging Face Hub id owner/repo[/file])")
        out.append((source, float(scales[i]) if i < len(scales) else 1.0, ""))
    return tuple(out), []


def _available(source: str) -> bool:
    from sd35m_mlx.loading import hub

    if Path(os.path.expanduser(source)).exists():
        return True
    parts = source.split("/")
    if len(parts) >= 3 and source.endswith(".safetensors") and not source.startswith(("/", ".", "~")):
        return hub.is_hub_id("/".join(parts[:2]))
    return hub.is_hub_id(source)


def tags_with_hashes(tags: Loras, info: list[dict]) -> Loras:
    """The tags' LoRAs with the loaded pipeline's short sha256 of each (same order)."""
    return tuple((name, w, item["sha256"]) for (name, w, _), item in zip(tags, info, strict=True))


def with_hashes(loras: Loras, info: list[dict]) -> tuple[Loras, list[str]]:
    """The loaded pipeline's short sha256 of each LoRA (same order), and a warning for each file that is
    not the one a --from-image PNG recorded."""
    notes = [
        f"Warning: LoRA {src} has sha256 {item['sha256']}, not {sha} as recorded in the image; using it anyway"
        for (src, _, sha), item in zip(loras, info, strict=True)
        if sha and item["sha256"] and sha != item["sha256"]
    ]
    return tuple((src, w, item["sha256"]) for (src, w, _), item in zip(loras, info, strict=True)), notes
