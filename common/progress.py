"""The per-epoch progress bar, with running loss and accuracy, shared by both trainers.

It is also where a diverging run is caught: every update checks that the loss is finite, so a
NaN stops training before a bad state can be checkpointed.
"""

from __future__ import annotations

import math

from tqdm import tqdm

from common.errors import TrainingDivergedError


class EpochProgress:
    """Accumulates an epoch's training loss and accuracy while drawing a tqdm bar."""

    def __init__(self, epoch: int, epochs: int, total_images: int, enabled: bool = True):
        self.epoch = epoch
        self.images = 0
        self.loss_sum = 0.0
        self.correct = 0
        self._bar = tqdm(
            total=total_images,
            desc=f"epoch {epoch}/{epochs}",
            unit="img",
            unit_scale=True,
            leave=False,
            dynamic_ncols=True,
            disable=not enabled,
        )

    def update(self, images: int, loss_sum: float, correct: int) -> None:
        """Record `images` more examples whose summed loss and correct count are given."""
        if not math.isfinite(loss_sum):
            self.close()
            raise TrainingDivergedError(
                f"the training loss became {loss_sum / images} in epoch {self.epoch} after "
                f"{self.images + images} images. Training stopped; the checkpoint of the last "
                "completed epoch is untouched. Lower --lr (or check the recipe) and start again."
            )
        self.images += images
        self.loss_sum += loss_sum
        self.correct += correct
        self._bar.update(images)
        self._bar.set_postfix(loss=f"{self.loss:.4f}", acc=f"{self.accuracy:.2f}%", refresh=False)

    @property
    def loss(self) -> float:
        """Mean training loss so far this epoch."""
        return self.loss_sum / max(self.images, 1)

    @property
    def accuracy(self) -> float:
        """Training accuracy (%) so far this epoch."""
        return 100.0 * self.correct / max(self.images, 1)

    def close(self) -> None:
        """Remove the bar (the epoch's summary line replaces it)."""
        self._bar.close()
