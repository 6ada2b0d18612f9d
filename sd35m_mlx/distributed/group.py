"""The ranks of a run started by `mlx.launch`: joining, exchanging small records and images, failures.

Every wait on the other ranks runs under a watchdog (watchdog.py) so a hung or unreachable peer ends
the run within `peer_timeout()` seconds; a peer that exits or is killed closes its sockets, and the
collective waiting on it raises at once (ring backend), which `PeerLost` reports.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import mlx.core as mx
import numpy as np

from .watchdog import Watchdog

TIMEOUT_ENV = "SD35M_MLX_PEER_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0  # covers a slower machine loading the model or making an image behind the others
CONNECT_TIMEOUT_S = 120.0  # every rank joins first thing, so they arrive within seconds of each other

# Environment variables that each backend's launcher sets (mlx.launch, mpirun); none: a single process.
_LAUNCHED_BY = {
    "ring": ("MLX_RANK", "MLX_HOSTFILE"),
    "jaccl": ("MLX_RANK", "MLX_IBV_DEVICES"),
    "nccl": ("MLX_RANK", "MLX_WORLD_SIZE"),
    "mpi": ("OMPI_COMM_WORLD_SIZE",),
}


class PeerError(RuntimeError):
    """Another rank failed, went away or disagrees; the message names it."""


class PeerLost(PeerError):
    """A collective could not complete: a peer exited, was killed, or its connection broke."""


def peer_timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return seconds


def launched_backend() -> str | None:
    """The backend whose launcher started this process, or None when it runs alone."""
    mlx_backends = [b for b, names in _LAUNCHED_BY.items() if all(os.environ.get(n) for n in names)]
    if mlx_backends:
        return mlx_backends[0]
    return None


class Ranks:
    """This process's place among the ranks. A single process is a group of one: nothing is exchanged."""

    def __init__(self, group=None, watchdog: Watchdog | None = None):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1
        self._watchdog = watchdog or Watchdog()
        # bytes this rank has put into collectives; in a ring all_gather each rank sends (and receives)
        # its share to each of the size - 1 others, forwarded round the ring
        self.sent_bytes = 0

    @classmethod
    def join(cls) -> Ranks:
        """Connect to the other ranks when started by a launcher; a group of one otherwise."""
        backend = launched_backend()
        if backend is None:
            return cls()
        rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
        limit = min(CONNECT_TIMEOUT_S, peer_timeout())
        watchdog = Watchdog()
        message = (
            f"rank {rank}: could not connect to the other ranks within {limit:g} s ({backend} backend); "
            "did every rank start, and are the hostfile's addresses and ports reachable?"
        )
        with watchdog.armed(limit, message):
            group = mx.distributed.init(strict=True, backend=backend)
        return cls(group, watchdog)

    @property
    def primary(self) -> bool:
        """Rank 0: the one that writes files and speaks."""
        return self.rank == 0

    def others(self) -> str:
        others = [str(r) for r in range(self.size) if r != self.rank]
        return f"rank {others[0]}" if len(others) == 1 else f"ranks {', '.join(others)}"

    @contextmanager
    def waiting(self, what: str):
        """Bound a wait on the other ranks by the watchdog; a broken connection becomes PeerLost."""
        limit = peer_timeout()
        message = (
            f"rank {self.rank}: no answer from {self.others()} for {limit:g} s while {what}; giving up "
            f"(a rank hung or its machine is unreachable; {TIMEOUT_ENV} sets the limit)"
        )
        with self._watchdog.armed(limit, message):
            try:
                yield
            except RuntimeError as e:
                if isinstance(e, PeerError):
                    raise
                raise PeerLost(
                    f"rank {self.rank}: lost the connection to {self.others()} while {what} "
                    f"({str(e).strip()}); the rank that stopped says why"
                ) from None

    def all_gather(self, x: mx.array, what: str) -> mx.array:
        """`x` from every rank stacked on a new first axis (same shape and dtype on every rank)."""
        if self.size == 1:
            return x[None]
        mx.eval(x)  # this rank's own work is not part of the wait
        self.sent_bytes += x.nbytes * (self.size - 1)
        with self.waiting(what):
            out = mx.distributed.all_gather(x[None], group=self.group)
            mx.eval(out)
        return out

    def exchange(self, record: dict, what: str) -> list[dict]:
        """Every rank's JSON-able `record`, indexed by rank."""
        if self.size == 1:
            return [record]
        data = np.frombuffer(json.dumps(record, sort_keys=True).encode(), dtype=np.uint8)
        lengths = np.asarray(self.all_gather(mx.array([data.size], dtype=mx.int32), what))[:, 0]
        padded = np.zeros(int(lengths.max()), np.uint8)
        padded[: data.size] = data
        rows = np.asarray(self.all_gather(mx.array(padded), what))
        return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths, strict=True)]

    def check(self, error: BaseException | None, what: str, describe=None, **payload) -> list[dict]:
        """Share whether each rank got through `what` (and any JSON-able `payload`); every rank's record.

        If a rank failed, every rank raises: the one that failed its own error, the others PeerError
        naming it.
        """
        message = (describe or _describe)(error) if error is not None else None
        records = self.exchange({"error": message, **payload}, what)
        if error is not None:
            raise error
        failed = [(r, rec["error"]) for r, rec in enumerate(records) if rec["error"] is not None]
        if failed:
            r, message = failed[0]
            raise PeerError(f"rank {self.rank}: stopped because rank {r} failed {what}: {message}")
        return records

    def close(self) -> None:
        self._watchdog.close()


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if isinstance(error, (ValueError, OSError, PeerError)) else f"{type(error).__name__}: {text}"
