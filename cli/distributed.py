"""`sd35m-mlx` under `mlx.launch`: the ranks share the images (--split seeds) or each image (--split cfg).

Every rank loads the model itself; rank 0 writes every file (names, metadata and never-overwrite as
in one process) and speaks; the others write nothing and print only errors. Before generating, the
ranks exchange whether they loaded and a fingerprint of their settings and model files
(sd35m_mlx/distributed/identity.py), so a rank that failed or differs stops them all.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from . import job as job_phases
from .errors import RunError, UsageError, one_line
from .output import plan_paths
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
    if not ranks.primary:
        reporter.quiet = True
    try:
        pipe, job = prepare(ctx, reporter, params, ranks, split)
        make = generate_split_cfg if split == "cfg" else generate_seeds
        written = make(reporter, pipe, job, params, ranks)
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
    """Checks and loading on every rank, then the agreement: a failure or difference anywhere stops all.
    The same phases as one process (cli/job.py: plan, load), so every option works here too."""
    from sd35m_mlx.distributed import differences, fingerprint

    error, identity, seeds, pipe, job = None, None, None, None, None
    t0 = time.perf_counter()
    try:
        job = job_phases.plan(ctx, params, writer=ranks.primary)  # only rank 0 writes files and previews
        seeds = job.seeds
        if split == "cfg":
            if ranks.size != 2:
                raise UsageError(f"--split cfg needs exactly 2 ranks, got {ranks.size}")
            if job.settings.cfg <= 1:
                raise UsageError(
                    f"--split cfg splits classifier-free guidance: it needs --cfg above 1, got {job.settings.cfg}"
                )
        for note in job.notes:
            reporter.say(note)
        how = "each image split over both" if split == "cfg" else "images spread over them"
        reporter.say(f"Loading {job.settings.model} ({job.settings.dtype}) on {ranks.size} ranks, {how}")
        pipe = job_phases.load(job, params, reporter)
        shared = {k: v for k, v in job.settings.to_json().items() if k != "seed"}  # seeds: rank 0's are used
        inputs = {"--image": job.settings.image} if job.settings.image else {}
        identity = fingerprint({**shared, "split": split}, job.folder, load_t5=job.settings.t5, files=inputs)
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
    job.seeds = [int(s) for s in records[0]["seeds"]]  # random seeds differ per rank: rank 0's hold
    job.paths = plan_paths(params["output"], job.seeds)
    return pipe, job


def generate_seeds(reporter, pipe, job, params, ranks):
    """Data parallel: round by round, each rank makes one image and rank 0 writes the round's files."""
    from sd35m_mlx.distributed import gather_images, my_index, rounds

    written: list[tuple[Path, int]] = []
    taken: set[Path] = set()
    n, s = len(job.seeds), job.settings
    for round_ in rounds(n, ranks.size):
        i = my_index(round_, ranks.rank)
        image, error = None, None
        if i is not None:
            label = f"[{i + 1}/{n}] ({len(round_) - 1} more on the other ranks)"
            try:
                image = job_phases.make_image(pipe, job, params, reporter, i, label=label)
            except Exception as e:
                error = e
        what = f"making images {round_[0] + 1}-{round_[-1] + 1}" if len(round_) > 1 else f"making image {round_[0] + 1}"
        ranks.check(error, what, _describe)
        images = gather_images(ranks, image, (s.width, s.height), len(round_), "collecting images")
        if ranks.primary:
            for j, img in zip(round_, images, strict=True):
                written.append(job_phases.write(reporter, job, img, j, params["overwrite"], taken, params["quality"]))
    return written


def generate_split_cfg(reporter, pipe, job, params, ranks):
    """One image at a time, each on both ranks (sd35m_mlx/distributed/cfg_split.py)."""
    from sd35m_mlx.distributed import split_cfg

    split_cfg(pipe, ranks)
    written: list[tuple[Path, int]] = []
    taken: set[Path] = set()
    n = len(job.seeds)
    for i in range(n):
        label = f"[{i + 1}/{n}] (split over 2 ranks)"
        # the other rank computes the same latents; only rank 0 decodes and writes
        overrides = {} if ranks.primary else {"output_type": "latent"}
        image = job_phases.make_image(pipe, job, params, reporter, i, label=label, **overrides)
        if ranks.primary:
            written.append(job_phases.write(reporter, job, image, i, params["overwrite"], taken, params["quality"]))
    return written
