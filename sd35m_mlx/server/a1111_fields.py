"""The A1111 payload fields we accept but do not act on, with the value that means "off" in A1111
(modules/api/models.py and processing.py's StableDiffusionProcessing defaults). A field sent with another
value is named in `info.warnings`, so a client learns what was not done instead of guessing."""

from __future__ import annotations

from typing import Any

# field -> A1111's default (None: absent / not set). Anything else sent is "asked for, not done".
IGNORED = {
    "restore_faces": False,
    "tiling": False,
    "subseed": -1,
    "subseed_strength": 0,
    "seed_resize_from_h": (-1, 0),
    "seed_resize_from_w": (-1, 0),
    "enable_hr": False,
    "styles": [],
    "eta": (None, 1.0),  # the ancestral samplers' default
    "s_churn": 0,
    "s_tmax": (None, 0),
    "s_tmin": 0,
    "s_noise": 1,
    "s_min_uncond": 0,
    "override_settings": {},
    "refiner_checkpoint": None,
    "refiner_switch_at": None,
    "script_name": None,
    "script_args": [],
    "alwayson_scripts": {},
    "resize_mode": 0,
    "image_cfg_scale": (None, 1.5),  # instruct-pix2pix only; 1.5 is what clients send
    "include_init_images": False,
    "initial_noise_multiplier": (None, 1.0),
    "latent_mask": None,
    "inpainting_mask_weight": None,
    "firstpass_image": None,
}
# hires-fix settings: they matter (and are named) only with enable_hr
HIRES = frozenset({
    "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name",
    "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "firstphase_width", "firstphase_height",
})  # fmt: skip
# sent by clients routinely, with no effect on the image
HARMLESS = frozenset({
    "send_images", "do_not_save_samples", "do_not_save_grid", "disable_extra_networks",
    "override_settings_restore_afterwards", "force_task_id", "infotext", "comments", "sampler_index",
    "denoising_strength", "n_iter", "batch_size",
})  # fmt: skip


def _same(value: Any, default: Any) -> bool:
    defaults = default if isinstance(default, tuple) else (default,)
    if value is None or value in defaults:
        return True
    return isinstance(value, (list, dict, str)) and not value


def ignored_notes(extra: dict[str, Any]) -> list[str]:
    """One note per field sent with an effect we do not have (unknown fields included: A1111 adds some
    every release), for `info.warnings`."""
    notes = []
    for name, value in extra.items():
        if name in HARMLESS or (name in IGNORED and _same(value, IGNORED[name])):
            continue
        if name in HIRES and not extra.get("enable_hr"):
            continue
        if name in IGNORED or value not in (None, False, 0, "", [], {}):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            notes.append(f"{name}={shown} is not supported here; ignored")
    return notes
