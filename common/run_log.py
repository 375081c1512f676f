"""Everything one seed's run writes into its directory, and its lines on the console.

The order is what makes a run safe to interrupt: the checkpoint first (atomically), then the
metrics and plots, then the console line; nothing of an epoch whose state or loss is not
finite is written at all.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.batching import EpochPlan
from common.claims import DirectoryClaim
from common.errors import TrainingDivergedError
from common.files import atomic_write_bytes, write_json
from common.metrics import EpochRecord, Evaluation, write_metrics
from common.mnist import Mnist
from common.plots import plot_curves, plot_digits
from common.settings import FrameworkNames, RunSettings, refuse_to_overwrite
from common.system import machine_facts

GRID_IMAGES = 32


@dataclass(frozen=True)
class EvaluationSet:
    """The images every epoch is evaluated on: the test set, or the validation split."""

    name: str  # "Test" or "Validation"
    pixels: np.ndarray  # uint8, for the misclassified grid
    inputs: np.ndarray  # normalised
    labels: np.ndarray


def refuse_non_finite(out: Path, epoch: int, evaluated_on: str, evaluation: Evaluation, state_is_finite: bool) -> None:
    """Stop before anything of a diverged epoch is written: checkpoint, metrics and plots keep
    the last good epoch. Every process of a run checks, so that all of them stop together."""
    if state_is_finite and np.isfinite(evaluation.loss):
        return
    what = "weights or BatchNorm statistics are" if not state_is_finite else f"{evaluated_on.lower()} loss is"
    raise TrainingDivergedError(
        f"{out}: after epoch {epoch} the {what} no longer finite. Training stopped "
        f"and nothing of epoch {epoch} was saved; the checkpoint and metrics of the last completed epoch "
        "are untouched. Lower --lr (or check the recipe) and start again."
    )


class RunLog:
    """One seed's run directory: config.json, checkpoint, metrics.jsonl, plots, model file."""

    def __init__(self, framework: FrameworkNames, settings: RunSettings, facts: dict, evaluation_set: EvaluationSet,
                 resumed_history: list[dict] | None = None):
        """Claim the run directory (no other run may write there while this one does), then write
        config.json; a resumed run's metrics are rewritten from its checkpoint's `resumed_history`."""
        self.framework, self.settings, self.evaluation_set = framework, settings, evaluation_set
        self.devices = facts["devices"]
        self.history: list[EpochRecord] = []
        self._claim = DirectoryClaim(settings.out)
        if resumed_history is None:  # checked again now that the directory is ours: a run may have finished there
            refuse_to_overwrite(settings.out)
        write_json(settings.out / "config.json", {**settings.to_dict(), "framework": facts, "machine": machine_facts(),
                                                  "command": sys.argv})
        if resumed_history is not None:
            self._resume_history(resumed_history)

    def _resume_history(self, history: list[dict]) -> None:
        """The checkpoint is the truth: a run killed between its two writes may have lost the
        metrics line of the checkpointed epoch, so metrics.jsonl is rewritten."""
        self.history = [EpochRecord(**record) for record in history]
        write_metrics(self.settings.out / "metrics.jsonl", self.history)

    def plot_samples(self, plan: EpochPlan, data: Mnist) -> None:
        positions = slice(0, min(GRID_IMAGES, len(plan.order)))
        pixels = plan.augmented_pixels(data.train_images, positions)
        labels = data.train_labels[plan.order[positions]]
        plot_digits(pixels, [f"label {y}" for y in labels], self.settings.out / "samples.png",
                    "Augmented training images (epoch 1)")

    def end_epoch(self, record: EpochRecord, evaluation: Evaluation, checkpoint: Callable[[dict], bytes]) -> None:
        """Checkpoint first (atomically), then metrics and plots, then the console line."""
        self.history.append(record)
        meta = {"framework": self.framework.name, "epoch": record.epoch, "devices": self.devices,
                "settings": self.settings.to_dict(), "history": [dataclasses.asdict(r) for r in self.history]}
        out = self.settings.out
        atomic_write_bytes(out / self.framework.checkpoint_name, checkpoint(meta))
        write_metrics(out / "metrics.jsonl", self.history)
        plot_curves(self.history, out / "curves.png",
                    f"{self.framework.title}, recipe {self.settings.recipe.name}, seed {self.settings.seed}")
        compiling = f" (incl. {record.compile_seconds:.1f} s compiling)" if record.compile_seconds else ""
        tqdm.write(
            f"{self._prefix()}epoch {record.epoch:2d}  lr {record.lr:.5f}  train loss {record.train_loss:.4f} "
            f"acc {record.train_accuracy:.2f}%  |  {self.evaluation_set.name} set: average loss "
            f"{record.test_loss:.4f}, accuracy {evaluation.correct}/{len(self.evaluation_set.labels)} "
            f"({record.test_accuracy:.2f}%)  |  {record.epoch_seconds:.1f} s train, "
            f"{record.eval_seconds:.1f} s {self.evaluation_set.name.lower()}{compiling}"
        )

    def finish(self, evaluation: Evaluation, model: bytes | None) -> None:
        """The misclassified grid, the --save-model file and the final line."""
        out, labels = self.settings.out, self.evaluation_set.labels
        wrong = np.flatnonzero(evaluation.predictions != labels)[:GRID_IMAGES]
        plot_digits(self.evaluation_set.pixels[wrong],
                    [f"true {labels[i]}, pred {evaluation.predictions[i]}" for i in wrong],
                    out / "misclassified.png",
                    f"Misclassified {self.evaluation_set.name.lower()} images (first {len(wrong)})")
        if model is not None:
            atomic_write_bytes(out / self.framework.model_name, model)
        print(f"{self._prefix()}final {self.evaluation_set.name.lower()} accuracy {evaluation.accuracy:.2f}% "
              f"({evaluation.correct}/{len(labels)}) after epoch {len(self.history)}; artefacts in {out}")
        self._claim.release()

    def _prefix(self) -> str:
        return f"[seed {self.settings.seed}] " if self.settings.out.name == f"seed{self.settings.seed}" else ""
