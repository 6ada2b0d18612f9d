"""The training loop: data order, noise, loss, clipped AdamW step, checkpoints, validation, progress."""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..sampling.schedule import FlowMatchSchedule
from . import checkpoint, order
from .lora_params import TrainableLora, resolve_targets
from .optim import make_optimizer
from .recipe import Recipe, sample_sigmas, sample_u
from .step import Batch, make_update

LOSSES = {"x0": True, "velocity": False}  # --loss -> diffusers' precondition_outputs


@dataclass
class TrainSettings:
    steps: int = 1000
    rank: int = 16
    alpha: float | None = None  # default: rank (scale 1)
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    batch_size: int = 1
    targets: str = "attention"
    seed: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-4
    loss: str = "x0"
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    gradient_checkpointing: bool = False  # the staged backward (staged.py): one block's activations at a time
    compile: bool = False  # mx.compile the update (see step.make_update)
    save_every: int = 0  # steps between checkpoints; 0: only at the end and on Ctrl-C
    validation_every: int = 0

    def __post_init__(self):
        for name in ("steps", "rank", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("save_every", "validation_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")

    @property
    def recipe(self) -> Recipe:
        return Recipe(self.weighting_scheme, self.logit_mean, self.logit_std, precondition_outputs=LOSSES[self.loss])


class Dataset(Protocol):
    buckets: list[int]  # per item, the index of its aspect-ratio bucket

    def batch(self, indices: list[int]) -> Batch: ...


class Trainer:
    def __init__(
        self,
        transformer: nn.Module,
        schedule: FlowMatchSchedule,
        dataset: Dataset,
        settings: TrainSettings,
        recorded: dict | None = None,
    ):
        """`recorded`: the run's settings as checkpoints record them (state.json "settings") and a resume
        compares them (checkpoint.check_resume); default the TrainSettings alone (train() adds the rest)."""
        if not dataset.buckets:
            raise ValueError("data: no training items")
        self.transformer, self.schedule, self.dataset, self.settings = transformer, schedule, dataset, settings
        self.recipe = settings.recipe
        paths = resolve_targets(transformer, settings.targets)
        self.lora = TrainableLora(transformer, paths, settings.rank, settings.alpha, seed=settings.seed)
        self.optimizer = make_optimizer(
            settings.learning_rate, settings.steps, settings.warmup_steps, settings.lr_schedule, settings.weight_decay
        )
        self.optimizer.init(self.lora.params)
        self.update = self._make_update()
        self.step = 0  # steps done
        self.recorded = asdict(settings) if recorded is None else recorded

    def _make_update(self):
        s = self.settings
        return make_update(
            self.lora, self.transformer, self.optimizer, self.recipe, s.max_grad_norm, s.compile,
            staged=s.gradient_checkpointing,
        )  # fmt: skip

    def batch_indices(self, step: int) -> list[int]:
        return order.batch_for_step(self.dataset.buckets, self.settings.batch_size, self.settings.seed, step)

    def train_step(self) -> float:
        """One optimizer step; returns its loss."""
        batch = self.dataset.batch(self.batch_indices(self.step))
        k_u, k_noise = mx.random.split(order.step_key(self.settings.seed, self.step))
        u = np.array(sample_u(self.recipe, batch.latents.shape[0], k_u))
        sigmas, timesteps = sample_sigmas(u, self.schedule)
        noise = mx.random.normal(batch.latents.shape, key=k_noise).astype(batch.latents.dtype)
        loss = self.update(batch, noise, sigmas, timesteps)
        mx.eval(loss, self.lora.params, self.optimizer.state)
        self.lora.bind(self.lora.params)  # the side paths held the traced pre-update factors
        self.step += 1
        return float(loss)

    def run_state(self) -> dict:
        s = self.settings
        n = order.batches_per_epoch(self.dataset.buckets, s.batch_size)
        return {
            "step": self.step,
            "seed": s.seed,
            "epoch": self.step // n,
            "batches_per_epoch": n,
            # data order and noise are functions of (seed, step): see order.py
            "next_batch": self.batch_indices(self.step) if self.step < s.steps else None,
            "settings": self.recorded,
        }

    def save_checkpoint(self, folder: str | Path) -> Path:
        return checkpoint.save_checkpoint(folder, self.lora, self.optimizer, self.run_state())

    def resume(self, folder: str | Path) -> None:
        checkpoint.check_resume(folder, self.recorded)  # before anything is replaced
        state = checkpoint.load_checkpoint(folder, self.lora, self.optimizer)
        self.update = self._make_update()  # a compiled update captured the replaced factors and optimizer state
        self.step = int(state["step"])

    def run(
        self,
        output: str | Path,
        progress: Callable[[int, float], None] | None = None,
        validate: Callable[[int], None] | None = None,
        notice: Callable[[str], None] | None = None,
    ) -> list[float]:
        """Train to `settings.steps`; checkpoints under output/checkpoint-N every save_every steps. Returns
        this run's losses.

        Ctrl-C (SIGINT, when run from the main thread) only asks to stop: the step in progress finishes, its
        checkpoint is saved and TrainingInterrupted is raised, so the checkpoint named N holds exactly N steps.
        A second Ctrl-C aborts at once (plain KeyboardInterrupt, nothing saved)."""
        output = Path(output)
        s = self.settings
        losses = []
        with _stop_at_step_boundary(notice) as stop_requested:
            while self.step < s.steps:
                losses.append(self.train_step())
                if progress is not None:
                    progress(self.step, losses[-1])
                if s.save_every and self.step % s.save_every == 0 and self.step < s.steps:
                    self.save_checkpoint(output / f"checkpoint-{self.step}")
                if validate is not None and s.validation_every and self.step % s.validation_every == 0:
                    validate(self.step)
                if stop_requested() and self.step < s.steps:
                    raise TrainingInterrupted(self.save_checkpoint(output / f"checkpoint-{self.step}"))
        return losses


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `Trainer.run` between two steps; `checkpoint` holds the state after the last one."""

    def __init__(self, checkpoint: Path):
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint


@contextmanager
def _stop_at_step_boundary(notice: Callable[[str], None] | None) -> Iterator[Callable[[], bool]]:
    """While inside: the first SIGINT only sets a flag (read with the yielded function); a second raises
    KeyboardInterrupt where it lands. Python runs signal handlers in the main thread between bytecodes, so
    a handler that raised could split a step from its counter; the flag is read at step boundaries only.
    Outside the main thread no handler can be installed, and nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    requested = False

    def handler(signum, frame):
        nonlocal requested
        if requested:
            raise KeyboardInterrupt
        requested = True
        if notice is not None:
            notice("Ctrl-C: stopping after this step to save a checkpoint (press Ctrl-C again to abort without)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: requested
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


class Progress:
    """step, smoothed loss (EMA 0.9, bias-corrected), it/s, ETA and peak memory on a tqdm bar (stderr)."""

    def __init__(self, start: int, total: int, enabled: bool = True):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, unit="step", disable=not enabled, dynamic_ncols=True)
        self.ema, self.n, self.t0 = 0.0, 0, time.perf_counter()

    def __call__(self, step: int, loss: float) -> None:
        self.n += 1
        self.ema = 0.9 * self.ema + 0.1 * loss
        smoothed = self.ema / (1 - 0.9**self.n)
        peak = mx.get_peak_memory() / 1e9
        self.bar.set_postfix_str(f"loss {smoothed:.4f}, peak {peak:.2f} GB", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

    @property
    def smoothed(self) -> float:
        return self.ema / (1 - 0.9**self.n) if self.n else math.nan
