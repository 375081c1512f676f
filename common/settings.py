"""A run's settings: flags merged with the recipe, or with a resumed checkpoint's settings, and
the checks that keep one run from writing into another's directory."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.batching import check_even_shards
from common.cli import DEFAULT_TEST_BATCH_SIZE, RECIPE_FLAGS, RUN_FLAGS
from common.errors import CheckpointError, UserFacingError
from common.files import check_writable_directory
from common.mnist import DEFAULT_DATA_DIR, resolve_data_dir
from common.processes import DeviceCount
from common.recipes import DEFAULT_RECIPE, Recipe, get_recipe, recipe_from_dict
from common.sources import DEFAULT_SOURCE

# What any run writes into its directory besides its checkpoint (checkpoint.<format>): a
# directory holding one of these belongs to a run, and only --resume may write into it again.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json")
CHECKPOINT_STEM = "checkpoint"


@dataclass(frozen=True)
class FrameworkNames:
    """How a framework names itself and its files; each passes its own to this library."""

    name: str  # "torch" or "jax": in run directory names and checkpoints
    title: str  # "PyTorch" or "JAX": in messages
    checkpoint_name: str  # checkpoint.<format>
    model_name: str  # the --save-model file


@dataclass(frozen=True)
class RunSettings:
    """A run's recipe and options after flags, defaults and any resumed checkpoint are merged:
    everything a trainer reads. The defaults are the flags' own."""

    recipe: Recipe
    seed: int = 0
    test_batch_size: int = DEFAULT_TEST_BATCH_SIZE
    data_dir: Path = DEFAULT_DATA_DIR
    data_source: str = DEFAULT_SOURCE
    out: Path = Path("runs")
    dry_run: bool = False
    validation: bool = False
    device: str = "auto"
    ops: str = "auto"
    threads: int | None = None
    devices: int | str | None = None
    save_model: bool = False

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.update(recipe=self.recipe.to_dict(), data_dir=str(self.data_dir), out=str(self.out))
        return data


def settings_from_args(names: FrameworkNames, args: argparse.Namespace, resumed_meta: dict | None,
                       writes: bool = True) -> RunSettings:
    """Merge flags with the recipe, or with the checkpoint's settings when resuming. Only the
    process that `writes` the run's files checks its directory (the others would find the files
    it has just begun to write)."""
    if args.seeds and (args.resume or args.seed is not None):
        raise UserFacingError("--seeds trains new runs: it cannot be combined with --seed or --resume "
                              "(resume one seed's directory on its own).")
    if args.out == "":
        raise UserFacingError("--out is empty: name a directory for the run, or leave --out out for the default.")
    overrides = {name: getattr(args, name) for name in RECIPE_FLAGS}
    options = {name: getattr(args, name) for name in RUN_FLAGS}
    options["data_dir"] = resolve_data_dir(args.data_dir)
    if resumed_meta is None:
        recipe = get_recipe(args.recipe or DEFAULT_RECIPE).with_overrides(**overrides)
        refuse_unused_averaging_flags(args, recipe)
        seed = args.seed if args.seed is not None else 0
        out = Path(args.out) if args.out else default_out(names.name, recipe, args.seeds or seed, args.dry_run)
        if isinstance(args.devices, int):  # before any process or device starts
            check_even_shards(recipe.batch_size, None, args.devices)
        if writes:
            refuse_to_overwrite(out)
        return RunSettings(recipe=recipe, seed=seed, data_source=args.data_source or DEFAULT_SOURCE, out=out, **options)

    saved = resumed_meta["settings"]
    recipe = recipe_from_dict(saved["recipe"])
    # The data source fixes the examples' order, so it belongs to the run like its seed.
    requested = {"recipe": args.recipe, "seed": args.seed, "data_source": args.data_source, **overrides}
    current = {"recipe": recipe.name, "seed": saved["seed"], "data_source": saved.get("data_source", DEFAULT_SOURCE),
               **{k: getattr(recipe, k) for k in overrides}}
    conflicts = [f"--{k.replace('_', '-')} {v} (checkpoint: {current[k]})"
                 for k, v in requested.items() if v is not None and v != current[k]]
    if conflicts:
        raise UserFacingError(
            "a resumed run keeps the recipe, seed and data source it started with, but these flags differ: "
            + ", ".join(conflicts) + ". Drop them, or start a new run without --resume."
        )
    if args.validation and not saved["validation"]:
        raise UserFacingError("--validation: the resumed run was evaluated on the test set; start a new run.")
    if args.dry_run != saved["dry_run"]:
        was, now = ("a dry run", "without --dry-run") if saved["dry_run"] else ("a full run", "with --dry-run")
        raise UserFacingError(f"--resume: the checkpoint is from {was}, and resuming it {now} would mix "
                              "short and full epochs. Resume it as it was started, or start a new run.")
    options["validation"] = saved["validation"]
    options["save_model"] = args.save_model or saved.get("save_model", False)
    if isinstance(args.devices, int):  # the checkpoint's, unless given (each trainer's devices_to_resume)
        check_even_shards(recipe.batch_size, None, args.devices)
    run_dir = checkpoint_path(names, args.resume).parent
    out = Path(args.out) if args.out else run_dir
    if writes and out.resolve() != run_dir.resolve():
        refuse_to_overwrite(out)
    return RunSettings(recipe=recipe, seed=saved["seed"], data_source=current["data_source"], out=out, **options)


def refuse_unused_averaging_flags(args: argparse.Namespace, recipe: Recipe) -> None:
    """A flag of one kind of weight averaging, on a run that averages otherwise, or an SWA that
    starts after the last epoch, would change nothing: say so rather than train a run that
    silently ignores it. A dry run's fewer epochs are not counted: it checks the full run's code."""
    for flag, kind in (("ema_decay", "ema"), ("swa_start", "swa")):
        if getattr(args, flag) is not None and recipe.average != kind:
            raise UserFacingError(
                f"--{flag.replace('_', '-')} applies to --average {kind}, and this run averages "
                f"{recipe.average!r} (recipe {recipe.name}): add --average {kind}, or drop the flag.")
    if recipe.average == "swa" and recipe.swa_start > recipe.epochs:
        raise UserFacingError(
            f"recipe {recipe.name} averages the weights (SWA) from epoch {recipe.swa_start} (--swa-start), and "
            f"the run ends after epoch {recipe.epochs}: nothing would be averaged. Give --swa-start "
            f"{recipe.epochs} or less, more --epochs, or a recipe that does not average (--recipe best).")


def refuse_to_overwrite(out: Path) -> None:
    """Stop before a new run writes into a file, into another run's directory, or into a
    directory it could not write (checked now, so that no epoch is trained in vain)."""
    if os.path.isfile(out):
        raise UserFacingError(f"--out {out} is a file, not a directory; choose a directory for the run's artefacts.")
    check_writable_directory(out)
    found = [name for name in RUN_FILES if (out / name).exists()]
    found += sorted(path.name for path in out.glob(f"{CHECKPOINT_STEM}.*") if path.is_file())
    if found:
        raise UserFacingError(
            f"{out} already holds a run ({', '.join(found)}); continue it with --resume {out}, or choose "
            "another --out (nothing was overwritten)."
        )


def checkpoint_path(names: FrameworkNames, resume: str) -> Path:
    """The checkpoint --resume names: the file itself, or the framework's checkpoint in a run directory."""
    path = Path(resume)
    if path.is_dir():
        path = path / names.checkpoint_name
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no {names.title} checkpoint at {path}.")
    return path


def default_out(framework_name: str, recipe: Recipe, seed: int | tuple[int, ...], dry_run: bool) -> Path:
    """runs/<framework>-<recipe>-seed<S>-<date-time>[-dry-run]."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    suffix = "-dry-run" if dry_run else ""
    seeds = "seeds" + "-".join(map(str, seed)) if isinstance(seed, tuple) else f"seed{seed}"
    return Path("runs") / f"{framework_name}-{recipe.name}-{seeds}-{stamp}{suffix}"


def devices_to_resume(requested: DeviceCount, meta: dict, count: Callable[[DeviceCount], int] | None = None,
                      count_changes_results: str | None = None) -> DeviceCount:
    """--devices of a resumed run: the checkpoint's unless given. Where another number of devices
    (`count` turns a --devices into one) would change the run's trajectory, `count_changes_results`
    says why, and it is refused."""
    if requested is None:
        return meta["settings"].get("devices")
    trained_on = meta.get("devices")  # absent from checkpoints older than the record
    if count and count_changes_results and trained_on is not None and count(requested) != trained_on:
        raise UserFacingError(
            f"--devices {requested}: the checkpoint was trained on {trained_on} device(s), and "
            f"{count_changes_results}. Resume with --devices {trained_on} (or without --devices), or start a new run.")
    return requested
