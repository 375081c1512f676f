"""The run's pictures: the seed notebook's 2x2 training curves and grids of digits.

Figures are built with matplotlib's `Figure` directly, not pyplot: nothing selects a backend
or opens a window, so importing this module leaves the caller's matplotlib as it was (a
notebook keeps its inline backend) and plotting works on machines without a display.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from common.files import atomic_write_bytes
from common.metrics import EpochRecord


def plot_curves(history: list[EpochRecord], path: Path, title: str) -> None:
    """Train/test loss and accuracy against epoch, laid out as in the seed notebook."""
    epochs = [record.epoch for record in history]
    panels = [
        ("Training Loss", [r.train_loss for r in history]),
        ("Training Accuracy (%)", [r.train_accuracy for r in history]),
        ("Test Loss", [r.test_loss for r in history]),
        ("Test Accuracy (%)", [r.test_accuracy for r in history]),
    ]
    figure = Figure(figsize=(12, 8))
    axes = figure.subplots(2, 2)
    for axis, (name, values) in zip(axes.flat, panels, strict=True):
        axis.plot(epochs, values, marker="o")
        axis.set_title(name)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)


def plot_runs(histories: list[list[EpochRecord]], labels: list[str], path: Path, title: str) -> None:
    """Test accuracy and loss of several runs against epoch, one line each and one colour per
    framework (the first word of the label), so seeds and frameworks can be compared at once."""
    frameworks = sorted({label.split()[0] for label in labels})
    colours = {name: f"C{index}" for index, name in enumerate(frameworks)}
    figure = Figure(figsize=(13, 5))
    axes = figure.subplots(1, 2)
    for history, label in zip(histories, labels, strict=True):
        epochs = [record.epoch for record in history]
        style = {"color": colours[label.split()[0]], "alpha": 0.8, "marker": ".", "label": label}
        axes[0].plot(epochs, [r.test_accuracy for r in history], **style)
        axes[1].plot(epochs, [r.test_loss for r in history], **style)
    lowest = min(min(r.test_accuracy for r in h[len(h) // 3:]) for h in histories)
    axes[0].set_ylim(max(lowest - 0.2, 90.0), 100.0)  # the last two thirds of training, in detail
    for axis, name in zip(axes, ("Test Accuracy (%)", "Test Loss"), strict=True):
        axis.set_title(name)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=8, ncol=2)
    figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)


def plot_digits(pixels: np.ndarray, captions: list[str], path: Path, title: str) -> None:
    """A grid of uint8 digit images (N, 28, 28), each with its caption."""
    count = len(pixels)
    columns = min(8, max(count, 1))
    rows = max(1, -(-count // columns))
    figure = Figure(figsize=(1.6 * columns, 1.8 * rows + 0.6))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, caption in zip(axes.flat, pixels, captions, strict=False):  # spare axes stay blank
        axis.imshow(image, cmap="gray_r", vmin=0, vmax=255)
        axis.set_title(caption, fontsize=9)
    figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)


def _save(figure: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())
