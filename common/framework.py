"""What the training driver (common.driver) asks of a framework: one protocol and one record.

The driver knows nothing of torch or jax; each framework's package describes itself with a
`Framework` and trains through a `SeedGroup`, the shell around its pure training functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.batching import EpochPlan
from common.progress import EpochProgress
from common.recipes import Recipe


@dataclass(frozen=True)
class TrainerConfig:
    """What a framework needs to build its model, optimiser and schedule."""

    recipe: Recipe
    device: str  # --device: auto, cpu or gpu
    threads: int | None
    steps_per_epoch: int  # per-step schedules (optax) need it to express per-epoch ones
    ops: str = "auto"  # --ops: auto, plain or fast; each framework resolves auto for its device


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

    def predict(self, images: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """Each seed's eval-mode log-probabilities (N, 10) float32 of normalised images (N, 28, 28)."""

    def restore(self, index: int, payload: Any) -> None:
        """Seed `index` continues from a checkpoint's payload (`Framework.read_checkpoint`)."""

    def is_finite(self, index: int) -> bool:
        """Whether every weight and BatchNorm statistic of seed `index` is finite (checked before saving)."""

    def checkpoint_bytes(self, index: int, meta: dict) -> bytes:
        """Seed `index`'s whole training state plus `meta` (JSON-ready), in a format safe to load."""

    def model_bytes(self, index: int) -> bytes:
        """Seed `index`'s weights alone, for --save-model."""


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
