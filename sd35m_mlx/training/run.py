"""`train(config)`: scan and cache the data, load the frozen base, train, write checkpoints, validation
images and the final LoRA. The CLI (`sd35m-mlx train`) is a thin layer over this."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from ..lora.kohya_export import KOHYA_FILE
from .checkpoint import export_kohya, save_lora
from .config import TrainConfig
from .data import build_cache, scan_folder
from .trainer import Progress, Trainer


def train(config: TrainConfig, say: Callable[[str], None] = print, show_progress: bool = True) -> Path:
    """Run the training `config` describes; returns the final LoRA file."""
    from ..pipeline import StableDiffusion35

    output = Path(config.output)
    examples = scan_folder(config.data, config.trigger_word, config.default_caption)  # errors before any loading
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
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

    trainer = Trainer(pipe.transformer, pipe.schedule, dataset, config.train)
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
        trainer.run(output, progress, validate)
    except KeyboardInterrupt:
        progress.close()
        say(f"Interrupted: checkpoint saved in {output / f'checkpoint-{trainer.step}'}")
        raise
    progress.close()
    trainer.save_checkpoint(output / f"checkpoint-{trainer.step}")
    path = save_lora(trainer.lora, output)
    if config.export_kohya:
        say(f"kohya layout: {export_kohya(trainer.lora, output / KOHYA_FILE)}")
    if validation is not None and (not config.train.validation_every or trainer.step % config.train.validation_every):
        validate(trainer.step)
    return path
