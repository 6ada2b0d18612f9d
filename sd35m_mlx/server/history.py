"""The output folder as the studio's history: A1111's `save_images` writes into it, the page lists, opens and
deletes what is there (ours, the CLI's, A1111's images alike), across restarts.

Only plain file names directly in the folder are ever opened or removed (`path_of`); a name with a separator,
`..`, a leading dot or a symlink leading out of the folder is refused. Settings are read from each file's
metadata once and kept by (name, mtime, size), so paging a folder of thousands of images re-reads only what
changed.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from ..prompts.infotext import infotext_parameters
from ..record import IMAGE_FORMATS, MAX_FIELD_CHARS, PARAMETERS_KEY, stored_text
from .errors import RequestError
from .files import open_or_404, regular_file

log = logging.getLogger("sd35m_mlx.server")
# A1111's "00012-SEED.png": the counter before the first dash. A longer number is some other file's (a date,
# or a stranger's 249 digits, after which no numbered name would fit the file system): not a counter.
_NUMBERED = re.compile(r"^(\d{1,9})-")


@dataclass(frozen=True)
class Entry:
    """One image of the folder, as the history lists it."""

    name: str
    mtime: float
    width: int | None  # None: a file Pillow cannot read (listed so that it can be deleted)
    height: int | None
    info: str  # A1111's parameters text ("" without metadata)
    parameters: dict  # the text parsed as /sdapi/v1/png-info's "parameters"

    @property
    def prompt(self) -> str:
        return self.parameters.get("Prompt", "")

    @property
    def negative_prompt(self) -> str:
        return self.parameters.get("Negative prompt", "")


class History:
    """The images of `folder` (which need not exist yet: it is made at the first save)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        self._cache: dict[str, tuple[tuple[int, int], Entry]] = {}  # name -> ((mtime_ns, size), entry)
        self._lock = threading.Lock()

    # -- saving ---------------------------------------------------------------------------------------------
    def ensure(self) -> None:
        """Make the folder and check it takes files: a one-line RequestError (500, no path) otherwise; the
        path goes to the log."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not os.access(self.folder, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as e:
            raise self._failed(e) from None

    def _failed(self, e: OSError) -> RequestError:
        log.error("cannot save into the output folder %s: %s", self.folder, e)
        reason = e.strerror or type(e).__name__
        return RequestError(f"cannot save images: the output folder is not writable ({reason})", status=500)

    def save(self, images: list[tuple[bytes, int]]) -> list[str]:
        """Write (encoded PNG, seed) pairs as A1111 names them, `NNNNN-SEED.png`, the counter going on from
        the highest in the folder; never over an existing file. Returns the names written."""
        self.ensure()
        names = []
        with self._lock:  # one counter scan per request; os.link below guards against other writers too
            try:
                counter = self._next_number()
                for data, seed in images:
                    while True:
                        name = f"{counter:05}-{seed}.png"
                        counter += 1
                        if self._write_new(name, data):
                            names.append(name)
                            break
            except OSError as e:  # a full disk, the folder removed meanwhile
                raise self._failed(e) from None
        return names

    def _next_number(self) -> int:
        highest = -1
        for name in os.listdir(self.folder):
            if m := _NUMBERED.match(name):
                highest = max(highest, int(m.group(1)))
        return highest + 1

    def _write_new(self, name: str, data: bytes) -> bool:
        """Atomically create folder/name with `data` (False if the name is taken): written under a hidden
        temporary name (mode 0o666, so the umask applies as to any file we create), then hard-linked."""
        target = self.folder / name
        tmp = self.folder / f".{uuid.uuid4().hex}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            except OSError:  # no hard links (some network and FAT file systems): check, then rename
                if target.exists():
                    return False
                os.replace(tmp, target)
            return True
        finally:
            if tmp.exists():
                tmp.unlink()

    # -- reading --------------------------------------------------------------------------------------------
    def path_of(self, name: str) -> Path:
        """The file `name` names in the folder, or RequestError: 400 for what is not a plain image file
        name, 404 for one that is not there (or is a link leading out of the folder)."""
        if (
            not name
            or "/" in name
            or "\\" in name
            or "\0" in name
            or name.startswith(".")
            or Path(name).suffix.lower() not in IMAGE_FORMATS
        ):
            raise RequestError("not an image file name of the history", "name", 400)
        path = self.folder / name
        try:
            inside = path.resolve(strict=True).parent == self.folder.resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a symlink loop
            inside = False
        if not inside or not path.is_file():
            raise RequestError("no such image in the history", "name", 404)
        return path

    def open(self, name: str) -> BinaryIO:
        """The image `name` opened for reading (files.py: a delete or a swap meanwhile, as the page deletes images
        that may still be loading, cannot turn into a 500 half way)."""
        return open_or_404(self.path_of(name), "no such image in the history")

    def delete(self, name: str) -> None:
        path = self.path_of(name)
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError):  # removed, or swapped for a folder, since path_of looked
            raise RequestError("no such image in the history", "name", 404) from None
        except OSError as e:  # a read-only folder: the server's state, said in one line (the path in the log)
            log.error("cannot delete %s from the output folder %s: %s", name, self.folder, e)
            raise RequestError(f"cannot delete {name}: {e.strerror or type(e).__name__}", "name", 500) from None
        with self._lock:
            self._cache.pop(name, None)

    def entries(self) -> list[Entry]:
        """Every image directly in the folder, newest first (ties: the higher name first)."""
        try:
            scanned = list(os.scandir(self.folder))
        except FileNotFoundError:  # nothing saved yet
            return []
        except OSError as e:  # not a folder, not readable: an empty history, the reason in the log
            log.warning("cannot list the output folder %s: %s", self.folder, e)
            return []
        found = []
        for d in scanned:
            if d.name.startswith(".") or Path(d.name).suffix.lower() not in IMAGE_FORMATS or not _utf8(d.name):
                continue
            try:
                if d.is_symlink():
                    self.path_of(d.name)  # raises for a link leading out of the folder
                if not d.is_file():
                    continue
                st = d.stat()  # of a link's target
            except (OSError, RequestError):
                continue
            found.append((d.name, (st.st_mtime_ns, st.st_size), st.st_mtime))
        with self._lock:
            cache = dict(self._cache)
        fresh = {}
        for name, key, mtime in found:
            hit = cache.get(name)
            entry = hit[1] if hit is not None and hit[0] == key else read_entry(self.folder / name, mtime)
            fresh[name] = (key, entry)
        with self._lock:
            self._cache = fresh
        return sorted((e for _, e in fresh.values()), key=lambda e: (e.mtime, e.name), reverse=True)


def _utf8(name: str) -> bool:
    """Whether a file name is text: one in another system's encoding (a Latin-1 archive unpacked here) comes
    with undecodable bytes that neither the JSON listing nor a URL can carry; it is left out of the history."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        log.info("history: skipped a file name that is not UTF-8: %r", name)
        return False
    return True


def read_entry(path: Path, mtime: float) -> Entry:
    """An image's size and settings from its header and metadata (the pixels are not decoded)."""
    try:
        with regular_file(path) as f, Image.open(f) as im:
            size = im.size
            text = _text(im)
    except Exception as e:  # not an image after all, truncated, a decompression bomb: listed without settings
        log.info("history: cannot read %s (%s)", path.name, type(e).__name__)
        return Entry(path.name, mtime, None, None, "", {})
    info = text.get(PARAMETERS_KEY) or ""
    if len(info) > MAX_FIELD_CHARS:  # a stranger's megabytes of "settings": not parsed, not sent to every page
        log.info("history: %s's parameters text is %d characters; not read", path.name, len(info))
        info = ""
    return Entry(path.name, mtime, size[0], size[1], info, infotext_parameters(info) if info else {})


def _text(im: Image.Image) -> dict[str, str]:
    """The text chunks Pillow read with the header (where we, the CLI and A1111 write them), else
    `stored_text`, which for a PNG walks the chunks after the pixels too."""
    if im.format == "PNG":
        info = {k: v for k, v in im.info.items() if isinstance(v, str)}
        if PARAMETERS_KEY in info:
            return info
    return stored_text(im)
