"""Output file names (templates, next free name) and atomic image writes (PNG, JPEG, WebP)."""

from __future__ import annotations

import os
import string
import tempfile
from pathlib import Path

from PIL import Image

from sd35m_mlx.record import IMAGE_FORMATS

from .errors import UsageError

DEFAULT_TEMPLATE = "sd35m-{seed}.png"
FIELDS = ("seed", "index")


def plan_paths(template: str, seeds: list[int]) -> list[Path]:
    """One path per seed from a path, a folder, or a template with {seed} and {index} (1-based).

    Several images and no placeholder: `-{index}` goes before the suffix, so one run never reuses a name.
    """
    template = os.path.expanduser(template)
    if template.endswith(("/", os.sep)) or Path(template).is_dir():
        template = os.path.join(template, DEFAULT_TEMPLATE)
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise UsageError(f"--output {template!r}: {e} (escape braces as {{{{ and }}}})") from None
    if unknown := used - set(FIELDS):
        name = sorted(unknown)[0]
        raise UsageError(f"--output: unknown placeholder {{{name}}}; use {{seed}} and {{index}}")
    path = Path(template)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    elif path.suffix.lower() not in IMAGE_FORMATS:
        raise UsageError(f"--output must be a .png, .jpg, .jpeg or .webp file, got {path.name}")
    if len(seeds) > 1 and not used:
        path = path.with_name(f"{path.stem}-{{index}}{path.suffix}")
    paths = [Path(str(path).format(seed=s, index=i + 1)) for i, s in enumerate(seeds)]
    if not all(p.name for p in paths):
        raise UsageError(f"--output {template!r} gives an empty file name")
    for p in paths:
        _check_name_length(p)
    return paths


# write_image's temporary name is `.STEM.` + 8 random characters + `.part`; a taken name becomes STEM-k.SUFFIX
_TEMP_EXTRA = len("..12345678.part")


def _check_name_length(path: Path) -> None:
    """Refuse, before any work, a name the folder's file system cannot hold (it failed after generating)."""
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # a folder that does not exist: check_writable says so
        return
    longest = len(os.fsencode(path.stem)) + max(_TEMP_EXTRA, len(os.fsencode(path.suffix)) + len("-999"))
    if longest > limit:
        raise UsageError(
            f"--output: the file name {path.name[:24]}... is too long for its folder "
            f"({len(os.fsencode(path.stem))} bytes before the suffix; at most {limit - _TEMP_EXTRA})"
        )


def check_writable(folder: Path) -> None:
    """Fail before any work if `folder` is missing or not writable (creating a file is the only sure test)."""
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UsageError(f"output folder {folder} {what}")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".sd35m-mlx-", suffix=".probe")
    except OSError as e:
        raise UsageError(f"cannot write to output folder {folder}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def candidates(path: Path):
    """path, then name-1.png, name-2.png, ..."""
    yield path
    k = 1
    while True:
        yield path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1


def image_format(path: Path) -> str:
    """PIL's format name for an output path ("PNG", "JPEG", "WEBP"); plan_paths accepts only these."""
    return IMAGE_FORMATS[path.suffix.lower()]


def write_image(image: Image.Image, path: Path, options: dict, *, overwrite: bool, taken: set[Path]) -> Path:
    """Write atomically (temp file in the same folder, then a rename) and return the path written; `options`
    are Image.save's (format, metadata, quality: sd35m_mlx.record.save_options).

    Never replaces an existing file unless `overwrite`, and never one this run wrote (`taken`); a
    hard link claims the name, so a file that appears meanwhile is not clobbered either.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".part")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make the image private to this user
        with os.fdopen(fd, "wb") as f:
            image.save(f, **options)
            f.flush()
            os.fsync(f.fileno())
        for target in candidates(path):
            if target.resolve() in taken:
                continue
            if overwrite:
                os.replace(tmp, target)
                break
            try:
                os.link(tmp, target)
                break
            except FileExistsError:
                continue
            except OSError:  # no hard links (some network and FAT file systems): check, then rename
                if target.exists():
                    continue
                os.replace(tmp, target)
                break
        taken.add(target.resolve())
        return target
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_preview(image: Image.Image, path: Path) -> None:
    """Replace `path` atomically (temp file in the same folder, then a rename): a viewer never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".part")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", compress_level=1)  # fast: rewritten every few steps
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
