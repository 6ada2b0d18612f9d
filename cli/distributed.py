"""`sd35m-mlx` under `mlx.launch`: the ranks share the images (--split seeds) or each image (--split cfg).

Every rank loads the model itself; rank 0 writes every file (names, metadata and never-overwrite as
in one process) and speaks; the others write nothing and print only errors. Before generating, the
ranks exchange whether they loaded and a fingerprint of their settings and model files
(sd35m_mlx/distributed/identity.py), so a rank that failed or differs stops them all.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click

from . import model as model_io
from .errors import RunError, UsageError, one_line
from .metadata import png_info
from .output import check_writable, plan_paths, write_png
from .progress import format_seconds, peak_memory

LAUNCH_HINT = "start it with mlx.launch on two hosts (README: Several Macs)"


def join(split: str):
    """The Ranks this process belongs to when started by a launcher with more than one; else None."""
    from sd35m_mlx.distributed import Ranks, launched_backend

    ranks = Ranks.join() if launched_backend() is not None else None
    if ranks is not None and ranks.size > 1:
        return ranks
    if ranks is not None:  # launched as one process
        ranks.close()
    if split == "cfg":
        raise UsageError(f"--split cfg shares each image between two processes, but this one runs alone: {LAUNCH_HINT}")
    return None


def run(ctx: click.Context, reporter, params: dict, ranks, split: str) -> None:
    from .generate import VERSION

    if not ranks.primary:
        reporter.quiet = True
    try:
        pipe, settings, seeds, paths = prepare(ctx, reporter, params, ranks, split)
        if split == "cfg":
            written = generate_split_cfg(reporter, pipe, settings, seeds, paths, ranks, params["overwrite"], VERSION)
        else:
            written = generate_seeds(reporter, pipe, settings, seeds, paths, ranks, params["overwrite"], VERSION)
    except click.ClickException as e:
        e.message = _ranked(ranks, e.message)
        raise
    except KeyboardInterrupt:
        raise
    except Exception as e:
        raise RunError(_ranked(ranks, _describe(e))) from None
    finally:
        ranks.close()
    reporter.summary(written, peak_memory())


def _ranked(ranks, message: str) -> str:
    return message if message.startswith("rank ") else f"rank {ranks.rank}: {message}"


def _describe(error: BaseException) -> str:
    from sd35m_mlx.distributed import PeerError

    if isinstance(error, click.ClickException):
        return error.message
    return str(error) if isinstance(error, PeerError) else one_line(error)


def prepare(ctx, reporter, params, ranks, split):
    """Checks and loading on every rank, then the agreement: a failure or difference anywhere stops all."""
    from sd35m_mlx.distributed import differences, fingerprint

    from .generate import build_settings

    error, identity, seeds = None, None, None
    try:
        settings, seeds, notes = build_settings(ctx, params)
        if split == "cfg":
            if ranks.size != 2:
                raise UsageError(f"--split cfg needs exactly 2 ranks, got {ranks.size}")
            if settings.cfg <= 1:
                raise UsageError(
                    f"--split cfg splits classifier-free guidance: it needs --cfg above 1, got {settings.cfg}"
                )
        paths = plan_paths(params["output"], seeds)
        if ranks.primary:  # only rank 0 writes; the others' folders need not exist
            for folder in {p.parent for p in paths}:
                check_writable(folder)
        folder = model_io.resolve_model(settings.model, revision=params["revision"], load_t5=settings.t5)
        for note in notes:
            reporter.say(note)
        how = "each image split over both" if split == "cfg" else "images spread over them"
        reporter.say(f"Loading {settings.model} ({settings.dtype}) on {ranks.size} ranks, {how}")
        t0 = time.perf_counter()
        pipe = model_io.load_pipeline(
            folder,
            settings.dtype,
            settings.t5,
            quantize=settings.quantize,
            t5_quantize=settings.t5_quantize,
            low_memory=params["low_memory"],
        )
        shared = {k: v for k, v in settings.to_json().items() if k != "seed"}  # seeds: rank 0's are used
        inputs = {"--image": settings.image} if settings.image else {}
        identity = fingerprint({**shared, "split": split}, folder, load_t5=settings.t5, files=inputs)
    except Exception as e:
        error = e
    records = ranks.check(error, "loading the model", _describe, identity=identity, seeds=seeds)
    for r, record in enumerate(records):
        if differ := differences(records[0]["identity"], record["identity"]):
            raise UsageError(
                f"rank {r} differs from rank 0 in {', '.join(differ)}: run the same command, sd35m-mlx and mlx "
                "versions and model files on every rank"
            )
    reporter.say(f"Loaded on every rank in {format_seconds(time.perf_counter() - t0)}")
    seeds = [int(s) for s in records[0]["seeds"]]  # random seeds differ per rank: rank 0's hold
    paths = plan_paths(params["output"], seeds)
    return pipe, settings, seeds, paths


def generate_seeds(reporter, pipe, settings, seeds, paths, ranks, overwrite, version):
    """Data parallel: round by round, each rank makes one image and rank 0 writes the round's files."""
    from sd35m_mlx.distributed import gather_images, my_index, rounds

    written: list[tuple[Path, int]] = []
    taken: set[Path] = set()
    n = len(seeds)
    for round_ in rounds(n, ranks.size):
        i = my_index(round_, ranks.rank)
        image, error = None, None
        if i is not None:
            s = dataclasses.replace(settings, seed=seeds[i])
            label = f"[{i + 1}/{n}]"
            reporter.say(f"{label} seed {s.seed}, {s.width}x{s.height}, {s.steps} steps on rank 0; "
                         f"{len(round_) - 1} more on the other ranks")  # fmt: skip
            try:
                image = pipe.generate(s.prompt, callback=reporter.steps(label), **s.generate_kwargs())[0]
            except Exception as e:
                error = e
        what = f"making images {round_[0] + 1}-{round_[-1] + 1}" if len(round_) > 1 else f"making image {round_[0] + 1}"
        ranks.check(error, what, _describe)
        images = gather_images(ranks, image, (settings.width, settings.height), len(round_), "collecting images")
        if ranks.primary:
            for j, img in zip(round_, images, strict=True):
                written.append(_write(reporter, img, settings, seeds[j], paths[j], j, n, overwrite, taken, version))
    return written


def generate_split_cfg(reporter, pipe, settings, seeds, paths, ranks, overwrite, version):
    """One image at a time, each on both ranks (sd35m_mlx/distributed/cfg_split.py)."""
    from sd35m_mlx.distributed import split_cfg

    split_cfg(pipe, ranks)
    written: list[tuple[Path, int]] = []
    taken: set[Path] = set()
    n = len(seeds)
    for i, seed in enumerate(seeds):
        s = dataclasses.replace(settings, seed=seed)
        label = f"[{i + 1}/{n}]"
        reporter.say(f"{label} seed {seed}, {s.width}x{s.height}, {s.steps} steps, split over 2 ranks")
        kwargs = s.generate_kwargs()
        if not ranks.primary:
            kwargs["output_type"] = "latent"  # the same latents as rank 0; only rank 0 decodes and writes
        images = pipe.generate(s.prompt, callback=reporter.steps(label), **kwargs)
        if ranks.primary:
            written.append(_write(reporter, images[0], settings, seed, paths[i], i, n, overwrite, taken, version))
    return written


def _write(reporter, image, settings, seed, path, i, n, overwrite, taken, version):
    s = dataclasses.replace(settings, seed=seed)
    final = write_png(image, path, png_info(s, version), overwrite=overwrite, taken=taken)
    if final != path:
        reporter.say(f"[{i + 1}/{n}] {path} exists; wrote {final} instead (--overwrite replaces)")
    reporter.result(final)
    return final, seed
