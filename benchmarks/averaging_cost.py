"""Measure what weight averaging and BatchNorm recalibration add to a training epoch.

Trains the `best` recipe with and without an EMA on the same batches of real MNIST, in both
frameworks, alternating the two round by round (one thread); reports the median seconds per
step as seconds per 60,000-image epoch, the cost of one SWA update (once per epoch) and of one
recalibration pass over the training images. The first round of each variant compiles (JAX)
and is not counted.

    python benchmarks/averaging_cost.py [--data-dir DIR] [--batches 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import cli  # noqa: E402
from common.batching import plan_epoch  # noqa: E402
from common.framework import Framework, TrainerConfig  # noqa: E402
from common.progress import EpochProgress  # noqa: E402
from common.recipes import BEST, Recipe  # noqa: E402
from common.transforms import normalize  # noqa: E402

VARIANTS = {"none": BEST, "ema": BEST.with_overrides(average="ema"), "swa": BEST.with_overrides(average="swa")}


def seconds(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def measure(framework: Framework, data, batches: int, repeats: int) -> dict[str, float]:
    """Median seconds of a training step per variant, of an SWA update and of a recalibration pass."""
    steps_per_epoch = -(-len(data.train_labels) // BEST.batch_size)
    plan = plan_epoch(0, 1, len(data.train_labels), BEST.batch_size, BEST.augmentation).head(batches * BEST.batch_size)

    def group_of(recipe: Recipe):
        config = TrainerConfig(recipe, "cpu", 1, steps_per_epoch, epoch_images=len(plan.order))
        return framework.create_seed_group(config, [0])

    def epoch(group) -> None:
        group.train_epoch([plan], data.train_images, data.train_labels,
                          [EpochProgress(1, 1, len(plan.order), enabled=False)])

    groups = {name: group_of(recipe) for name, recipe in VARIANTS.items() if name != "swa"}
    step_times: dict[str, list[float]] = {name: [] for name in groups}
    for round_index in range(repeats + 1):
        for name, group in groups.items():
            elapsed = seconds(lambda group=group: epoch(group)) / batches
            if round_index:  # round 0 compiles
                step_times[name].append(elapsed)
    swa = group_of(VARIANTS["swa"])
    swa_times = [seconds(swa.average_weights) for _ in range(repeats + 1)][1:]
    images = normalize(data.train_images)
    groups["none"].recalibrate_batchnorm(images[: 2 * BEST.batch_size], BEST.batch_size)  # compiles
    recalibration = seconds(lambda: groups["none"].recalibrate_batchnorm(images, BEST.batch_size))
    return {**{f"{name} epoch": statistics.median(times) * steps_per_epoch for name, times in step_times.items()},
            "swa update": statistics.median(swa_times), "recalibration": recalibration}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_data_flags(parser)
    parser.add_argument("--batches", type=int, default=100, help="training steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (median)")
    args = parser.parse_args()
    data = cli.load_data(args)
    from jax_impl.train import FRAMEWORK as JAX
    from torch_ref.train import FRAMEWORK as TORCH

    print(f"best recipe, batch {BEST.batch_size}, one thread, {len(data.train_labels):,} images per epoch; "
          f"median of {args.repeats} rounds of {args.batches} steps")
    print("| framework | epoch, no average | epoch, EMA every step | EMA cost | SWA update | recalibration pass |")
    print("|---|---:|---:|---:|---:|---:|")
    for framework in (TORCH, JAX):
        result = measure(framework, data, args.batches, args.repeats)
        plain, ema = result["none epoch"], result["ema epoch"]
        print(f"| {framework.title} | {plain:.1f} s | {ema:.1f} s | {ema - plain:+.1f} s ({ema / plain - 1:+.0%}) | "
              f"{result['swa update'] * 1e3:.1f} ms | {result['recalibration']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
