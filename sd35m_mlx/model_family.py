"""Which SD3-family model a checkpoint is, and the sampling defaults its model card gives.

One implementation runs them all (config-driven MMDiT); they differ in what the weights hold and in
how they are best sampled:

| model | detected by | steps | guidance | SLG |
| --- | --- | --- | --- | --- |
| SD3.5 Medium | dual-attention (MMDiT-X) blocks | 40 | 4.5 | layers 7, 8, 9 |
| SD3.5 Large | plain blocks with qk-norm | 28 | 3.5 | off |
| SD3.5 Large Turbo | as Large, "turbo" in the model's name | 4 | 0 (off) | off |
| SD3 Medium | plain blocks without qk-norm | 28 | 7.0 | off |

Steps and guidance are the model cards' diffusers examples. Skip Layer Guidance was tuned on SD3.5
Medium (its layers 7-9; the model card recommends it); Turbo is distilled to run without guidance,
so it has neither CFG nor SLG.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    steps: int
    guidance: float
    slg_layers: tuple[int, ...] | None  # None: no Skip Layer Guidance


SD35_MEDIUM = Family("SD3.5 Medium", 40, 4.5, (7, 8, 9))
SD35_LARGE = Family("SD3.5 Large", 28, 3.5, None)
SD35_LARGE_TURBO = Family("SD3.5 Large Turbo", 4, 0.0, None)
SD3_MEDIUM = Family("SD3 Medium", 28, 7.0, None)
FAMILIES = (SD35_MEDIUM, SD35_LARGE, SD35_LARGE_TURBO, SD3_MEDIUM)


def detect(config, name: str = "") -> Family:
    """The family of a model from its transformer config (an MMDiTConfig) and its name (hub id, folder or
    file name): only "turbo" in the name matters, as no tensor tells SD3.5 Large Turbo from Large."""
    if config.dual_attention_layers:
        return SD35_MEDIUM
    if config.qk_norm is None:
        return SD3_MEDIUM
    return SD35_LARGE_TURBO if "turbo" in str(name).lower() else SD35_LARGE
