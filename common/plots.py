"""The run's pictures: the seed notebook's 2x2 training curves and grids of digits."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.files import atomic_write_bytes  # noqa: E402
from common.metrics import EpochRecord  # noqa: E402


def plot_curves(history: list[EpochRecord], path: Path, title: str) -> None:
    """Train/test loss and accuracy against epoch, laid out as in the seed notebook."""
    epochs = [record.epoch for record in history]
    panels = [
        ("Training Loss", [r.train_loss for r in history]),
        ("Training Accuracy (%)", [r.train_accuracy for r in history]),
        ("Test Loss", [r.test_loss for r in history]),
        ("Test Accuracy (%)", [r.test_accuracy for r in history]),
    ]
    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    for axis, (name, values) in zip(axes.flat, panels, strict=True):
        axis.plot(epochs, values, marker="o")
        axis.set_title(name)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)


def plot_digits(pixels: np.ndarray, captions: list[str], path: Path, title: str) -> None:
    """A grid of uint8 digit images (N, 28, 28), each with its caption."""
    count = len(pixels)
    columns = min(8, max(count, 1))
    rows = max(1, -(-count // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows + 0.6), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, caption in zip(axes.flat, pixels, captions, strict=False):  # spare axes stay blank
        axis.imshow(image, cmap="gray_r", vmin=0, vmax=255)
        axis.set_title(caption, fontsize=9)
    figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
