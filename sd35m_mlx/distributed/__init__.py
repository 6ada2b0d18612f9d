"""Several processes (machines) started by `mlx.launch`: data-parallel seeds and CFG split over two ranks."""

from .cfg_split import CfgSplitDenoiser, split_cfg
from .group import PeerError, PeerLost, Ranks, launched_backend, peer_timeout
from .identity import differences, fingerprint
from .sharding import gather_images, my_index, rounds

__all__ = [
    "CfgSplitDenoiser",
    "PeerError",
    "PeerLost",
    "Ranks",
    "differences",
    "fingerprint",
    "gather_images",
    "launched_backend",
    "my_index",
    "peer_timeout",
    "rounds",
    "split_cfg",
]
