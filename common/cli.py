"""The command line of both trainers: one parser, so the flags and their meanings cannot drift.

Flags follow PyTorch's examples/mnist. Hyper-parameter flags default to "the recipe's value",
so `--recipe` picks a complete recipe and any flag given on top overrides one field of it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

from common.mnist import DATA_DIR_ENV, DEFAULT_DATA_DIR, Mnist
from common.recipes import AVERAGES, DEFAULT_RECIPE, RECALIBRATIONS, RECIPES, SCHEDULE_WORDS
from common.sources import DEFAULT_SOURCE, SOURCES, TFDS_DATA_DIR_ENV, load_source

DEVICES = ("auto", "cpu", "gpu")
OPS = ("auto", "plain", "fast")
DEFAULT_TEST_BATCH_SIZE = 1000
DRY_RUN_EPOCHS = 2
DRY_RUN_TRAIN_BATCHES = 4
DRY_RUN_TEST_IMAGES = 1000
# The flags that override one field of the recipe, and those copied into the run's settings as
# they are: common.settings reads these names from the parsed flags (a test checks every flag
# of the parser is in one of them, or handled by name).
RECIPE_FLAGS = ("epochs", "batch_size", "lr", "momentum", "recalibrate_bn", "average", "ema_decay", "swa_start")
RUN_FLAGS = ("test_batch_size", "dry_run", "validation", "device", "ops", "threads", "devices", "save_model")


@dataclass(frozen=True)
class FrameworkHelp:
    """What --help says of one framework: how it trains several seeds, what --ops fast means
    there, how it spreads a run over devices, and its --save-model file."""

    seeds: str
    fast_ops: str
    devices: str
    model_file: str


def build_parser(framework: str, module: str, notes: FrameworkHelp) -> argparse.ArgumentParser:
    """The trainer's parser; only the program's name and the framework's notes differ."""
    recipes = ", ".join(f"{name} ({recipe.epochs} epochs, batch {recipe.batch_size}, "
                        f"{SCHEDULE_WORDS[recipe.schedule.kind]} {recipe.lr}, "
                        f"dropout {recipe.dropout})"
                        for name, recipe in RECIPES.items())
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=(
            f"Train the 4,328-parameter ERA V1 Session 6 MNIST CNN with {framework}. "
            "Writes metrics.jsonl, curves.png, samples.png, misclassified.png, config.json and a "
            "checkpoint into the run directory."
        ),
    )
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                        help=f"training recipe; known: {recipes} (default: {DEFAULT_RECIPE})")
    parser.add_argument("--epochs", type=_positive_int, default=None, metavar="N",
                        help="number of epochs (default: the recipe's)")
    parser.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                        help="training batch size (default: the recipe's)")
    parser.add_argument("--test-batch-size", type=_positive_int, default=DEFAULT_TEST_BATCH_SIZE,
                        metavar="N",
                        help=f"evaluation batch size; does not change results (default: {DEFAULT_TEST_BATCH_SIZE})")
    parser.add_argument("--lr", type=_positive_float, default=None, metavar="LR",
                        help="peak learning rate (default: the recipe's)")
    parser.add_argument("--momentum", type=_unit_interval, default=None, metavar="M",
                        help="SGD momentum in [0, 1) (default: the recipe's)")
    parser.add_argument("--recalibrate-bn", choices=RECALIBRATIONS, default=None,
                        help="recompute the BatchNorm statistics over the training images after the last epoch "
                             "(final) or after every epoch (epoch), before evaluating and saving: train mode, dropout "
                             "off, no weight changed, every batch weighed equally (torch.optim.swa_utils.update_bn's "
                             "rule), instead of the running averages collected under dropout and augmentation "
                             "(default: the recipe's)")
    parser.add_argument("--average", choices=AVERAGES, default=None,
                        help="evaluate and save averaged weights (checkpoints keep the trained ones too): ema, an "
                             "exponential moving average after every step; swa, the equal-weight mean of the weights "
                             "at the end of each epoch from --swa-start on (torch.optim.swa_utils.AveragedModel, "
                             "BatchNorm statistics averaged with them) (default: the recipe's)")
    parser.add_argument("--ema-decay", type=_unit_interval, default=None, metavar="D",
                        help="EMA decay in [0, 1): average = D * average + (1 - D) * weights (default: the recipe's)")
    parser.add_argument("--swa-start", type=_positive_int, default=None, metavar="EPOCH",
                        help="first epoch whose final weights join the SWA average (default: the recipe's)")
    parser.add_argument("--seeds", type=_seed_list, default=None, metavar="S,S,...",
                        help="train several seeds and write a summary; each run goes to <out>/seed<S> and "
                             f"follows the run of its seed alone ({notes.seeds})")
    parser.add_argument("--validation", action="store_true",
                        help="train on the first 55,000 training images and evaluate on the last 5,000 "
                             "(the last twelfth of any training set) instead of the test set (to choose "
                             "recipes honestly)")
    parser.add_argument("--seed", type=_non_negative_int, default=None, metavar="S",
                        help="seed of the weights, the shuffle, the augmentation and dropout "
                             "(default: 0)")
    add_data_flags(parser)
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="run directory for metrics, plots, config and checkpoint (default: "
                             "runs/<framework>-<recipe>-seed<S>-<date-time>)")
    parser.add_argument("--dry-run", action="store_true",
                        help=f"quick check that everything runs: at most {DRY_RUN_EPOCHS} epochs of "
                             f"{DRY_RUN_TRAIN_BATCHES} batches, tested on the first "
                             f"{DRY_RUN_TEST_IMAGES} test images")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where to train: auto picks an accelerator when the framework sees one, else "
                             "the CPU (default: auto)")
    parser.add_argument("--ops", choices=OPS, default="auto",
                        help="how the layers are computed; same maths, same weights. plain: the model as "
                             f"written. fast: {notes.fast_ops} (default: auto)")
    parser.add_argument("--devices", type=_device_count, default=None, metavar="N|all",
                        help="data-parallel training: every batch is split over N devices (or all of them) "
                             f"and their gradients averaged. {notes.devices} Under several processes, process 0 "
                             "alone writes the run directory. Default: one device per process")
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="CPU threads the framework may use (default: the framework's choice)")
    parser.add_argument("--save-model", action="store_true",
                        help=f"also save the final weights alone ({notes.model_file}) for evaluation or sharing")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="continue a run from its checkpoint (a run directory or checkpoint "
                             "file), in that directory, with its recipe and seed")
    return parser


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """--data-dir and --data-source, for the trainers and the benchmarks alike."""
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help=f"directory with the MNIST files (gzipped or not, or torchvision's "
                             f"MNIST/raw); missing files are downloaded there (default: "
                             f"${DATA_DIR_ENV}, else {DEFAULT_DATA_DIR})")
    parser.add_argument("--data-source", choices=SOURCES, default=None,
                        help=f"how MNIST is read; every source gives the official 70,000 examples (tfds and "
                             f"torchvision are checked against them). idx: this project's reader of the IDX files "
                             f"in the data directory, verified by SHA-256, downloading what is missing. tfds: "
                             f"tensorflow-datasets' prepared MNIST (from the data directory if it is a tfds data "
                             f"directory, else ${TFDS_DATA_DIR_ENV} or ~/tensorflow_datasets), prepared offline from "
                             f"the official files if tfds has none; pip install -e '.[tfds]'. torchvision: "
                             f"torchvision.datasets.MNIST over the data directory (its MNIST/raw folder); pip "
                             f"install -e '.[torchvision]'. tfds stores the examples in another order, so its "
                             f"batches and results differ from the others' (default: {DEFAULT_SOURCE}; a resumed "
                             f"run keeps its own)")


def data_flags(args: argparse.Namespace) -> list[str]:
    """The data flags of `args` again, for a trainer or worker started as a subprocess."""
    return ((["--data-dir", args.data_dir] if args.data_dir else [])
            + (["--data-source", args.data_source] if args.data_source else []))


def load_data(args: argparse.Namespace) -> Mnist:
    """MNIST as the data flags of `args` ask (the benchmarks' way; the trainers go through their settings)."""
    return load_source(args.data_source or DEFAULT_SOURCE, args.data_dir)


def _checked(convert: Callable[[str], float], accept: Callable[[float], bool], wanted: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v > 0, "a positive integer")
_non_negative_int = _checked(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
_unit_interval = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def _device_count(text: str) -> int | str:
    return "all" if text == "all" else _checked(int, lambda v: v > 0, "a positive integer or 'all'")(text)


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of seeds") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct non-negative seeds, e.g. 0,1,2,3,4")
    return seeds
