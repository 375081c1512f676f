"""A run's settings: flags merged with the recipe, or with a resumed checkpoint's settings, and
the checks that keep one run from writing into another's directory."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
from dataclasses import dataclass
from pathlib import Path

from common.errors import CheckpointError, UserFacingError
from common.framework import Framework
from common.mnist import resolve_data_dir
from common.recipes import DEFAULT_RECIPE, Recipe, get_recipe, recipe_from_dict
from common.sources import DEFAULT_SOURCE

# What any run of either framework writes into its directory: a directory holding one of these
# belongs to a run, and only --resume may write into it again.
RUN_ARTEFACTS = ("config.json", "metrics.jsonl", "checkpoint.pt", "checkpoint.msgpack", "summary.json")


@dataclass(frozen=True)
class RunSettings:
    """A run's recipe and options after flags, defaults and any resumed checkpoint are merged."""

    recipe: Recipe
    seed: int
    test_batch_size: int
    data_dir: Path
    data_source: str
    out: Path
    dry_run: bool
    validation: bool
    device: str
    ops: str
    threads: int | None
    devices: int | str | None
    save_model: bool

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.update(recipe=self.recipe.to_dict(), data_dir=str(self.data_dir), out=str(self.out))
        return data


def settings_from_args(framework: Framework, args: argparse.Namespace, resumed_meta: dict | None,
                       writes: bool = True) -> RunSettings:
    """Merge flags with the recipe, or with the checkpoint's settings when resuming. Only the
    process that `writes` the run's files checks its directory (the others would find the files
    it has just begun to write)."""
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "momentum": args.momentum,
                 "recalibrate_bn": args.recalibrate_bn, "average": args.average, "ema_decay": args.ema_decay,
                 "swa_start": args.swa_start}
    common = {"test_batch_size": args.test_batch_size, "dry_run": args.dry_run, "validation": args.validation,
              "device": args.device, "ops": args.ops,
              "threads": args.threads, "devices": args.devices, "save_model": args.save_model,
              "data_dir": resolve_data_dir(args.data_dir)}
    if resumed_meta is None:
        recipe = get_recipe(args.recipe or DEFAULT_RECIPE).with_overrides(**overrides)
        seed = args.seed if args.seed is not None else 0
        out = Path(args.out) if args.out else default_out(framework.name, recipe, args.seeds or seed, args.dry_run)
        if writes:
            refuse_to_overwrite(out)
        return RunSettings(recipe=recipe, seed=seed, data_source=args.data_source or DEFAULT_SOURCE, out=out, **common)

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
    common["validation"] = saved["validation"]
    run_dir = checkpoint_path(framework, args.resume).parent
    out = Path(args.out) if args.out else run_dir
    if writes and out.resolve() != run_dir.resolve():
        refuse_to_overwrite(out)
    return RunSettings(recipe=recipe, seed=saved["seed"], data_source=current["data_source"], out=out, **common)


def refuse_to_overwrite(out: Path) -> None:
    """Stop before a new run writes into a file or into another run's directory."""
    if out.exists() and not out.is_dir():
        raise UserFacingError(f"--out {out} is a file, not a directory; choose a directory for the run's artefacts.")
    found = [name for name in RUN_ARTEFACTS if (out / name).exists()]
    if found:
        raise UserFacingError(
            f"{out} already holds a run ({', '.join(found)}); continue it with --resume {out}, or choose "
            "another --out (nothing was overwritten)."
        )


def checkpoint_path(framework: Framework, resume: str) -> Path:
    """The checkpoint --resume names: the file itself, or the framework's checkpoint in a run directory."""
    path = Path(resume)
    if path.is_dir():
        path = path / framework.checkpoint_name
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no {framework.title} checkpoint at {path}.")
    return path


def default_out(framework_name: str, recipe: Recipe, seed: int | tuple[int, ...], dry_run: bool) -> Path:
    """runs/<framework>-<recipe>-seed<S>-<date-time>[-dry-run]."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    suffix = "-dry-run" if dry_run else ""
    seeds = "seeds" + "-".join(map(str, seed)) if isinstance(seed, tuple) else f"seed{seed}"
    return Path("runs") / f"{framework_name}-{recipe.name}-{seeds}-{stamp}{suffix}"

