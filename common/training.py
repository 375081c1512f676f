"""The training driver both CLIs run: data, epochs, evaluation, artefacts, checkpoints, resume.

A framework plugs in through `Framework` (how to build a trainer, how to read its checkpoint)
and `Trainer` (one epoch, predictions, (de)serialised state). Everything a user sees and every
file a run writes is produced here, once, so the two frameworks behave and report alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from common import cli
from common.batching import EpochPlan, plan_epoch
from common.errors import CheckpointError, UserFacingError
from common.files import atomic_write_bytes, write_json
from common.metrics import EpochRecord, evaluate_log_probs, write_metrics
from common.mnist import Mnist, load_mnist, resolve_data_dir
from common.plots import plot_curves, plot_digits
from common.progress import EpochProgress
from common.recipes import DEFAULT_RECIPE, Recipe, get_recipe, recipe_from_dict
from common.transforms import normalize

CHECKPOINT_FORMAT = 1
GRID_IMAGES = 32


class Trainer(Protocol):
    """One framework's model, optimiser and schedule, driven epoch by epoch."""

    def describe(self) -> dict[str, Any]:
        """Framework, version, device and thread facts recorded in config.json."""

    def learning_rate(self) -> float:
        """The learning rate the next training step will use."""

    def train_epoch(
        self, plan: EpochPlan, images: np.ndarray, labels: np.ndarray, progress: EpochProgress
    ) -> None:
        """Train on every batch of `plan` (uint8 `images`), reporting each to `progress`."""

    def compile_seconds(self) -> float:
        """Seconds spent compiling so far (0 for eager execution)."""

    def predict(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        """Eval-mode log-probabilities (N, 10) float32 of normalised images (N, 28, 28)."""

    def checkpoint_bytes(self, meta: dict) -> bytes:
        """The whole training state plus `meta` (JSON-ready), in a format safe to load."""

    def restore(self, state: Any) -> None:
        """Continue from a state returned by `Framework.read_checkpoint`."""

    def model_bytes(self) -> bytes:
        """The weights alone, for --save-model."""

    def load_weights(self, weights: Any) -> None:
        """Replace the weights by those `Framework.read_weights` returned (for evaluation)."""


@dataclass(frozen=True)
class TrainerConfig:
    """What a framework needs to build its model, optimiser and schedule."""

    recipe: Recipe
    seed: int
    device: str  # --device: auto, cpu or gpu
    threads: int | None
    steps_per_epoch: int  # per-step schedules (optax) need it to express per-epoch ones


@dataclass(frozen=True)
class Framework:
    """How the driver reaches one framework."""

    name: str  # "torch" or "jax": used in file and directory names
    title: str  # "PyTorch" or "JAX"
    module: str  # the CLI module, for --help and messages
    checkpoint_name: str
    model_name: str
    create_trainer: Callable[[TrainerConfig], Trainer]
    read_checkpoint: Callable[[Path], tuple[dict, Any]]  # -> (meta, state), CheckpointError if bad
    read_weights: Callable[[Path], Any]  # checkpoint or model file -> weights for Trainer.load_weights


@dataclass(frozen=True)
class RunSettings:
    """A run's recipe and options after flags, defaults and any resumed checkpoint are merged."""

    recipe: Recipe
    seed: int
    test_batch_size: int
    data_dir: Path
    out: Path
    dry_run: bool
    device: str
    threads: int | None
    save_model: bool

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.update(recipe=self.recipe.to_dict(), data_dir=str(self.data_dir), out=str(self.out))
        return data


def main(framework: Framework, argv: list[str] | None = None) -> int:
    """Entry point of `python -m <framework>.train`; returns the process exit status."""
    args = cli.build_parser(framework.title, framework.module).parse_args(argv)
    try:
        train_from_args(framework, args)
    except UserFacingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the checkpoint of the last completed epoch is intact; continue with "
              "--resume <run directory>.", file=sys.stderr)
        return 130
    return 0


def train_from_args(framework: Framework, args: argparse.Namespace) -> list[EpochRecord]:
    """Resolve the settings, then train; returns the full metrics history."""
    resumed = framework.read_checkpoint(_checkpoint_path(framework, args.resume)) if args.resume else None
    settings = _settings(framework, args, resumed[0] if resumed else None)
    return run(framework, settings, resumed)


def run(framework: Framework, settings: RunSettings, resumed: tuple[dict, Any] | None = None) -> list[EpochRecord]:
    """Train `settings.recipe`, writing every artefact into `settings.out`."""
    recipe, out = settings.recipe, settings.out
    data = load_mnist(settings.data_dir)
    test_count = cli.DRY_RUN_TEST_IMAGES if settings.dry_run else len(data.test_labels)
    test_inputs = normalize(data.test_images[:test_count])
    test_labels = data.test_labels[:test_count]
    epochs = min(recipe.epochs, cli.DRY_RUN_EPOCHS) if settings.dry_run else recipe.epochs

    steps_per_epoch = len(_epoch_plan(settings, data, 1).batch_slices())
    trainer = framework.create_trainer(
        TrainerConfig(recipe, settings.seed, settings.device, settings.threads, steps_per_epoch)
    )
    history: list[EpochRecord] = []
    if resumed:
        meta, state = resumed
        trainer.restore(state)
        history = [EpochRecord(**record) for record in meta["history"]]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {**settings.to_dict(), "framework": trainer.describe(),
                                     "command": sys.argv})
    _announce(framework, settings, trainer, len(history), epochs)

    evaluation = None
    for epoch in range(len(history) + 1, epochs + 1):
        plan = _epoch_plan(settings, data, epoch)
        if epoch == 1:
            _plot_samples(plan, data, out / "samples.png")
        lr, compiled_before = trainer.learning_rate(), trainer.compile_seconds()
        progress = EpochProgress(epoch, epochs, len(plan.order), enabled=sys.stderr.isatty())
        started = time.perf_counter()
        trainer.train_epoch(plan, data.train_images, data.train_labels, progress)
        epoch_seconds = time.perf_counter() - started
        progress.close()

        started = time.perf_counter()
        evaluation = evaluate_log_probs(trainer.predict(test_inputs, settings.test_batch_size), test_labels)
        eval_seconds = time.perf_counter() - started
        record = EpochRecord(epoch, lr, progress.loss, progress.accuracy, evaluation.loss, evaluation.accuracy,
                             epoch_seconds, eval_seconds, trainer.compile_seconds() - compiled_before)
        history.append(record)
        meta = {"format": CHECKPOINT_FORMAT, "framework": framework.name, "epoch": epoch,
                "settings": settings.to_dict(), "history": [dataclasses.asdict(r) for r in history]}
        atomic_write_bytes(out / framework.checkpoint_name, trainer.checkpoint_bytes(meta))
        write_metrics(out / "metrics.jsonl", history)
        plot_curves(history, out / "curves.png", f"{framework.title}, recipe {recipe.name}, seed {settings.seed}")
        _print_epoch(record, evaluation.correct, len(test_labels))

    if evaluation is None:  # resumed a run that had already finished: evaluate it again
        evaluation = evaluate_log_probs(trainer.predict(test_inputs, settings.test_batch_size), test_labels)
    _plot_misclassified(data.test_images[:test_count], test_labels, evaluation.predictions,
                        out / "misclassified.png")
    if settings.save_model:
        atomic_write_bytes(out / framework.model_name, trainer.model_bytes())
    print(f"final test accuracy {evaluation.accuracy:.2f}% ({evaluation.correct}/{len(test_labels)}) "
          f"after epoch {len(history)}; artefacts in {out}")
    return history


def _epoch_plan(settings: RunSettings, data: Mnist, epoch: int) -> EpochPlan:
    recipe = settings.recipe
    plan = plan_epoch(settings.seed, epoch, len(data.train_labels), recipe.batch_size, recipe.augmentation)
    if settings.dry_run:
        plan = plan.head(cli.DRY_RUN_TRAIN_BATCHES * recipe.batch_size)
    return plan


def _settings(framework: Framework, args: argparse.Namespace, resumed_meta: dict | None) -> RunSettings:
    """Merge flags with the recipe, or with the checkpoint's settings when resuming."""
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "momentum": args.momentum}
    common = {"test_batch_size": args.test_batch_size, "dry_run": args.dry_run, "device": args.device,
              "threads": args.threads, "save_model": args.save_model,
              "data_dir": resolve_data_dir(args.data_dir)}
    if resumed_meta is None:
        recipe = get_recipe(args.recipe or DEFAULT_RECIPE).with_overrides(**overrides)
        seed = args.seed if args.seed is not None else 0
        out = Path(args.out) if args.out else _default_out(framework, recipe, seed, args.dry_run)
        if (out / framework.checkpoint_name).exists():
            raise UserFacingError(
                f"{out} already holds a checkpoint; continue it with --resume {out}, or choose "
                "another --out (nothing was overwritten)."
            )
        return RunSettings(recipe=recipe, seed=seed, out=out, **common)

    saved = resumed_meta["settings"]
    recipe = recipe_from_dict(saved["recipe"])
    requested = {"recipe": args.recipe, "seed": args.seed, **overrides}
    current = {"recipe": recipe.name, "seed": saved["seed"], **{k: getattr(recipe, k) for k in overrides}}
    conflicts = [f"--{k.replace('_', '-')} {v} (checkpoint: {current[k]})"
                 for k, v in requested.items() if v is not None and v != current[k]]
    if conflicts:
        raise UserFacingError(
            "a resumed run keeps the recipe and seed it started with, but these flags differ: "
            + ", ".join(conflicts) + ". Drop them, or start a new run without --resume."
        )
    out = Path(args.out) if args.out else Path(_checkpoint_path(framework, args.resume)).parent
    return RunSettings(recipe=recipe, seed=saved["seed"], out=out, **common)


def _checkpoint_path(framework: Framework, resume: str) -> Path:
    path = Path(resume)
    if path.is_dir():
        path = path / framework.checkpoint_name
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no {framework.title} checkpoint at {path}.")
    return path


def _default_out(framework: Framework, recipe: Recipe, seed: int, dry_run: bool) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    suffix = "-dry-run" if dry_run else ""
    return Path("runs") / f"{framework.name}-{recipe.name}-seed{seed}-{stamp}{suffix}"


def _announce(framework: Framework, settings: RunSettings, trainer: Trainer, done: int, epochs: int) -> None:
    recipe = settings.recipe
    facts = ", ".join(f"{k} {v}" for k, v in trainer.describe().items())
    start = f"resuming after epoch {done}" if done else "starting"
    print(f"{framework.title} ({facts}): recipe {recipe.name}, {epochs} epochs, batch {recipe.batch_size}, "
          f"lr {recipe.lr}, momentum {recipe.momentum}, seed {settings.seed}; {start}; run directory {settings.out}")


def _print_epoch(record: EpochRecord, correct: int, total: int) -> None:
    compiling = f" (incl. {record.compile_seconds:.1f} s compiling)" if record.compile_seconds else ""
    tqdm.write(
        f"epoch {record.epoch:2d}  lr {record.lr:.5f}  train loss {record.train_loss:.4f} "
        f"acc {record.train_accuracy:.2f}%  |  Test set: average loss {record.test_loss:.4f}, "
        f"accuracy {correct}/{total} ({record.test_accuracy:.2f}%)  |  {record.epoch_seconds:.1f} s train, "
        f"{record.eval_seconds:.1f} s test{compiling}"
    )


def _plot_samples(plan: EpochPlan, data: Mnist, path: Path) -> None:
    positions = slice(0, min(GRID_IMAGES, len(plan.order)))
    pixels = plan.augmented_pixels(data.train_images, positions)
    labels = data.train_labels[plan.order[positions]]
    plot_digits(pixels, [f"label {y}" for y in labels], path, "Augmented training images (epoch 1)")


def _plot_misclassified(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, path: Path) -> None:
    wrong = np.flatnonzero(predictions != labels)[:GRID_IMAGES]
    captions = [f"true {labels[i]}, pred {predictions[i]}" for i in wrong]
    plot_digits(images[wrong], captions, path, f"Misclassified test images (first {len(wrong)})")
