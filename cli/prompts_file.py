"""--prompts-file FILE: one image job per line, as A1111's "Prompts from file or textbox" script reads them.

A line is a prompt, or A1111's per-line options (`--prompt "a cat" --negative_prompt "dog" --steps 20 --seed 5
--cfg_scale 7 --width 512 --height 512 --sampler_name "DPM++ 2M"`; AUTOMATIC1111/stable-diffusion-webui
scripts/prompts_from_file.py). Blank lines and `#` comments are skipped. Each line is checked before the model
loads (an unknown or bad option: one line naming the file's line); the model loads once, and each line's
LoRAs (its `<lora:...>` tags and the command's --lora) are switched in for it. File names continue over the
lines: {index} counts every image of the file.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from sd35m_mlx.sampling.labels import SAMPLER_LABELS, sampler_from_label

from . import job as job_phases
from .errors import UsageError
from .output import plan_paths
from .progress import Reporter, peak_memory

MAX_LINES = 1000
MAX_FILE_BYTES = 1 << 20


def _text(v: str) -> str:
    return v


def _sampler(v: str) -> str:
    found = sampler_from_label(v)
    if found is None:
        raise ValueError(f"unknown sampler {v!r}; choose one of {', '.join(SAMPLER_LABELS.values())}")
    return found[0]


# A1111's per-line option -> (our parameter, parse)
LINE_OPTIONS = {
    "prompt": ("prompt", _text),
    "negative_prompt": ("negative_prompt", _text),
    "steps": ("steps", int),
    "seed": ("seeds", lambda v: (int(v),)),
    "cfg_scale": ("cfg", float),
    "width": ("width", int),
    "height": ("height", int),
    "sampler_name": ("sampler", _sampler),
}


def parse_line(line: str) -> dict:
    """A line's parameters: the whole line as the prompt, or its `--option value` pairs. ValueError (one line)."""
    if not line.startswith("--"):
        return {"prompt": line}
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise ValueError(f"cannot split it into options ({e})") from None
    out = {}
    for i in range(0, len(words), 2):
        key = words[i]
        if not key.startswith("--") or key[2:] not in LINE_OPTIONS:
            raise ValueError(f"unknown option {key!r}; these are read: --{', --'.join(LINE_OPTIONS)}")
        if i + 1 >= len(words):
            raise ValueError(f"{key} needs a value")
        name, parse = LINE_OPTIONS[key[2:]]
        try:
            out[name] = parse(words[i + 1])
        except ValueError as e:
            raise ValueError(f"{key} {words[i + 1]!r}: {e}") from None
    return out


def read(path: str) -> list[tuple[int, dict]]:
    """(line number, parameters) of every prompt line in the file."""
    try:  # at most the cap read, whatever the size says (/dev/zero, a pipe: stat says 0 and the read never ends)
        with Path(path).expanduser().open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise UsageError(f"--prompts-file {path}: cannot read it ({e.strerror or type(e).__name__})") from None
    if len(data) > MAX_FILE_BYTES:
        raise UsageError(f"--prompts-file {path}: larger than {MAX_FILE_BYTES >> 20} MB")
    try:
        lines = data.decode("utf-8-sig").splitlines()  # -sig: Notepad's byte-order mark is not part of line 1's prompt
    except UnicodeDecodeError as e:
        where = f"byte {data[e.start]:#04x} at offset {e.start}"
        raise UsageError(f"--prompts-file {path}: not UTF-8 text ({where})") from None
    out = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            out.append((number, parse_line(line)))
        except ValueError as e:
            raise UsageError(f"--prompts-file {path} line {number}: {e}") from None
    if not out:
        raise UsageError(f"--prompts-file {path} holds no prompt")
    if len(out) > MAX_LINES:
        raise UsageError(f"--prompts-file {path} has {len(out)} prompts; at most {MAX_LINES}")
    return out


def run(ctx: click.Context, reporter: Reporter, params: dict, path: str) -> None:
    """Plan every line, load once, make each line's images (the command's phases, cli/job.py)."""
    if params["prompt"] or params["from_image"]:
        raise UsageError("--prompts-file replaces PROMPT and --from-image: give one of them")
    jobs = []
    for number, line in read(path):
        try:
            job = job_phases.plan(ctx, {**params, **line}, chosen=frozenset(line))
        except click.ClickException as e:
            raise UsageError(f"--prompts-file {path} line {number}: {e.message}") from None
        if job.edit.kwargs:
            raise UsageError("--prompts-file does not combine with --mask, --outpaint or --controlnet yet")
        jobs.append(job)
    paths = plan_paths(params["output"], [seed for job in jobs for seed in job.seeds])
    for job in jobs:  # the file's images are numbered as one run
        job.paths, paths = paths[: len(job.seeds)], paths[len(job.seeds) :]
    for note in jobs[0].notes:
        reporter.say(note)
    reporter.say(f"Loading {jobs[0].settings.model} ({jobs[0].settings.dtype}); {len(jobs)} prompts")
    pipe, written, taken = None, [], set()
    for n, job in enumerate(jobs, 1):
        pipe = job_phases.load(job, params, reporter, pipe)
        for i in range(len(job.seeds)):
            image = job_phases.make_image(pipe, job, params, reporter, i, label=f"[prompt {n}/{len(jobs)}]")
            written.append(job_phases.write(reporter, job, image, i, params["overwrite"], taken, params["quality"]))
    reporter.summary(written, peak_memory())
