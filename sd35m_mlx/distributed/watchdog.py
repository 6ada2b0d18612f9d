"""A watchdog process that ends this one when a wait for the other ranks outlasts its limit.

A ring-backend collective raises as soon as a peer's socket closes (a peer that exits or is killed),
but waits forever on a peer that hangs or whose machine drops off the network, and
`mx.distributed.init` waits forever for a peer that never starts; `init` also holds the GIL, so a
Python thread cannot time it out. A small child process can: the parent arms it before each wait
and disarms it after; on expiry it prints the message and terminates the parent. When the parent
exits its end of the pipe closes and the child exits too.

This file runs as that child (`python watchdog.py PARENT_PID`); it imports only the standard library.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

KILL_GRACE_S = 5.0  # after SIGTERM, SIGKILL if the parent is still there


class Watchdog:
    def __init__(self):
        self._child: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        if self._child is None or self._child.poll() is not None:
            self._child = subprocess.Popen(
                [sys.executable, "-S", os.path.abspath(__file__), str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                close_fds=True,
            )
        return self._child

    def _send(self, line: str) -> None:
        child = self._start()
        child.stdin.write(line.encode() + b"\n")
        child.stdin.flush()

    @contextmanager
    def armed(self, seconds: float, message: str):
        """Terminate this process with `message` on stderr if the block takes longer than `seconds`."""
        self._send(f"arm {seconds} {message.replace(chr(10), ' ')}")
        try:
            yield
        finally:
            self._send("disarm")

    def close(self) -> None:
        if self._child is not None:
            self._child.stdin.close()
            self._child.wait()
            self._child = None


def _child_main(parent: int) -> None:
    deadline, message, pending = None, "", b""
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], timeout)
        if not ready:  # deadline passed
            sys.stderr.write(f"Error: {message}\n")
            sys.stderr.flush()
            os.close(2)  # the parent's stderr: whoever reads it sees its end when the parent ends
            _end(parent)
            return
        data = os.read(sys.stdin.fileno(), 65536)
        if not data:  # the parent has gone
            return
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            command, _, rest = line.decode(errors="replace").partition(" ")
            if command == "arm":
                seconds, _, message = rest.partition(" ")
                deadline = time.monotonic() + float(seconds)
            elif command == "disarm":
                deadline = None


def _end(parent: int) -> None:
    """SIGTERM, then SIGKILL if the parent is still there after KILL_GRACE_S."""
    os.kill(parent, signal.SIGTERM)
    end = time.monotonic() + KILL_GRACE_S
    while time.monotonic() < end:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    os.kill(parent, signal.SIGKILL)


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))
