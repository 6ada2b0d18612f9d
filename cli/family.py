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
    """settings with the family's steps / cfg / slg in place of those not in `explicit`, and a line saying
    which were used (None when the pipeline does not say what it is)."""
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
    s = dataclasses.replace(settings, **changes)
    slg = "SLG on layers " + ", ".join(map(str, s.slg_layers)) if s.slg and s.cfg > 1 else "no SLG"
    cfg = f"guidance {s.cfg:g}" + (" (off)" if s.cfg <= 1 else "")
    return s, f"{family.name}: {s.steps} steps, {cfg}, {slg}"
