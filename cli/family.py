"""Per-model defaults: steps, guidance and Skip Layer Guidance from the loaded model's family."""

from __future__ import annotations

import dataclasses

from sd35m_mlx import model_family

from .settings import Settings

FAMILY_HELP = "; ".join(
    f"{f.name} {f.steps} steps, guidance {f.guidance:g}, SLG {'on' if f.slg_layers else 'off'}"
    for f in model_family.FAMILIES
)


def apply_family_defaults(settings: Settings, pipe, explicit: set[str]) -> tuple[Settings, str | None]:
    """settings with the family's steps / cfg / slg in place of those not in `explicit`, and the family's name
    (None when the pipeline does not say what it is): `describe` it once the settings are fitted to the model,
    so the line never names SLG layers the model lacks."""
    config = getattr(pipe, "transformer_config", None)
    if config is None:
        return settings, None
    family = model_family.detect(config, settings.model)
    changes = {}
    if "steps" not in explicit:
        changes["steps"] = family.steps
    if "cfg" not in explicit:
        changes["cfg"] = family.guidance
    if "slg" not in explicit:
        changes["slg"] = family.slg_layers is not None
        if family.slg_layers:
            changes["slg_layers"] = family.slg_layers
    return dataclasses.replace(settings, **changes), family.name


def describe(family: str, s: Settings) -> str:
    """The one line saying which steps, guidance and SLG this run uses."""
    slg = "SLG on layers " + ", ".join(map(str, s.slg_layers)) if s.slg and s.cfg > 1 else "no SLG"
    cfg = f"guidance {s.cfg:g}" + (" (off)" if s.cfg <= 1 else "")
    return f"{family}: {s.steps} step{'s' * (s.steps != 1)}, {cfg}, {slg}"
