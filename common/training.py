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
from common.errors import CheckpointError, TrainingDivergedError, UserFacingError
from common.files import atomic_write_bytes, write_json
from common.metrics import EpochRecord, Evaluation, evaluate_log_probs, write_metrics
from common.mnist import Mnist, load_mnist, resolve_data_dir, validation_split
from common.plots import plot_curves, plot_digits
from common.progress import EpochProgress
from common.recipes import DEFAULT_RECIPE, Recipe, get_recipe, recipe_from_dict
from common.report import markdown_report
from common.transforms import normalize

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

    def state_is_finite(self) -> bool:
        """Whether every weight and BatchNorm statistic is a finite number (checked before saving)."""


@dataclass(frozen=True)
class TrainerConfig:
    """What a framework needs to build its model, optimiser and schedule."""

    recipe: Recipe
    seed: int
    device: str  # --device: auto, cpu or gpu
    threads: int | None
    steps_per_epoch: int  # per-step schedules (optax) need it to express per-epoch ones
    ops: str = "auto"  # --ops: auto, plain or fast; each framework resolves auto for its device


class SeedGroupTrainer(Protocol):
    """Several seeds of one recipe trained together (one compiled program in JAX). Seed i's
    `plans[i]`, `progresses[i]` and predictions[i] are those a single run of seed i would have."""

    def describe(self) -> dict[str, Any]: ...

    def learning_rate(self) -> float: ...

    def compile_seconds(self) -> float: ...

    def train_epoch(self, plans: list[EpochPlan], images: np.ndarray, labels: np.ndarray,
                    progresses: list[EpochProgress]) -> None: ...

    def predict(self, images: np.ndarray, batch_size: int) -> list[np.ndarray]: ...

    def checkpoint_bytes(self, meta: dict, index: int) -> bytes:
        """Seed `index`'s state as a single run's checkpoint, so it can be resumed or evaluated alone."""

    def model_bytes(self, index: int) -> bytes: ...

    def state_is_finite(self, index: int) -> bool: ...


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
    # --seeds in one program, if the framework can (JAX: vmap); otherwise seeds run one by one.
    create_seed_group: Callable[[TrainerConfig, list[int]], SeedGroupTrainer] | None = None


class _SingleSeed:
    """A Trainer seen as a group of one, so that one epoch loop serves both cases."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def describe(self) -> dict[str, Any]:
        return self.trainer.describe()

    def learning_rate(self) -> float:
        return self.trainer.learning_rate()

    def compile_seconds(self) -> float:
        return self.trainer.compile_seconds()

    def train_epoch(self, plans, images, labels, progresses) -> None:
        self.trainer.train_epoch(plans[0], images, labels, progresses[0])

    def predict(self, images: np.ndarray, batch_size: int) -> list[np.ndarray]:
        return [self.trainer.predict(images, batch_size)]

    def checkpoint_bytes(self, meta: dict, index: int) -> bytes:
        return self.trainer.checkpoint_bytes(meta)

    def model_bytes(self, index: int) -> bytes:
        return self.trainer.model_bytes()

    def state_is_finite(self, index: int) -> bool:
        return self.trainer.state_is_finite()


@dataclass(frozen=True)
class RunSettings:
    """A run's recipe and options after flags, defaults and any resumed checkpoint are merged."""

    recipe: Recipe
    seed: int
    test_batch_size: int
    data_dir: Path
    out: Path
    dry_run: bool
    validation: bool
    device: str
    ops: str
    threads: int | None
    save_model: bool

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.update(recipe=self.recipe.to_dict(), data_dir=str(self.data_dir), out=str(self.out))
        return data


@dataclass(frozen=True)
class EvaluationSet:
    """The images every epoch is evaluated on: the test set, or the validation split."""

    name: str  # "Test" or "Validation"
    pixels: np.ndarray  # uint8, for the misclassified grid
    inputs: np.ndarray  # normalised
    labels: np.ndarray


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


def train_from_args(framework: Framework, args: argparse.Namespace) -> list[list[EpochRecord]]:
    """Resolve the settings, then train; returns the metrics history of every seed trained."""
    if args.seeds:
        if args.resume or args.seed is not None:
            raise UserFacingError("--seeds trains new runs: it cannot be combined with --seed or --resume "
                                  "(resume one seed's directory on its own).")
        return run_seeds(framework, _settings(framework, args, None), args.seeds)
    resumed = framework.read_checkpoint(_checkpoint_path(framework, args.resume)) if args.resume else None
    settings = _settings(framework, args, resumed[0] if resumed else None)
    return train(framework, [settings], resumed)


def run_seeds(framework: Framework, settings: RunSettings, seeds: tuple[int, ...]) -> list[list[EpochRecord]]:
    """Train every seed into <out>/seed<S>, together if the framework can, and summarise."""
    runs = [dataclasses.replace(settings, seed=seed, out=settings.out / f"seed{seed}") for seed in seeds]
    for run in runs:
        _refuse_to_overwrite(framework, run.out)
    if framework.create_seed_group:
        histories = train(framework, runs)
    else:
        histories = [train(framework, [run])[0] for run in runs]
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


def train(framework: Framework, runs: list[RunSettings],
          resumed: tuple[dict, Any] | None = None) -> list[list[EpochRecord]]:
    """Train the seeds of `runs` (same recipe and options) together; each writes its own run
    directory. One run is the ordinary case; several need `framework.create_seed_group`."""
    first = runs[0]
    recipe = first.recipe
    data = load_mnist(first.data_dir)
    if first.validation:
        data = validation_split(data)
    if recipe.batch_size > len(data.train_labels):
        raise UserFacingError(f"--batch-size {recipe.batch_size} is larger than the {len(data.train_labels):,} "
                              "training images; choose at most that many.")
    evaluation_set = _evaluation_set(first, data)
    epochs = min(recipe.epochs, cli.DRY_RUN_EPOCHS) if first.dry_run else recipe.epochs
    config = TrainerConfig(recipe, first.seed, first.device, first.threads,
                           steps_per_epoch=len(_epoch_plan(first, data, 1).batch_slices()), ops=first.ops)
    if len(runs) == 1:
        single = framework.create_trainer(config)
        if resumed:
            single.restore(resumed[1])
        trainer: SeedGroupTrainer = _SingleSeed(single)
    else:
        trainer = framework.create_seed_group(config, [run.seed for run in runs])
    logs = [RunLog(framework, run, trainer.describe(), evaluation_set) for run in runs]
    if resumed:
        logs[0].history = [EpochRecord(**record) for record in resumed[0]["history"]]
        # The checkpoint is the truth: a run killed between its two writes may have lost the
        # metrics line of the checkpointed epoch.
        write_metrics(first.out / "metrics.jsonl", logs[0].history)
    _announce(framework, runs, trainer, len(logs[0].history), epochs)

    evaluations = None
    for epoch in range(len(logs[0].history) + 1, epochs + 1):
        plans = [_epoch_plan(run, data, epoch) for run in runs]
        if epoch == 1:
            for log, plan in zip(logs, plans, strict=True):
                log.plot_samples(plan, data)
        lr, compiled_before = trainer.learning_rate(), trainer.compile_seconds()
        progresses = [EpochProgress(epoch, epochs, len(plan.order), enabled=index == 0 and sys.stderr.isatty())
                      for index, plan in enumerate(plans)]
        started = time.perf_counter()
        trainer.train_epoch(plans, data.train_images, data.train_labels, progresses)
        epoch_seconds = time.perf_counter() - started
        progresses[0].close()

        started = time.perf_counter()
        predictions = trainer.predict(evaluation_set.inputs, first.test_batch_size)
        evaluations = [evaluate_log_probs(log_probs, evaluation_set.labels) for log_probs in predictions]
        eval_seconds = time.perf_counter() - started
        compile_seconds = trainer.compile_seconds() - compiled_before
        for index, (log, evaluation) in enumerate(zip(logs, evaluations, strict=True)):
            _refuse_non_finite(log, epoch, evaluation, trainer.state_is_finite(index))
        for index, (log, progress, evaluation) in enumerate(zip(logs, progresses, evaluations, strict=True)):
            record = EpochRecord(epoch, lr, progress.loss, progress.accuracy, evaluation.loss, evaluation.accuracy,
                                 epoch_seconds, eval_seconds, compile_seconds)
            log.end_epoch(record, evaluation, lambda meta, index=index: trainer.checkpoint_bytes(meta, index))

    if evaluations is None:  # resumed a run that had already finished: evaluate it again
        predictions = trainer.predict(evaluation_set.inputs, first.test_batch_size)
        evaluations = [evaluate_log_probs(log_probs, evaluation_set.labels) for log_probs in predictions]
    for index, (log, evaluation) in enumerate(zip(logs, evaluations, strict=True)):
        log.finish(evaluation, trainer.model_bytes(index) if log.settings.save_model else None)
    return [log.history for log in logs]


class RunLog:
    """Everything one seed's run writes into its directory, and its lines on the console."""

    def __init__(self, framework: Framework, settings: RunSettings, facts: dict, evaluation_set: EvaluationSet):
        self.framework, self.settings, self.evaluation_set = framework, settings, evaluation_set
        self.history: list[EpochRecord] = []
        settings.out.mkdir(parents=True, exist_ok=True)
        write_json(settings.out / "config.json", {**settings.to_dict(), "framework": facts, "command": sys.argv})

    def plot_samples(self, plan: EpochPlan, data: Mnist) -> None:
        positions = slice(0, min(GRID_IMAGES, len(plan.order)))
        pixels = plan.augmented_pixels(data.train_images, positions)
        labels = data.train_labels[plan.order[positions]]
        plot_digits(pixels, [f"label {y}" for y in labels], self.settings.out / "samples.png",
                    "Augmented training images (epoch 1)")

    def end_epoch(self, record: EpochRecord, evaluation: Evaluation, checkpoint: Callable[[dict], bytes]) -> None:
        """Checkpoint first (atomically), then metrics and plots, then the console line."""
        self.history.append(record)
        meta = {"framework": self.framework.name, "epoch": record.epoch,
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

    def _prefix(self) -> str:
        return f"[seed {self.settings.seed}] " if self.settings.out.name == f"seed{self.settings.seed}" else ""


def _refuse_non_finite(log: RunLog, epoch: int, evaluation: Evaluation, state_is_finite: bool) -> None:
    """Stop before anything of a diverged epoch is written: checkpoint, metrics and plots keep
    the last good epoch."""
    if not state_is_finite or not np.isfinite(evaluation.loss):
        what = ("weights or BatchNorm statistics are" if not state_is_finite
                else f"{log.evaluation_set.name.lower()} loss is")
        raise TrainingDivergedError(
            f"{log.settings.out}: after epoch {epoch} the {what} no longer finite. Training stopped "
            f"and nothing of epoch {epoch} was saved; the checkpoint and metrics of the last completed epoch "
            "are untouched. Lower --lr (or check the recipe) and start again."
        )


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


def _settings(framework: Framework, args: argparse.Namespace, resumed_meta: dict | None) -> RunSettings:
    """Merge flags with the recipe, or with the checkpoint's settings when resuming."""
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "momentum": args.momentum}
    common = {"test_batch_size": args.test_batch_size, "dry_run": args.dry_run, "validation": args.validation,
              "device": args.device, "ops": args.ops,
              "threads": args.threads, "save_model": args.save_model,
              "data_dir": resolve_data_dir(args.data_dir)}
    if resumed_meta is None:
        recipe = get_recipe(args.recipe or DEFAULT_RECIPE).with_overrides(**overrides)
        seed = args.seed if args.seed is not None else 0
        out = Path(args.out) if args.out else _default_out(framework, recipe, args.seeds or seed, args.dry_run)
        _refuse_to_overwrite(framework, out)
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
    if args.validation and not saved["validation"]:
        raise UserFacingError("--validation: the resumed run was evaluated on the test set; start a new run.")
    if args.dry_run != saved["dry_run"]:
        was, now = ("a dry run", "without --dry-run") if saved["dry_run"] else ("a full run", "with --dry-run")
        raise UserFacingError(f"--resume: the checkpoint is from {was}, and resuming it {now} would mix "
                              "short and full epochs. Resume it as it was started, or start a new run.")
    common["validation"] = saved["validation"]
    run_dir = Path(_checkpoint_path(framework, args.resume)).parent
    out = Path(args.out) if args.out else run_dir
    if out.resolve() != run_dir.resolve():
        _refuse_to_overwrite(framework, out)
    return RunSettings(recipe=recipe, seed=saved["seed"], out=out, **common)


# What any run of either framework writes into its directory: a directory holding one of these
# belongs to a run, and only --resume may write into it again.
RUN_ARTEFACTS = ("config.json", "metrics.jsonl", "checkpoint.pt", "checkpoint.msgpack", "summary.json")


def _refuse_to_overwrite(framework: Framework, out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserFacingError(f"--out {out} is a file, not a directory; choose a directory for the run's artefacts.")
    found = [name for name in RUN_ARTEFACTS if (out / name).exists()]
    if found:
        raise UserFacingError(
            f"{out} already holds a run ({', '.join(found)}); continue it with --resume {out}, or choose "
            "another --out (nothing was overwritten)."
        )


def _checkpoint_path(framework: Framework, resume: str) -> Path:
    path = Path(resume)
    if path.is_dir():
        path = path / framework.checkpoint_name
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no {framework.title} checkpoint at {path}.")
    return path


def _default_out(framework: Framework, recipe: Recipe, seed: int | tuple[int, ...], dry_run: bool) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    suffix = "-dry-run" if dry_run else ""
    seeds = "seeds" + "-".join(map(str, seed)) if isinstance(seed, tuple) else f"seed{seed}"
    return Path("runs") / f"{framework.name}-{recipe.name}-{seeds}-{stamp}{suffix}"


def _announce(framework: Framework, runs: list[RunSettings], trainer: SeedGroupTrainer, done: int,
              epochs: int) -> None:
    recipe = runs[0].recipe
    facts = ", ".join(f"{k} {v}" for k, v in trainer.describe().items())
    start = f"resuming after epoch {done}" if done else "starting"
    seeds = ", ".join(str(run.seed) for run in runs)
    where = runs[0].out if len(runs) == 1 else runs[0].out.parent
    evaluated = "; evaluated on the validation split" if runs[0].validation else ""
    print(f"{framework.title} ({facts}): recipe {recipe.name}, {epochs} epochs, batch {recipe.batch_size}, "
          f"lr {recipe.lr}, momentum {recipe.momentum}, seed{'s' if len(runs) > 1 else ''} {seeds}{evaluated}; "
          f"{start}; run directory {where}")
