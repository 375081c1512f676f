"""The steps of a training run both trainers take, as functions their `train.py` calls in order:
the data, the evaluation set, each epoch's plan and progress bar, the opening line, the summary
of several seeds, and the exit status of an error. The loop itself is each trainer's own."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import numpy as np

from common import cli
from common.batching import EpochPlan, plan_epoch
from common.errors import UserFacingError
from common.files import write_json
from common.metrics import EpochRecord
from common.mnist import Mnist, validation_split
from common.processes import Processes
from common.progress import EpochProgress
from common.report import markdown_report
from common.run_log import EvaluationSet
from common.settings import FrameworkNames, RunSettings, refuse_to_overwrite
from common.sources import load_source
from common.transforms import normalize


def load_data(settings: RunSettings, processes: Processes) -> Mnist:
    """The training and evaluation images; process 0 first, so that only it downloads missing files
    (or prepares tfds's copy)."""
    if not processes.is_main:
        processes.barrier()
    data = load_source(settings.data_source, settings.data_dir)
    if processes.is_main:
        processes.barrier()
    data = validation_split(data) if settings.validation else data
    if settings.recipe.batch_size > len(data.train_labels):
        raise UserFacingError(f"--batch-size {settings.recipe.batch_size} is larger than the "
                              f"{len(data.train_labels):,} training images; choose at most that many.")
    return data


def evaluation_set(settings: RunSettings, data: Mnist) -> EvaluationSet:
    """What every epoch is evaluated on: the test set, or the validation split (a dry run: its head)."""
    count = cli.DRY_RUN_TEST_IMAGES if settings.dry_run else len(data.test_labels)
    pixels = data.test_images[:count]
    return EvaluationSet("Validation" if settings.validation else "Test", pixels, normalize(pixels),
                         data.test_labels[:count])


def epoch_count(settings: RunSettings) -> int:
    """The recipe's epochs, or a dry run's few."""
    return min(settings.recipe.epochs, cli.DRY_RUN_EPOCHS) if settings.dry_run else settings.recipe.epochs


def epoch_plan(settings: RunSettings, data: Mnist, epoch: int) -> EpochPlan:
    """The seed's order, batches and augmentation draws of `epoch` (a dry run: its first batches)."""
    recipe = settings.recipe
    plan = plan_epoch(settings.seed, epoch, len(data.train_labels), recipe.batch_size, recipe.augmentation)
    if settings.dry_run:
        plan = plan.head(cli.DRY_RUN_TRAIN_BATCHES * recipe.batch_size)
    return plan


def epoch_progress(epoch: int, epochs: int, plan: EpochPlan, shown: bool) -> EpochProgress:
    """The epoch's running loss and accuracy; its bar is drawn when `shown` and on a terminal only."""
    return EpochProgress(epoch, epochs, len(plan.order), enabled=shown and sys.stderr.isatty())


def announce(names: FrameworkNames, settings: RunSettings, facts: dict, done: int, epochs: int,
             seeds: tuple[int, ...] = ()) -> None:
    """The run's opening line: framework facts, recipe, seeds and where its files go."""
    recipe = settings.recipe
    described = ", ".join(f"{k} {v}" for k, v in facts.items())
    start = f"resuming after epoch {done}" if done else "starting"
    seed_list = f"seeds {', '.join(map(str, seeds))}" if seeds else f"seed {settings.seed}"
    evaluated = "; evaluated on the validation split" if settings.validation else ""
    print(f"{names.title} ({described}): recipe {recipe.name}, {epochs} epochs, batch {recipe.batch_size}, "
          f"lr {recipe.lr}, momentum {recipe.momentum}, {seed_list}{evaluated}; {start}; run directory {settings.out}")


def seed_runs(settings: RunSettings, seeds: tuple[int, ...], processes: Processes) -> list[RunSettings]:
    """Each seed's settings, its run directory <out>/seed<S>, checked before any is written."""
    runs = [dataclasses.replace(settings, seed=seed, out=settings.out / f"seed{seed}") for seed in seeds]
    if processes.is_main:
        for run in runs:
            refuse_to_overwrite(run.out)
    return runs


def train_in_turn(settings: RunSettings, seeds: tuple[int, ...], processes: Processes,
                  train: Callable[[RunSettings, Processes], list[EpochRecord]]) -> list[list[EpochRecord]]:
    """`train` each seed's run in turn into <out>/seed<S>, then write their summary: each seed
    follows the run of its seed alone because it is one."""
    histories = [train(run, processes) for run in seed_runs(settings, seeds, processes)]
    if processes.is_main:
        write_seeds_summary(settings, seeds, histories)
    return histories


def write_seeds_summary(settings: RunSettings, seeds: tuple[int, ...], histories: list[list[EpochRecord]]) -> None:
    """summary.md and summary.json of the seeds trained into <out>/seed<S>, and the table printed."""
    summary = markdown_report([settings.out / f"seed{seed}" for seed in seeds])
    (settings.out / "summary.md").write_text(summary + "\n")
    finals = [history[-1].test_accuracy for history in histories]
    write_json(settings.out / "summary.json", {
        "seeds": list(seeds), "final_accuracy": finals, "mean": float(np.mean(finals)),
        "std": float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0, "min": min(finals), "max": max(finals),
        "evaluated_on": "validation" if settings.validation else "test", "recipe": settings.recipe.to_dict(),
    })
    print(summary)


def error_status(error: UserFacingError, processes: Processes) -> int:
    """Print a user's error (which process, in a run of several) and return the exit status 2."""
    rank = f"[process {processes.index}] " if processes.count > 1 else ""
    print(f"{rank}error: {error}", file=sys.stderr)
    return 2


def interrupted_status() -> int:
    """Ctrl-C: say what survives, and return the shell's status for an interrupt."""
    print("\ninterrupted: the checkpoint of the last completed epoch is intact; continue with "
          "--resume <run directory>.", file=sys.stderr)
    return 130
