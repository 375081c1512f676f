"""What the evaluate commands share: test-set loss and accuracy of saved weights.

Reads a training checkpoint or a weights file of its framework, including one converted from
the other framework by `python -m bridge.convert`, so either implementation can evaluate a
model trained by the other.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.cli import DEFAULT_TEST_BATCH_SIZE, DEVICES, OPS
from common.errors import UserFacingError
from common.metrics import Evaluation, evaluate_log_probs
from common.mnist import load_mnist
from common.recipes import BEST
from common.settings import FrameworkNames
from common.transforms import normalize

RECALIBRATION_BATCH_SIZE = BEST.batch_size  # the default recipe's training batch
# 60,000 images at once took 6-7 GB in either framework (docs/reliability.md); 8,192 about 1.4 GB.
MAX_RECALIBRATION_BATCH_SIZE = 8192


@dataclass(frozen=True)
class WeightsFunctions:
    """A framework's three ways with a weights file: read it; (weights, normalised images, batch
    size, --device, --ops) -> log-probabilities; and the same arguments -> the weights with their
    BatchNorm statistics recomputed over the images (the trainers' --recalibrate-bn rule)."""

    read: Callable[[Path], Any]
    predict: Callable[[Any, np.ndarray, int, str, str], np.ndarray]
    recalibrate: Callable[[Any, np.ndarray, int, str, str], Any]


def evaluate_file(functions: WeightsFunctions, path: Path, data_dir: str | None = None,
                  batch_size: int = DEFAULT_TEST_BATCH_SIZE, device: str = "auto", ops: str = "auto",
                  recalibration_batch_size: int | None = None) -> Evaluation:
    """Evaluate the weights in `path` on the 10,000 MNIST test images: the model and its weights
    alone, with no optimiser, schedule or training state built. With `recalibration_batch_size`,
    their BatchNorm statistics are first recomputed over the 60,000 training images, that many
    at a time."""
    weights = functions.read(path)
    data = load_mnist(data_dir)
    if recalibration_batch_size and recalibration_batch_size > MAX_RECALIBRATION_BATCH_SIZE:
        raise UserFacingError(f"--recalibrate-bn {recalibration_batch_size}: a train-mode pass keeps every layer's "
                              f"activations, about 100 KB per image, so batches are bounded at "
                              f"{MAX_RECALIBRATION_BATCH_SIZE:,} images (about 1 GB); give at most that many (the "
                              f"default: {RECALIBRATION_BATCH_SIZE}).")
    if recalibration_batch_size and recalibration_batch_size > len(data.train_labels):
        raise UserFacingError(f"--recalibrate-bn {recalibration_batch_size}: a batch holds at most the "
                              f"{len(data.train_labels):,} training images, and each image in it costs memory for "
                              f"every layer's activations; give at most {len(data.train_labels)} (the default: "
                              f"{RECALIBRATION_BATCH_SIZE}).")
    if recalibration_batch_size:
        weights = functions.recalibrate(weights, normalize(data.train_images), recalibration_batch_size, device, ops)
    log_probs = functions.predict(weights, normalize(data.test_images), batch_size, device, ops)
    return evaluate_log_probs(log_probs, data.test_labels)


def main(names: FrameworkNames, module: str, functions: WeightsFunctions, argv: list[str] | None = None) -> int:
    """Entry point of the evaluate command `module`; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=f"Test-set accuracy of {names.title} weights: a {names.checkpoint_name}, a "
                    f"{names.model_name} from --save-model, or one converted by python -m bridge.convert.")
    parser.add_argument("weights", type=Path, help="checkpoint or weights file")
    parser.add_argument("--data-dir", default=None, metavar="DIR", help="MNIST directory (as for training)")
    parser.add_argument("--test-batch-size", type=int, default=DEFAULT_TEST_BATCH_SIZE, metavar="N",
                        help=f"evaluation batch size (default: {DEFAULT_TEST_BATCH_SIZE})")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="as for training (default: auto)")
    parser.add_argument("--ops", choices=OPS, default="auto", help="layers, as for training (default: auto)")
    parser.add_argument("--recalibrate-bn", type=int, nargs="?", const=RECALIBRATION_BATCH_SIZE, default=None,
                        metavar="BATCH",
                        help="first recompute the BatchNorm statistics over the 60,000 training images, BATCH at a "
                             f"time (default BATCH: %(const)s, at most {MAX_RECALIBRATION_BATCH_SIZE}), in train mode "
                             "with dropout off and no weight changed "
                             "(torch.optim.swa_utils.update_bn's rule), instead of the running averages training left")
    args = parser.parse_args(argv)
    if args.recalibrate_bn is not None and args.recalibrate_bn < 1:
        parser.error(f"--recalibrate-bn {args.recalibrate_bn}: give a positive batch size")
    try:
        result = evaluate_file(functions, args.weights, args.data_dir, args.test_batch_size, args.device, args.ops,
                               args.recalibrate_bn)
    except UserFacingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.weights} ({names.title}): test loss {result.loss:.4f}, accuracy {result.correct}/"
          f"{len(result.predictions)} ({result.accuracy:.2f}%)")
    return 0
