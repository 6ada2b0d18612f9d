"""Answering with a file that may vanish meanwhile: open it once, then send the open file.

FileResponse checks the path and opens it later, when the answer starts: a file deleted in between (an
expired /v1/images/files image, a history image the page deletes while another tab loads it) turns into a
500 half way. Opening first turns that into a 404, and the bytes sent are those of the file that was opened.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import BinaryIO

from fastapi.responses import StreamingResponse

from .errors import RequestError


def regular_file(path: Path) -> BinaryIO:
    """`path` opened for reading if it is a plain file. A caller may have checked that, but a file can be
    replaced meanwhile; opening a FIFO would block (and the thread pool with it) until something writes to it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens at once; files ignore the flag
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path.name} is not a plain file")
    return os.fdopen(fd, "rb")


def open_or_404(path: Path, missing: str) -> BinaryIO:
    """regular_file(path), or a 404 saying `missing` where it is gone (or no longer a plain file)."""
    try:
        return regular_file(path)
    except OSError:
        raise RequestError(missing, "name", 404) from None


def streamed(f: BinaryIO, media_type: str) -> StreamingResponse:
    """The answer sending the open file `f` (closed at the end or on a disconnect), sized and dated from it."""
    st = os.fstat(f.fileno())
    headers = {"Content-Length": str(st.st_size), "Last-Modified": formatdate(st.st_mtime, usegmt=True)}
    return StreamingResponse(_chunks(f), media_type=media_type, headers=headers)


def _chunks(f: BinaryIO, size: int = 64 * 1024) -> Iterator[bytes]:
    """The open file's bytes (run in the thread pool by StreamingResponse)."""
    with f:
        while chunk := f.read(size):
            yield chunk
