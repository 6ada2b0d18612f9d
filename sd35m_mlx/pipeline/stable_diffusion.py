"""StableDiffusion35: text (and image) to image, wiring the encoders, MMDiT, sampler and VAE."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from functools import partial

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..defaults import PROMPT_SYNTAXES, TEXT_ENCODINGS
from ..images import decode_latents, to_output
from ..loading import hub
from ..loading.parts import PipelineParts
from ..loading.safetensors_io import materialize
from ..loading.sources import load_pipeline_parts
from ..loading.taesd import TAESD3_REPO, load_taesd
from ..lora import LoraMixin
from ..models.mmdit import SD3Transformer2DModel
from ..models.prompt_encoder import PromptEncoder
from ..prompts.comfyui import encode_prompt_comfyui
from ..prompts.weighted import encode_prompt_weighted
from ..quantize import quantize_parts
from ..sampling.cancel import Cancellation, cancellable
from ..sampling.guidance import GuidedDenoiser
from ..sampling.loop import denoise
from ..sampling.memory import DEFAULT_WORK_BUDGET, LOW_MEMORY_WORK_BUDGET, bounded_work, physical_memory
from ..sampling.samplers import make_sampler, sampler_schedule
from ..sampling.schedule import FlowMatchSchedule
from ..sampling.schedulers import scheduler_sigmas
from ..validation import ARGUMENTS, ModelLimits
from .controlnets import ControlNetMixin
from .steps import (
    Decoder,
    conditioning,
    decode_output,
    guidance_config,
    initial_latents,
    prepare_inputs,
    sampler_brownian,
    sampler_noise,
    step_extras,
)
from .threads import any_thread, serialized
from .tiling import VAETiling

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
DEFAULT_TAESD = TAESD3_REPO  # loaded on first use by preview="taesd" / decoder="taesd"


def resolve_dtype(dtype: str | mx.Dtype) -> mx.Dtype:
    if isinstance(dtype, mx.Dtype):
        return dtype
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}") from None


class StableDiffusion35(LoraMixin, ControlNetMixin):
    """SD3.5 Medium (and other SD3-family MMDiT checkpoints) in MLX.

    `transformer`, `vae` and `prompt_encoder` stay public for users who compose their own loops.
    Any method may be called from any thread; `generate` and `encode_prompt` run one at a time per
    pipeline (threads.py), and `cancel()` stops a running `generate` from another thread.
    """

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        vae,
        prompt_encoder: PromptEncoder,
        schedule: FlowMatchSchedule,
        dtype: mx.Dtype = mx.float32,
        transformer_config=None,
    ):
        self.transformer = transformer
        self.vae = vae
        self.prompt_encoder = prompt_encoder
        self.schedule = schedule
        self.dtype = dtype
        self.transformer_config = transformer_config or transformer.config
        self.low_memory = False
        # bytes a denoising step or the VAE decode may hold in flight above what is resident, on GPU
        # backends (sampling/memory.py); None: no bound
        self.work_budget: int | None = DEFAULT_WORK_BUDGET
        self.controlnets: list = []  # SD3ControlNetModels used when generate() gets control_image(s)
        # builds the per-step velocity function; distributed/cfg_split.py swaps in a two-rank variant
        self.velocity_factory = GuidedDenoiser
        self._reload: Callable[[], PipelineParts] | None = None
        self._prompt_cache: tuple[str, tuple] | None = None
        self.taesd = None  # TAESD3 decoder for previews and drafts; loaded from DEFAULT_TAESD on first use
        self._lock = threading.RLock()
        self._cancellation = Cancellation()
        self.vae_tiling = VAETiling()  # None: automatic (tiling.py)

    @classmethod
    @any_thread
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        dtype: str | mx.Dtype = "bfloat16",
        *,
        load_t5: bool = True,
        revision: str | None = None,
        quantize: int | None = None,
        t5_quantize: int | str | None = None,
        quantize_group_size: int = 64,
        low_memory: bool | None = None,
        taesd: str | os.PathLike | None = None,
        loras: Sequence | None = None,
        controlnet: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    ) -> StableDiffusion35:
        """Load a model: a Hugging Face repo id (diffusers layout), a local diffusers-layout folder,
        a Stability single-file checkpoint (or its folder), or a folder from `sd35m-mlx convert`.

        Weights are read one tensor at a time (largest first) so a dtype cast never holds two copies.
        `quantize` (4 or 8) quantizes the MMDiT's linear layers as they stream in, `t5_quantize` T5's
        (default: as `quantize`; "none" keeps T5 in `dtype`). `low_memory` runs generation in stages
        (encode text, release the text encoders, denoise, release the transformer, decode) so the text
        encoders and the transformer are never resident together; None turns it on when the weights
        would take more than about 60% of this machine's memory. `taesd` (a Hub id, folder or
        .safetensors file) loads the TAESD3 decoder for preview="taesd" and decoder="taesd"; None
        loads DEFAULT_TAESD when first needed. `loras`: LoRA files or Hub ids, each
        alone (weight 1.0) or as (source, weight); see `load_lora_weights`. `controlnet`: one or several
        ControlNets to load (see `load_controlnet`).
        """
        dtype = resolve_dtype(dtype)
        if hub.is_hub_id(source):  # resolve once: stage reloads must not go back to the network
            source = hub.download(source, revision=revision, load_t5=load_t5)
        t5_bits = quantize if t5_quantize is None else (None if t5_quantize == "none" else int(t5_quantize))
        for name, bits in (("quantize", quantize), ("t5_quantize", t5_bits)):
            if bits not in (None, 4, 8):
                raise ValueError(f"{name} must be 4 or 8 bits (or None), got {bits}")

        def lazy_parts() -> PipelineParts:  # nothing is read until evaluated
            return load_pipeline_parts(source, dtype, load_t5=load_t5, revision=revision)

        def load(component: str) -> PipelineParts:
            """Reload for a low_memory stage, quantizing only the component it needs (quantizing reads)."""
            return quantize_parts(
                lazy_parts(),
                transformer_bits=quantize if component == "transformer" else None,
                t5_bits=t5_bits if component == "prompt_encoder" else None,
                group_size=quantize_group_size,
            )

        parts = lazy_parts()
        config = parts.transformer.config
        if low_memory is None:
            low_memory = parameter_bytes(parts) > 0.6 * physical_memory()
        if low_memory:  # each component loads for its own stage (the text encoders one at a time)
            parts.transformer = parts.prompt_encoder = None
        quantize_parts(
            parts, transformer_bits=None if low_memory else quantize, t5_bits=t5_bits, group_size=quantize_group_size
        )
        materialize(parts.transformer, parts.vae, *_encoders(parts.prompt_encoder))
        pipe = cls(parts.transformer, parts.vae, parts.prompt_encoder, parts.schedule, dtype, config)
        pipe.low_memory = bool(low_memory)
        if low_memory:
            pipe.work_budget = LOW_MEMORY_WORK_BUDGET
        pipe._reload = load
        if taesd is not None:
            pipe.taesd = _load_taesd(taesd, dtype)
        pipe._load_loras(loras)
        controlnets = [controlnet] if isinstance(controlnet, (str, os.PathLike)) else list(controlnet or [])
        for source in controlnets:  # `revision` is the model's, not theirs
            pipe.load_controlnet(source, quantize=quantize, quantize_group_size=quantize_group_size)
        return pipe

    def cancel(self) -> bool:
        """Stop the `generate` running now (on any thread) at its next step boundary: it raises
        GenerationCancelled, and the pipeline stays usable. With no generate running this does nothing
        (it never cancels a later call); one arriving during the final decode lets the image finish.
        True if a run was there to receive it."""
        return self._cancellation.cancel()

    def _decoder(self, name: str) -> Decoder:
        """Model-space latents -> images in [0, 1]: "vae" (tiled when needed, images.decode_latents) or
        "taesd" (TAESD3, loaded from DEFAULT_TAESD on first use)."""
        if name == "taesd":
            if self.taesd is None:
                self.taesd = _load_taesd(DEFAULT_TAESD, self.dtype)
            taesd = self.taesd
            return lambda latents: decode_latents(taesd, latents, self.dtype)
        return lambda latents: decode_latents(self.vae, latents, self.dtype, decode=self._decode)

    def _component(self, name: str):
        """A component, reloaded (lazily: only what the stage evaluates is read) if a stage released it."""
        part = getattr(self, name)
        if part is None:
            part = getattr(self._reload(name), name)
            materialize(*(_encoders(part) if name == "prompt_encoder" else [part]))
            self._lora_attach(name, part)  # adapters live on the pipeline: re-applied to every reload
            setattr(self, name, part)
        return part

    def _release(self, name: str) -> None:
        if self.low_memory and self._reload is not None:
            setattr(self, name, None)
            gc.collect()
            mx.clear_cache()

    @serialized
    def encode_prompt(
        self,
        prompt,
        negative_prompt="",
        prompt_2=None,
        prompt_3=None,
        *,
        prompt_syntax: str = "plain",
        text_encoding: str = "diffusers",
        **kwargs,
    ):
        """(prompt_embeds, negative_prompt_embeds, pooled, negative_pooled) as diffusers returns them.

        `prompt_syntax`: "plain" encodes as diffusers does; "weighted" reads A1111's syntax (`(x:1.2)`, `[x]`,
        BREAK) and prompts longer than 77 CLIP tokens (prompts/weighted.py). `text_encoding="comfyui"` encodes
        as ComfyUI's CLIPTextEncode for SD3 (prompts/comfyui.py: T5 at least 77 tokens and uncut, ComfyUI's
        weight syntax unless prompt_syntax is "plain"). In low_memory mode with the encoders released, T5
        loads and runs alone, then the two CLIPs."""
        if prompt_syntax not in PROMPT_SYNTAXES:
            raise ValueError(f"unknown prompt_syntax {prompt_syntax!r}; choose one of {', '.join(PROMPT_SYNTAXES)}")
        if text_encoding not in TEXT_ENCODINGS:
            raise ValueError(f"unknown text_encoding {text_encoding!r}; choose one of {', '.join(TEXT_ENCODINGS)}")
        if self.low_memory and self._reload is not None and self.prompt_encoder is None:
            encoder = self._reload("prompt_encoder").prompt_encoder  # lazy: each stage reads its encoders
            self._lora_attach("prompt_encoder", encoder)  # text encoder LoRAs, on the lazy weights
            kwargs["stage"] = _loaded_for_stage(encoder)
        else:
            encoder = self._component("prompt_encoder")
        if text_encoding == "comfyui":
            encode = partial(encode_prompt_comfyui, encoder, weighted=prompt_syntax == "weighted")
        else:
            encode = encoder.encode_prompt if prompt_syntax == "plain" else partial(encode_prompt_weighted, encoder)
        embeds = encode(prompt, negative_prompt=negative_prompt, prompt_2=prompt_2, prompt_3=prompt_3, **kwargs)
        mx.eval([e for e in embeds if e is not None])  # evaluated: usable from any thread (threads.py)
        return embeds

    def _encode_cached(self, prompt, **kwargs):
        """encode_prompt, remembering the last result: a new seed for the same prompt (the usual
        loop) skips the text encoders, and in low_memory mode does not reload them."""
        key = repr((prompt, sorted(kwargs.items())))
        if self._prompt_cache is None or self._prompt_cache[0] != key:
            self._prompt_cache = (key, self.encode_prompt(prompt, **kwargs))
            self._release("prompt_encoder")
        return self._prompt_cache[1]

    def enable_vae_tiling(self, tile_size: int | None = None) -> None:
        """Decode and encode in overlapping tiles of tile_size px (default 512; 25% overlap), GroupNorm
        statistics shared across tiles: memory bounded by one tile for any size, twice the VAE time.
        Without a call, tiling turns on by itself in low_memory mode or when the decode would not fit."""
        self.vae_tiling.enable(tile_size)

    def disable_vae_tiling(self) -> None:
        """Never tile the VAE (also not automatically)."""
        self.vae_tiling.disable()

    def _decode(self, z: mx.array) -> mx.array:
        return self.vae_tiling.decode(self.vae, z, self.low_memory)

    def _encode(self, images: mx.array) -> mx.array:
        """Images NHWC in [-1, 1] -> model-space latents, float32 (the VAE tiled when needed)."""
        latents = self.vae_tiling.encode(self.vae, images.astype(self.dtype), self.low_memory)
        return self.vae.scale_latents(latents.astype(mx.float32))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def limits(self) -> ModelLimits:
        """What this model accepts (sizes, block indices, latent shape), for `validate_generation`."""
        c = self.transformer_config
        multiple = self.vae_scale_factor * c.patch_size
        return ModelLimits(
            size_multiple=multiple,
            max_side=c.pos_embed_max_size * multiple,
            num_layers=c.num_layers,
            latent_channels=c.in_channels,
            vae_scale_factor=self.vae_scale_factor,
            context_width=c.joint_attention_dim,
            pooled_width=c.pooled_projection_dim,
        )

    @serialized
    def decode(self, latents: mx.array, decoder: str = "vae") -> list:
        """Latents as generate's step callback sees them (NHWC, model space) -> PIL images, decoded as
        generate decodes its result: a run stopped part-way can still show where it stood (A1111's
        interrupt answers that image). Not NaN-checked: a partial image is shown as it is."""
        with bounded_work(self.work_budget):
            images = self._decoder(decoder)(latents)
            mx.eval(images)
        return to_output(images, "pil")

    @serialized
    @cancellable
    def generate(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        negative_prompt: str | Sequence[str] = "",
        prompt_2: str | Sequence[str] | None = None,
        prompt_3: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 40,
        guidance_scale: float = 4.5,
        seed: int | Sequence[int] | None = None,
        latents=None,
        num_images_per_prompt: int = 1,
        max_sequence_length: int = 256,
        sampler: str = "euler",
        scheduler: str = "normal",
        shift: float | None = None,
        rng: str = "cpu",
        prompt_syntax: str = "plain",
        text_encoding: str = "diffusers",
        skip_guidance_layers: Sequence[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_start: float = 0.01,
        skip_layer_guidance_stop: float = 0.2,
        image=None,
        strength: float = 0.6,
        mask_image=None,
        padding_mask_crop: int | None = None,
        control_image=None,
        controlnet_conditioning_scale: float | Sequence[float] = 1.0,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        output_type: str = "pil",
        callback: Callable[[int, int, mx.array], bool | None] | None = None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        preview: str | None = None,
        preview_every: int = 1,
        on_preview: Callable | None = None,
        decoder: str = "vae",
    ):
        """Generate images; a list of PIL images, or with output_type="np" a (B, H, W, 3) float32 array.

        height/width default to 1024, or to the input image's size for img2img. `image` may also be model-space
        latents, NHWC (B, H/8, W/8, C) as output_type="latent" returns them: img2img then starts from them without
        the VAE (diffusers' img2img takes a tensor with the latent channels so). `latents` is the
        initial noise, NHWC (B, H/8, W/8, C). `callback(step, total, latents)` runs after every step;
        returning False raises GenerationCancelled. `mask_image` (white = repaint) with `image` inpaints as
        diffusers' StableDiffusion3InpaintPipeline; `padding_mask_crop` (px) repaints only a crop around the
        mask at full size and pastes it back (see editing/inpaint.py). `control_image` (one per loaded
        ControlNet) conditions on edge/depth maps as diffusers' StableDiffusion3ControlNetPipeline
        (editing/control.py). Precomputed `prompt_embeds` (and the other three,
        as `encode_prompt` returns them) skip text encoding; they are repeated num_images_per_prompt times.
        `preview` ("rgb" or "taesd") calls `on_preview(step, total, PIL.Image)` with the current
        estimate of the first image every `preview_every` steps and on the last (sampling/preview.py).
        `prompt_syntax="weighted"` reads A1111's prompt syntax and long prompts (see `encode_prompt`);
        `text_encoding="comfyui"` encodes prompts as ComfyUI does for SD3 (see `encode_prompt`).
        `decoder="taesd"` decodes with the tiny TAESD3 decoder (fast drafts) instead of the VAE.
        `cancel()` from another thread raises GenerationCancelled at the next step boundary.

        `sampler` (ComfyUI's names, sampling/samplers) steps along `scheduler`'s sigmas (ComfyUI's names,
        sampling/schedulers.py; "normal" is diffusers' schedule) at flow `shift` (None: the model's config).
        `seed` with `rng="cpu"` draws the noise diffusers draws for `generator=torch.Generator().manual_seed(seed)`
        (one draw for the batch); a list of seeds, one per image, as diffusers' list of generators. `rng="nv"`
        is A1111's NV source, `rng="mlx"` the noise drawn before `rng` existed (sampling/noise.py).
        """
        # 1. Inputs: the editing inputs set the canvas, then every argument is checked before any work
        arguments = {k: v for k, v in locals().items() if k in ARGUMENTS}
        s, canvas = prepare_inputs(arguments, self.limits, self.controlnets, self.transformer_config)
        do_cfg = s.guidance_scale > 1

        # 2. Text conditioning (cond and uncond batched as [uncond, cond], as diffusers does)
        cond, uncond, pooled, uncond_pooled = conditioning(s, do_cfg, self._encode_cached)
        context = mx.concatenate([uncond, cond]) if do_cfg else cond
        pooled_all = mx.concatenate([uncond_pooled, pooled]) if do_cfg else pooled

        # 3. Schedule and initial latents (img2img / inpainting: the source image noised to the start step)
        shift = self.schedule.shift if s.shift is None else s.shift
        n_train = self.schedule.num_train_timesteps
        sigmas_for = partial(scheduler_sigmas, s.scheduler, shift=shift, num_train_timesteps=n_train)
        sigmas = sampler_schedule(s.sampler, sigmas_for, s.num_inference_steps)
        timesteps = sigmas[:-1] * np.float32(n_train)
        begin = initial_latents(s, canvas, self.limits, cond.shape[0], sigmas, self._encode)
        noise, brownian = sampler_noise(s.seed, s.rng), sampler_brownian(s.seed, s.rng)
        sampler = make_sampler(s.sampler, sigmas, noise, shift=shift, brownian=brownian)

        # 4. Denoising loop: per-step extras (ControlNet, inpainting, callback, previews) plug in as StepExtras
        velocity = self.velocity_factory(
            self._component("transformer"),
            context,
            pooled_all,
            timesteps,
            guidance_config(s),
            begin.start,
            self.dtype,
        )
        velocity.precompute(sampler.model_sigmas(begin.start))  # a sampler's midpoints too, before any release
        if self.low_memory and self._reload is not None:
            velocity.transformer.release_modulation_weights()  # precomputed above; reloaded next time
            gc.collect()
            mx.clear_cache()
        extras = step_extras(
            s,
            canvas,
            begin,
            velocity,
            do_cfg,
            conditions=(context, pooled_all),
            timesteps=timesteps,
            vae=self.vae,
            dtype=self.dtype,
            cancel_check=self._cancellation.check,
            decoder=self._decoder,
        )
        try:
            x = denoise(begin.x, begin.start, sampler, velocity, extras, self.work_budget)
        finally:  # also when cancelled or a callback raised: the pipeline stays usable
            del velocity
            self._release("transformer")

        # 5. Decode (the VAE tiles when needed; an inpainting crop is pasted back)
        return decode_output(x, s, canvas, self._decoder, self.work_budget, self.dtype)


def _encoders(prompt_encoder: PromptEncoder | None) -> list:
    e = prompt_encoder
    return [e.text_encoder, e.text_encoder_2, e.text_encoder_3] if e is not None else []


def _loaded_for_stage(encoder: PromptEncoder):
    """A `stage` for PromptEncoder.encode_prompt: reads the named encoders on entry, drops them on exit."""

    @contextmanager
    def stage(names):
        materialize(*(getattr(encoder, n) for n in names))
        try:
            yield
        finally:
            for n in names:
                setattr(encoder, n, None)
            gc.collect()
            mx.clear_cache()

    return stage


def parameter_bytes(parts: PipelineParts) -> int:
    """Bytes of all weights (lazy arrays report their size without being read)."""
    enc = parts.prompt_encoder
    modules = [parts.transformer, parts.vae, enc.text_encoder, enc.text_encoder_2, enc.text_encoder_3]
    return sum(v.nbytes for m in modules if m is not None for _, v in tree_flatten(m.parameters()))


def _load_taesd(source: str | os.PathLike, dtype: mx.Dtype):
    """The TAESD3 decoder from a Hub id, folder or file, evaluated (usable from any thread)."""
    taesd = load_taesd(source, dtype)
    materialize(taesd)
    return taesd
