"""`train(config)`: scan and cache the data, load the frozen base, train, write checkpoints, validation
images and the final LoRA. The CLI (`sd35m-mlx train`) is a thin layer over this."""

from __future__ import annotations

import gc
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from ..lora.kohya_export import KOHYA_FILE
from .checkpoint import LORA_FILE, check_resume, export_kohya, save_lora
from .config import TrainConfig
from .data import build_cache, scan_folder
from .trainer import Progress, Trainer, TrainingInterrupted

# What a run writes in its output folder besides the reusable encoding cache (cache/, keyed by content)
RUN_OUTPUTS = ("config.json", LORA_FILE, KOHYA_FILE, "validation", "checkpoint-*")


def train(config: TrainConfig, say: Callable[[str], None] = print, show_progress: bool = True) -> Path:
    """Run the training `config` describes; returns the final LoRA file."""
    from ..pipeline import StableDiffusion35

    output = Path(config.output)
    # every error before any loading or writing
    examples = scan_folder(config.data, config.trigger_word, config.default_caption)
    recorded = config.to_dict()
    if config.resume:
        check_resume(config.resume, recorded)
    prepare_output(output, config.resume, config.overwrite)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(recorded, indent=2) + "\n")
    say(f"{len(examples)} images in {config.data}")

    pipe = StableDiffusion35.from_pretrained(
        config.model, config.dtype, load_t5=not config.no_t5, quantize=config.quantize, low_memory=False
    )
    model_key = json.dumps([str(config.model), config.dtype, config.no_t5])
    dataset = build_cache(pipe, examples, config.resolution, output / "cache", model_key)
    validation = None
    if config.validation_prompt:
        validation = pipe.encode_prompt(config.validation_prompt)
    # 1. Only the transformer stays resident: text encoders and VAE go (the VAE comes back for validation)
    pipe.prompt_encoder = None
    pipe.vae = None
    gc.collect()
    mx.clear_cache()

    trainer = Trainer(pipe.transformer, pipe.schedule, dataset, config.train, recorded=recorded)
    if config.resume:
        trainer.resume(config.resume)
        say(f"resumed from {config.resume} at step {trainer.step}")

    def validate(step: int) -> None:
        if validation is None:
            return
        pipe.vae = pipe._reload("vae").vae
        folder = output / "validation"
        folder.mkdir(exist_ok=True)
        cond, uncond, pooled, uncond_pooled = validation
        for seed in config.validation_seeds:
            image = pipe.generate(
                prompt_embeds=cond,
                negative_prompt_embeds=uncond,
                pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=uncond_pooled,
                height=config.resolution,
                width=config.resolution,
                num_inference_steps=config.validation_steps,
                seed=seed,
            )[0]
            image.save(folder / f"step{step:06d}-seed{seed}.png")
        pipe.vae = None
        gc.collect()
        mx.clear_cache()

    progress = Progress(trainer.step, config.train.steps, enabled=show_progress)
    try:
        trainer.run(output, progress, validate, notice=say)
    except TrainingInterrupted as e:
        progress.close()
        say(f"Interrupted: checkpoint saved in {e.checkpoint} (continue with --resume {e.checkpoint})")
        raise
    except KeyboardInterrupt:
        progress.close()
        say(f"Aborted during step {trainer.step + 1}: no checkpoint saved for it (earlier ones stay)")
        raise
    progress.close()
    trainer.save_checkpoint(output / f"checkpoint-{trainer.step}")
    path = save_lora(trainer.lora, output)
    if config.export_kohya:
        say(f"kohya layout: {export_kohya(trainer.lora, output / KOHYA_FILE)}")
    if validation is not None and (not config.train.validation_every or trainer.step % config.train.validation_every):
        validate(trainer.step)
    return path


def prepare_output(output: Path, resume: str | None, overwrite: bool) -> None:
    """A run writes into an empty (or new) folder, or one holding only the encoding cache; into an earlier
    run's folder only to continue it (`resume` is one of its checkpoints: same settings, so the steps it
    rewrites come out the same), or with `overwrite`, which first deletes that run's outputs (RUN_OUTPUTS;
    the cache and files of other programs stay)."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"output: {output} is a file, not a folder")
    if not output.is_dir():
        return
    existing = sorted(p.name for p in output.iterdir() if p.name != "cache")
    if not existing:
        return
    if resume and Path(resume).resolve().parent == output.resolve():
        return
    if not overwrite:
        shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
        raise ValueError(
            f"output: {output} is not empty ({shown}); resume one of its checkpoints with --resume, "
            "replace that run with --overwrite, or pick another folder"
        )
    for pattern in RUN_OUTPUTS:
        for path in output.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
