"""The training driver both CLIs run: settings, data, the epoch loop, evaluation, artefacts.

    main -> train_from_args -> train (one group of seeds) -> RunLog (each seed's files)

A framework plugs in through `common.framework` (a `Framework` record and a `SeedGroup`).
One path trains one seed or many: a run of one seed is a group of one. Everything a user sees
and every file a run writes is produced here, once, so the two frameworks behave alike.
In a run of several processes every process runs this loop on its part of each batch, and
process 0 alone prints and writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

from common import cli
from common.batching import EpochPlan, plan_epoch
from common.errors import UserFacingError
from common.files import write_json
from common.framework import SINGLE_PROCESS, Framework, Processes, SeedGroup, TrainerConfig
from common.metrics import EpochRecord, evaluate_log_probs
from common.mnist import Mnist, validation_split
from common.progress import EpochProgress
from common.report import markdown_report
from common.run_log import EvaluationSet, RunLog, refuse_non_finite
from common.settings import RunSettings, checkpoint_path, refuse_to_overwrite, settings_from_args
from common.sources import load_source
from common.transforms import normalize


def main(framework: Framework, argv: list[str] | None = None) -> int:
    """Entry point of `python -m <framework>.train`; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = cli.build_parser(framework.title, framework.module).parse_args(argv)
    processes = SINGLE_PROCESS
    try:
        launched = framework.launch_processes(args.devices, argv)
        if launched is not None:
            return launched
        processes = framework.join_processes(args.device, args.devices)
        train_from_args(framework, args, processes)
    except UserFacingError as error:
        rank = f"[process {processes.index}] " if processes.count > 1 else ""
        print(f"{rank}error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the checkpoint of the last completed epoch is intact; continue with "
              "--resume <run directory>.", file=sys.stderr)
        return 130
    return 0


def train_from_args(framework: Framework, args: argparse.Namespace,
                    processes: Processes = SINGLE_PROCESS) -> list[list[EpochRecord]]:
    """Resolve the settings, then train; returns the metrics history of every seed trained."""
    if args.seeds:
        if args.resume or args.seed is not None:
            raise UserFacingError("--seeds trains new runs: it cannot be combined with --seed or --resume "
                                  "(resume one seed's directory on its own).")
        return run_seeds(framework, settings_from_args(framework, args, None, processes.is_main), args.seeds,
                         processes)
    resumed = framework.read_checkpoint(checkpoint_path(framework, args.resume)) if args.resume else None
    settings = settings_from_args(framework, args, resumed[0] if resumed else None, processes.is_main)
    return train(framework, [settings], resumed, processes)


def run_seeds(framework: Framework, settings: RunSettings, seeds: tuple[int, ...],
              processes: Processes = SINGLE_PROCESS) -> list[list[EpochRecord]]:
    """Train every seed into <out>/seed<S> as one group, and summarise."""
    runs = [dataclasses.replace(settings, seed=seed, out=settings.out / f"seed{seed}") for seed in seeds]
    if processes.is_main:
        for run in runs:
            refuse_to_overwrite(run.out)
    histories = train(framework, runs, processes=processes)
    if not processes.is_main:
        return histories
    summary = markdown_report([run.out for run in runs])
    (settings.out / "summary.md").write_text(summary + "\n")
    finals = [history[-1].test_accuracy for history in histories]
    write_json(settings.out / "summary.json", {
        "seeds": list(seeds), "final_accuracy": finals, "mean": float(np.mean(finals)),
        "std": float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0, "min": min(finals), "max": max(finals),
        "evaluated_on": "validation" if settings.validation else "test", "recipe": settings.recipe.to_dict(),
    })
    print(summary)
    return histories


def train(framework: Framework, runs: list[RunSettings], resumed: tuple[dict, object] | None = None,
          processes: Processes = SINGLE_PROCESS) -> list[list[EpochRecord]]:
    """Train the seeds of `runs` (same recipe and options) as one group; each writes its own
    run directory. `resumed` (meta, payload) continues a group of one from its checkpoint.
    Returns each seed's history in process 0, and nothing in the others, which write nothing."""
    first = runs[0]
    recipe = first.recipe
    data = _load_data(first, processes)
    if recipe.batch_size > len(data.train_labels):
        raise UserFacingError(f"--batch-size {recipe.batch_size} is larger than the {len(data.train_labels):,} "
                              "training images; choose at most that many.")
    evaluation_set = _evaluation_set(first, data)
    epochs = min(recipe.epochs, cli.DRY_RUN_EPOCHS) if first.dry_run else recipe.epochs
    first_plan = _epoch_plan(first, data, 1)
    config = TrainerConfig(recipe, first.device, first.threads, ops=first.ops, devices=first.devices,
                           processes=processes, steps_per_epoch=len(first_plan.batch_slices()),
                           epoch_images=len(first_plan.order))
    group = framework.create_seed_group(config, [run.seed for run in runs])
    if resumed:  # before anything is written: a checkpoint that does not fit changes no file
        group.restore(0, resumed[1])
    done = len(resumed[0]["history"]) if resumed else 0
    logs = [RunLog(framework, run, group.describe(), evaluation_set) for run in runs] if processes.is_main else []
    if resumed and logs:
        logs[0].resume_history(resumed[0]["history"])
    if processes.is_main:
        _announce(framework, runs, group, done, epochs)

    evaluations = None
    for epoch in range(done + 1, epochs + 1):
        plans = [_epoch_plan(run, data, epoch) for run in runs]
        if epoch == 1 and processes.is_main:
            for log, plan in zip(logs, plans, strict=True):
                log.plot_samples(plan, data)
        lr, compiled_before = group.learning_rate(), group.compile_seconds()
        shown = processes.is_main and sys.stderr.isatty()
        progresses = [EpochProgress(epoch, epochs, len(plan.order), enabled=shown and index == 0)
                      for index, plan in enumerate(plans)]
        started = time.perf_counter()
        group.train_epoch(plans, data.train_images, data.train_labels, progresses)
        epoch_seconds = time.perf_counter() - started
        progresses[0].close()

        if recipe.averages_after(epoch):
            group.average_weights()
        recalibration_seconds = 0.0
        if recipe.recalibrates_after(epoch, epochs):
            started = time.perf_counter()
            group.recalibrate_batchnorm(normalize(data.train_images[:len(first_plan.order)]), recipe.batch_size)
            recalibration_seconds = time.perf_counter() - started

        started = time.perf_counter()
        predictions = group.predict(evaluation_set.inputs, first.test_batch_size)
        evaluations = [evaluate_log_probs(log_probs, evaluation_set.labels) for log_probs in predictions]
        eval_seconds = time.perf_counter() - started
        compile_seconds = group.compile_seconds() - compiled_before
        for index, (run, evaluation) in enumerate(zip(runs, evaluations, strict=True)):
            refuse_non_finite(run.out, epoch, evaluation_set.name, evaluation, group.is_finite(index))
        if not processes.is_main:
            continue
        for index, (log, progress, evaluation) in enumerate(zip(logs, progresses, evaluations, strict=True)):
            record = EpochRecord(epoch, lr, progress.loss, progress.accuracy, evaluation.loss, evaluation.accuracy,
                                 epoch_seconds, eval_seconds, compile_seconds, recalibration_seconds)
            log.end_epoch(record, evaluation, lambda meta, index=index: group.checkpoint_bytes(index, meta))

    if evaluations is None:  # resumed a run that had already finished: evaluate it again
        predictions = group.predict(evaluation_set.inputs, first.test_batch_size)
        evaluations = [evaluate_log_probs(log_probs, evaluation_set.labels) for log_probs in predictions]
    if not processes.is_main:
        return []
    for index, (log, evaluation) in enumerate(zip(logs, evaluations, strict=True)):
        log.finish(evaluation, group.model_bytes(index) if log.settings.save_model else None)
    return [log.history for log in logs]


def _load_data(settings: RunSettings, processes: Processes) -> Mnist:
    """The training and evaluation images; process 0 first, so that only it downloads missing files
    (or prepares tfds's copy)."""
    if not processes.is_main:
        processes.barrier()
    data = load_source(settings.data_source, settings.data_dir)
    if processes.is_main:
        processes.barrier()
    return validation_split(data) if settings.validation else data


def _evaluation_set(settings: RunSettings, data: Mnist) -> EvaluationSet:
    count = cli.DRY_RUN_TEST_IMAGES if settings.dry_run else len(data.test_labels)
    pixels = data.test_images[:count]
    return EvaluationSet("Validation" if settings.validation else "Test", pixels, normalize(pixels),
                         data.test_labels[:count])


def _epoch_plan(settings: RunSettings, data: Mnist, epoch: int) -> EpochPlan:
    recipe = settings.recipe
    plan = plan_epoch(settings.seed, epoch, len(data.train_labels), recipe.batch_size, recipe.augmentation)
    if settings.dry_run:
        plan = plan.head(cli.DRY_RUN_TRAIN_BATCHES * recipe.batch_size)
    return plan


def _announce(framework: Framework, runs: list[RunSettings], group: SeedGroup, done: int, epochs: int) -> None:
    recipe = runs[0].recipe
    facts = ", ".join(f"{k} {v}" for k, v in group.describe().items())
    start = f"resuming after epoch {done}" if done else "starting"
    seeds = ", ".join(str(run.seed) for run in runs)
    where = runs[0].out if len(runs) == 1 else runs[0].out.parent
    evaluated = "; evaluated on the validation split" if runs[0].validation else ""
    print(f"{framework.title} ({facts}): recipe {recipe.name}, {epochs} epochs, batch {recipe.batch_size}, "
          f"lr {recipe.lr}, momentum {recipe.momentum}, seed{'s' if len(runs) > 1 else ''} {seeds}{evaluated}; "
          f"{start}; run directory {where}")
