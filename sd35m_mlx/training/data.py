"""Training data: a folder of images with same-name .txt captions (the kohya / mflux convention), sorted into
aspect-ratio buckets, encoded once (VAE latents, text embeddings) and cached on disk as safetensors, so the
text encoders and the VAE are not resident while the transformer trains."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, UnidentifiedImageError

from .step import Batch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_SIDE = 64  # px: smaller images carry too little to learn from and usually are a mistake (thumbnails)


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str


def scan_folder(folder: str | os.PathLike, trigger_word: str | None = None, default_caption: str | None = None):
    """Examples of `folder` (sorted by name). Caption: `name.txt` next to `name.png`, else `default_caption`;
    a trigger word is put in front ("trigger, caption"). Raises a one-line ValueError naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"data: {folder} is not a folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ValueError(f"data: no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    examples = []
    for path in images:
        text_file = path.with_suffix(".txt")
        if text_file.is_file():
            try:
                caption = text_file.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"data: caption file {text_file} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                    f"offset {e.start}); save it as UTF-8"
                ) from None
        elif default_caption is not None:
            caption = default_caption
        else:
            raise ValueError(f"data: {path.name} has no caption file {text_file.name} (or pass --default-caption)")
        if trigger_word:
            caption = f"{trigger_word}, {caption}" if caption else trigger_word
        try:
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                size = im.size
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"data: cannot read image {path.name} ({e.__class__.__name__})") from None
        if min(size) < MIN_SIDE:
            raise ValueError(
                f"data: image {path.name} is too small ({size[0]}x{size[1]}; at least {MIN_SIDE} px a side)"
            )
        examples.append(Example(path, caption))
    return examples


def make_buckets(resolution: int, multiple: int = 16, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) pairs of at most resolution^2 pixels, sides multiples of `multiple`, aspect ratios up to
    max_ratio:1 either way; the long side grows in steps of resolution / 16 (64 px at 1024, kohya's
    bucket_reso_steps), at least `multiple`."""
    if resolution < multiple or resolution % multiple:
        raise ValueError(f"resolution must be a multiple of {multiple} (>= {multiple}), got {resolution}")
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    step = max(multiple, resolution // 16 // multiple * multiple)
    w = resolution
    while True:
        w += step
        h = int(area / w) // multiple * multiple
        if h < multiple or w / h > max_ratio:
            break
        buckets |= {(w, h), (h, w)}
    return sorted(buckets, key=lambda b: b[0] / b[1])


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    ratio = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ratio))


def load_image(path: Path, bucket: tuple[int, int]) -> np.ndarray:
    """RGB, resized to cover the bucket (Lanczos) and centre-cropped to it; (H, W, 3) float32 in [-1, 1]."""
    w, h = bucket
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = max(w / im.width, h / im.height)
        size = (max(w, round(im.width * scale)), max(h, round(im.height * scale)))
        im = im.resize(size, Image.Resampling.LANCZOS)
        left, top = (size[0] - w) // 2, (size[1] - h) // 2
        im = im.crop((left, top, left + w, top + h))
        return np.asarray(im, dtype=np.float32) / 127.5 - 1.0


def _fingerprint(example: Example, bucket: tuple[int, int], model_key: str) -> str:
    st = example.image.stat()
    text = json.dumps([str(example.image.resolve()), st.st_size, st.st_mtime_ns, example.caption, bucket, model_key])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_cache(
    pipe, examples: list[Example], resolution: int, cache_dir: str | os.PathLike, model_key: str = "", progress=None
) -> CachedDataset:
    """Encode every example once (files already cached for the same image, caption, bucket and model are
    reused) and return the dataset over the cache. Latents are the VAE mean, scaled as the transformer
    sees them: (mean - shift_factor) * scaling_factor."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    multiple = pipe.vae_scale_factor * pipe.transformer_config.patch_size
    buckets = make_buckets(resolution, multiple)
    index = []
    for n, ex in enumerate(examples):
        with Image.open(ex.image) as im:
            b = nearest_bucket(im.size, buckets)
        name = _fingerprint(ex, buckets[b], model_key) + ".safetensors"
        if not (cache_dir / name).is_file():
            pixels = mx.array(load_image(ex.image, buckets[b])[None]).astype(pipe.dtype)
            latents = pipe.vae.scale_latents(pipe.vae.encode(pixels).astype(mx.float32))
            embeds, _, pooled, _ = pipe.encode_prompt(ex.caption, do_classifier_free_guidance=False)
            arrays = {"latents": latents[0], "prompt_embeds": embeds[0], "pooled_prompt_embeds": pooled[0]}
            mx.save_safetensors(str(cache_dir / name), arrays, metadata={"caption": ex.caption})
        index.append({"file": name, "bucket": list(buckets[b]), "image": str(ex.image), "caption": ex.caption})
        if progress is not None:
            progress(n + 1, len(examples))
    (cache_dir / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return CachedDataset(cache_dir, pipe.dtype)


class CachedDataset:
    """Items read from the cache folder per batch (nothing but the current batch in memory), in the compute
    dtype (as diffusers casts the model input to the weight dtype): a float32 input would promote every
    activation of a bfloat16 model."""

    def __init__(self, cache_dir: str | os.PathLike, dtype: mx.Dtype = mx.float32):
        self.folder = Path(cache_dir)
        self.index = json.loads((self.folder / "index.json").read_text())
        sizes = sorted({tuple(e["bucket"]) for e in self.index})
        self.buckets = [sizes.index(tuple(e["bucket"])) for e in self.index]
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, indices: list[int]) -> Batch:
        items = [mx.load(str(self.folder / self.index[i]["file"])) for i in indices]
        return Batch(*(mx.stack([it[k] for it in items]).astype(self.dtype) for k in Batch.__dataclass_fields__))
