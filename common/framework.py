"""What the training driver (common.driver) asks of a framework: one protocol and one record.

The driver knows nothing of torch or jax; each framework's package describes itself with a
`Framework` and trains through a `SeedGroup`, the shell around its pure training functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.batching import EpochPlan
from common.progress import EpochProgress
from common.recipes import Recipe

DeviceCount = int | str | None  # --devices: a number, "all", or None (one per process)


def _alone() -> None:
    """The barrier of a single process: nothing to wait for."""


@dataclass(frozen=True)
class Processes:
    """This process's place in a data-parallel run of several processes (torchrun, the elastic
    launcher, jax.distributed); a run of one process is index 0 of 1. Process 0 alone writes
    the run's files; each process feeds its part of every global batch (`EpochPlan.shard`)."""

    index: int = 0
    count: int = 1
    barrier: Callable[[], None] = field(default=_alone, compare=False)  # wait until every process arrives

    @property
    def is_main(self) -> bool:
        return self.index == 0


SINGLE_PROCESS = Processes()


@dataclass(frozen=True)
class TrainerConfig:
    """What a framework needs to build its model, optimiser and schedule, and to place them."""

    recipe: Recipe
    device: str  # --device: auto, cpu or gpu
    threads: int | None
    steps_per_epoch: int  # per-step schedules (optax) need it to express per-epoch ones
    ops: str = "auto"  # --ops: auto, plain or fast; each framework resolves auto for its device
    devices: DeviceCount = None  # --devices: how many devices share every batch
    processes: Processes = SINGLE_PROCESS
    epoch_images: int = 0  # training images per epoch (the batches' sizes must split evenly over the devices)


class SeedGroup(Protocol):
    """The seeds of one recipe, trained epoch by epoch. A run of one seed is a group of one;
    seed i's `plans[i]`, `progresses[i]` and predictions[i] are those of a run of seed i alone,
    whatever else is in the group."""

    def describe(self) -> dict[str, Any]:
        """Framework, version, device and thread facts recorded in config.json."""

    def learning_rate(self) -> float:
        """The learning rate the next training step will use."""

    def compile_seconds(self) -> float:
        """Seconds spent compiling so far in this process (0 for eager execution)."""

    def train_epoch(self, plans: list[EpochPlan], images: np.ndarray, labels: np.ndarray,
                    progresses: list[EpochProgress]) -> None:
        """Train every seed on every batch of its plan (uint8 `images`), reporting to its progress."""

    def average_weights(self) -> None:
        """Take each seed's current weights into its SWA average (the recipe's `averages_after`)."""

    def recalibrate_batchnorm(self, images: np.ndarray, batch_size: int) -> None:
        """Replace the BatchNorm running statistics each seed evaluates (its average's, if it keeps
        one) by their recomputation over the
        normalised `images` (N, 28, 28), `batch_size` at a time, in file order: train mode, dropout
        off, no weight update, every batch's statistics weighed equally (update_bn's rule)."""

    def predict(self, images: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """Each seed's eval-mode log-probabilities (N, 10) float32 of normalised images (N, 28, 28),
        from its averaged weights where the recipe keeps an average that holds any."""

    def restore(self, index: int, payload: Any) -> None:
        """Seed `index` continues from a checkpoint's payload (`Framework.read_checkpoint`)."""

    def is_finite(self, index: int) -> bool:
        """Whether every weight and BatchNorm statistic of seed `index` is finite (checked before saving)."""

    def checkpoint_bytes(self, index: int, meta: dict) -> bytes:
        """Seed `index`'s whole training state plus `meta` (JSON-ready), in a format safe to load."""

    def model_bytes(self, index: int) -> bytes:
        """Seed `index`'s evaluated weights alone (averaged, as `predict` uses them), for --save-model."""


@dataclass(frozen=True)
class Framework:
    """How the driver reaches one framework."""

    name: str  # "torch" or "jax": used in file and directory names
    title: str  # "PyTorch" or "JAX"
    module: str  # the CLI module, for --help and messages
    checkpoint_name: str
    model_name: str
    create_seed_group: Callable[[TrainerConfig, list[int]], SeedGroup]
    read_checkpoint: Callable[[Path], tuple[dict, Any]]  # -> (meta, payload), CheckpointError if bad
    read_weights: Callable[[Path], Any]  # checkpoint or weights file -> weights for `predict`
    # (weights, normalised images, batch size, --device, --ops) -> log-probabilities, no training state
    predict: Callable[[Any, np.ndarray, int, str, str], np.ndarray]
    # (weights, normalised training images, batch size, --device, --ops) -> the weights with their
    # BatchNorm statistics recomputed over the images (SeedGroup.recalibrate_batchnorm's rule)
    recalibrate: Callable[[Any, np.ndarray, int, str, str], Any]
    # (--device, --devices) -> this process's place among the processes it was launched with; runs
    # before the framework touches a device (JAX must learn the number of CPU devices before it starts)
    join_processes: Callable[[str, DeviceCount], Processes]
    # (--devices, the CLI arguments) -> exit status after starting one process per device and
    # waiting for them, or None where this process trains itself (always, in JAX)
    launch_processes: Callable[[DeviceCount, list[str]], int | None]
