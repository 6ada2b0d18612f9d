"""AUTOMATIC1111's labels for our samplers, schedulers and noise sources, both ways: the PNG `parameters` text
writes them, `--from-image` and the A1111-compatible server read them.

A1111's names are from stable-diffusion-webui's modules/sd_samplers_kdiffusion.py (`samplers_k_diffusion`),
modules/sd_samplers_timesteps.py (DDIM, UniPC) and modules/sd_schedulers.py. Ours without an A1111 name keep
ours (ComfyUI's). Old A1111 PNGs fold the schedule into the sampler ("DPM++ 2M Karras"); `sampler_from_label`
splits them. Imports nothing heavy: the CLI's --help and the server's front end read it.
"""

from __future__ import annotations

from ..defaults import SAMPLERS
from .noise import RNG_SOURCES
from .schedulers import SCHEDULERS

SAMPLER_LABELS = {
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a",
    "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "lcm": "LCM",
    "ipndm": "IPNDM",
    "deis": "DEIS",
    "ddim": "DDIM",
    "uni_pc": "UniPC",
}
SCHEDULER_LABELS = {
    "normal": "Normal",
    "simple": "Simple",
    "sgm_uniform": "SGM Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "beta": "Beta",
    "kl_optimal": "KL Optimal",
    "ddim_uniform": "DDIM",
}
RNG_LABELS = {"cpu": "CPU", "nv": "NV", "mlx": "MLX"}  # A1111 writes `RNG: CPU` / `RNG: NV`; MLX is ours
_A1111_SCHEDULER_NAMES = {"automatic": "normal", "uniform": "normal", "ddim": "ddim_uniform"}  # A1111's own names


def sampler_label(name: str) -> str:
    return SAMPLER_LABELS.get(name, name)


def scheduler_label(name: str) -> str:
    return SCHEDULER_LABELS.get(name, name)


def _lookup(label: str, labels: dict[str, str], names: tuple[str, ...]) -> str | None:
    if label in names:
        return label
    folded = label.strip().casefold()
    for name, text in labels.items():
        if text.casefold() == folded or name.casefold() == folded:
            return name
    return None


def scheduler_from_label(label: str) -> str | None:
    """Our scheduler for an A1111 label ("Karras", "SGM Uniform", "Automatic") or our own name; None if unknown."""
    return _lookup(label, SCHEDULER_LABELS, SCHEDULERS) or _A1111_SCHEDULER_NAMES.get(label.strip().casefold())


def sampler_from_label(label: str) -> tuple[str, str | None] | None:
    """(sampler, scheduler or None) for an A1111 sampler label ("Euler a", "DPM++ 2M"), an old-style one with the
    schedule folded in ("DPM++ 2M Karras", "DPM++ 2M SDE Exponential"), or our own name; None if unknown."""
    if (name := _lookup(label, SAMPLER_LABELS, SAMPLERS)) is not None:
        return name, None
    for text, scheduler in (("Karras", "karras"), ("Exponential", "exponential")):
        head, _, tail = label.strip().rpartition(" ")
        if tail.casefold() == text.casefold() and (name := _lookup(head, SAMPLER_LABELS, SAMPLERS)) is not None:
            return name, scheduler
    return None


def rng_from_label(label: str) -> str | None:
    """Our noise source for A1111's `RNG:` value (CPU, NV; A1111's GPU is its CUDA generator, which NV ports)."""
    folded = label.strip().casefold()
    if folded == "gpu":
        return "nv"
    return next((rng for rng, text in RNG_LABELS.items() if text.casefold() == folded), None) if folded else None


__all__ = [
    "RNG_LABELS",
    "RNG_SOURCES",
    "SAMPLER_LABELS",
    "SCHEDULER_LABELS",
    "rng_from_label",
    "sampler_from_label",
    "sampler_label",
    "scheduler_from_label",
    "scheduler_label",
]
