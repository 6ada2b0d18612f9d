"""Test helpers: random LoRAs written by peft + diffusers, and independent writers for the other layouts.

The other-layout writers start from the diffusers-format tensors (our names) and build what each tool
writes, with their own code (fused qkv by concatenation, the adaLN half swap, alpha conventions), so a
converter bug on our side and a writer bug here would have to coincide to pass.
"""

from __future__ import annotations

import json

import numpy as np
import torch

TRANSFORMER_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_out.0",
    "to_add_out",
    "net.0.proj",
    "net.2",
    "norm1.linear",
    "norm1_context.linear",
    "norm_out.linear",
    "context_embedder",
    "linear_1",
    "linear_2",
    "proj_out",
    "pos_embed.proj",  # the patch-embedding Conv2d: peft writes a conv LoRA
]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def allow_installed_peft():
    """transformers 5.x asks for peft >= 0.22 in its text-encoder adapter methods; 0.21 (the newest on
    our index) does what diffusers' SD3 text-encoder LoRA loading needs. Lift the version gate only."""
    import transformers.integrations.peft as tp

    tp.check_peft_version = lambda *a, **k: None


def peft_lora(
    model, name: str, targets, rank: int, alpha: float, seed: int, b_std: float, alpha_pattern=None, use_dora=False
):
    """Add a peft adapter with random A and B (B ~ N(0, b_std)) to `model`; return (state dict, config dict).
    With use_dora, the DoRA magnitudes are peft's initial ones (the adapted rows' norms) times 1 +- 20%."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        init_lora_weights=False,
        alpha_pattern=alpha_pattern or {},
        use_dora=use_dora,
    )
    model.add_adapter(config, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if f"lora_A.{name}." in key:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif f"lora_B.{name}." in key:
                p.copy_(torch.randn(p.shape, generator=g) * b_std)
            elif f"lora_magnitude_vector.{name}." in key:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    state = get_peft_model_state_dict(model, adapter_name=name)
    keep = ("r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_dora")
    meta = {k: v for k, v in config.to_dict().items() if k in keep}
    meta["target_modules"] = list(targets)
    return state, meta


def write_diffusers_lora(
    folder, pipe, name: str, seed: int, rank=4, alpha=8.0, text_encoders=True, alpha_pattern=None, use_dora=False
):
    """A LoRA on the tiny transformer (every Linear, adaLN and embedders included) and on CLIP-L / CLIP-G,
    written by StableDiffusion3Pipeline.save_lora_weights (with lora_adapter_metadata). Returns the file."""
    from diffusers import StableDiffusion3Pipeline

    targets = [t for t in TRANSFORMER_TARGETS if t != "pos_embed.proj"] if use_dora else TRANSFORMER_TARGETS
    tr, tr_meta = peft_lora(pipe.transformer, name, targets, rank, alpha, seed, 0.05, alpha_pattern, use_dora)
    kwargs = dict(transformer_lora_layers=tr, transformer_lora_adapter_metadata=tr_meta)
    if text_encoders:
        te, te_meta = peft_lora(pipe.text_encoder, name, CLIP_TARGETS, rank, alpha, seed + 1, 0.05)
        te2, te2_meta = peft_lora(pipe.text_encoder_2, name, CLIP_TARGETS, rank, alpha, seed + 2, 0.05)
        kwargs.update(
            text_encoder_lora_layers=te,
            text_encoder_lora_adapter_metadata=te_meta,
            text_encoder_2_lora_layers=te2,
            text_encoder_2_lora_adapter_metadata=te2_meta,
        )
    StableDiffusion3Pipeline.save_lora_weights(folder, weight_name=f"{name}.safetensors", **kwargs)
    for model in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):  # leave the writer's models clean
        if hasattr(model, "delete_adapters") and name in getattr(model, "peft_config", {}):
            model.delete_adapters(name)
    return folder / f"{name}.safetensors"


def read_lora(path) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata() or {}
    return load_file(str(path)), metadata


def save(path, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path), metadata)
    return path


def diffusers_modules(tensors: dict[str, np.ndarray], metadata: dict) -> dict[str, tuple]:
    """{"transformer.x.y": (down, up, alpha)} from a diffusers-format file, alpha from its metadata."""
    meta = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    out = {}
    for key, down in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        up = tensors[f"{module}.lora_B.weight"]
        component = module.split(".")[0]
        alpha = meta.get(f"{component}.lora_alpha", down.shape[0])
        for pattern, value in (meta.get(f"{component}.alpha_pattern") or {}).items():
            if module.endswith("." + pattern):
                alpha = value
        out[module] = (down, up, float(alpha))
    return out


def velocity_probe(pipe) -> np.ndarray:
    """The pipeline's transformer on fixed random inputs (seed 2): compares what LoRAs do to it."""
    import mlx.core as mx

    rng = np.random.default_rng(2)
    c = pipe.transformer.config
    x = mx.array(rng.standard_normal((1, 8, 8, c.in_channels), dtype=np.float32))
    enc = mx.array(rng.standard_normal((1, 5, c.joint_attention_dim), dtype=np.float32))
    pooled = mx.array(rng.standard_normal((1, c.pooled_projection_dim), dtype=np.float32))
    return np.array(pipe.transformer(x, enc, pooled, 600.0))
