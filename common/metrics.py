"""Per-epoch metrics: how they are computed from model outputs and how they are stored.

The file is JSON lines, one object per epoch with the fields of `EpochRecord`; both trainers
write the same schema so that plots, the comparison script and users can read either.
Accuracies are percentages, losses are mean negative log-likelihoods per image.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.files import atomic_write_bytes


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch produced; `train_*` are running values over the epoch, dropout on."""

    epoch: int
    lr: float
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    epoch_seconds: float  # training only: augmentation, forward, backward, update (wall clock)
    eval_seconds: float  # evaluation on the test set (wall clock)
    compile_seconds: float  # part of these seconds spent compiling (0 for eager PyTorch)
    recalibration_seconds: float = 0.0  # recomputing the BatchNorm statistics (Recipe.recalibrate_bn), if done


@dataclass(frozen=True)
class Evaluation:
    """Loss and accuracy of log-probabilities against labels, and the predictions themselves."""

    loss: float
    accuracy: float
    correct: int
    predictions: np.ndarray


def evaluate_log_probs(log_probs: np.ndarray, labels: np.ndarray) -> Evaluation:
    """Mean NLL and accuracy (%) of (N, 10) log-probabilities, summed in float64."""
    picked = np.take_along_axis(log_probs, labels[:, None].astype(np.int64), axis=1)
    predictions = log_probs.argmax(axis=1)
    correct = int((predictions == labels).sum())
    return Evaluation(
        loss=float(-picked.astype(np.float64).mean()),
        accuracy=100.0 * correct / len(labels),
        correct=correct,
        predictions=predictions,
    )


def write_metrics(path: Path, history: list[EpochRecord]) -> None:
    """Write the whole history (rewritten each epoch, atomically, so it matches the checkpoint)."""
    lines = "".join(json.dumps(dataclasses.asdict(record), allow_nan=False) + "\n" for record in history)
    atomic_write_bytes(path, lines.encode())


def read_metrics(path: Path) -> list[EpochRecord]:
    """Read a metrics file written by either trainer."""
    with open(path) as handle:
        return [EpochRecord(**json.loads(line)) for line in handle if line.strip()]
