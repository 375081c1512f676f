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
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.jax_trainer import JaxTrainer  # noqa: E402
from benchmarks.torch_trainer import TorchTrainer  # noqa: E402
from common import cli  # noqa: E402
from common.batching import EpochPlan, plan_epoch  # noqa: E402
from common.recipes import BEST, Recipe  # noqa: E402
from common.settings import RunSettings  # noqa: E402
from common.transforms import normalize  # noqa: E402

VARIANTS = {"none": BEST, "ema": BEST.with_overrides(average="ema"), "swa": BEST.with_overrides(average="swa")}

Trainer = TorchTrainer | JaxTrainer
Build = Callable[[RunSettings, EpochPlan], Trainer]  # (recipe and device, a whole epoch's plan) -> a trainer


def seconds(trainer: Trainer, work: Callable[[], None]) -> float:
    """Seconds of `work` on `trainer`, its queued device work included (JAX returns before it is done)."""
    started = time.perf_counter()
    work()
    trainer.synchronize()
    return time.perf_counter() - started


def measure(build: Build, data, batches: int, repeats: int) -> dict[str, float]:
    """Median seconds of a training step per variant, of an SWA update and of a recalibration pass."""
    epoch = plan_epoch(0, 1, len(data.train_labels), BEST.batch_size, BEST.augmentation)
    steps_per_epoch = len(epoch.batch_slices())
    plan = epoch.head(batches * BEST.batch_size)

    def trainer_of(recipe: Recipe) -> Trainer:
        """One seed on one thread, its schedule that of a whole epoch's steps."""
        return build(RunSettings(recipe, device="cpu", threads=1), epoch)

    trainers = {name: trainer_of(recipe) for name, recipe in VARIANTS.items() if name != "swa"}
    step_times: dict[str, list[float]] = {name: [] for name in trainers}
    for round_index in range(repeats + 1):
        for name, trainer in trainers.items():
            epoch_of_plan = functools.partial(trainer.train_epoch, plan, data.train_images, data.train_labels)
            elapsed = seconds(trainer, epoch_of_plan) / batches
            if round_index:  # round 0 compiles
                step_times[name].append(elapsed)
    swa = trainer_of(VARIANTS["swa"])
    swa_times = [seconds(swa, swa.average_weights) for _ in range(repeats + 1)][1:]
    images = normalize(data.train_images)
    plain = trainers["none"]
    plain.recalibrate(images[: 2 * BEST.batch_size], BEST.batch_size)  # compiles
    recalibration = seconds(plain, lambda: plain.recalibrate(images, BEST.batch_size))
    return {**{f"{name} epoch": statistics.median(times) * steps_per_epoch for name, times in step_times.items()},
            "swa update": statistics.median(swa_times), "recalibration": recalibration}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_data_flags(parser)
    parser.add_argument("--batches", type=int, default=100, help="training steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (median)")
    args = parser.parse_args()
    data = cli.load_data(args)
    print(f"best recipe, batch {BEST.batch_size}, one thread, {len(data.train_labels):,} images per epoch; "
          f"median of {args.repeats} rounds of {args.batches} steps")
    print("| framework | epoch, no average | epoch, EMA every step | EMA cost | SWA update | recalibration pass |")
    print("|---|---:|---:|---:|---:|---:|")
    for title, build in (("PyTorch", TorchTrainer), ("JAX", JaxTrainer)):
        result = measure(build, data, args.batches, args.repeats)
        plain, ema = result["none epoch"], result["ema epoch"]
        print(f"| {title} | {plain:.1f} s | {ema:.1f} s | {ema - plain:+.1f} s ({ema / plain - 1:+.0%}) | "
              f"{result['swa update'] * 1e3:.1f} ms | {result['recalibration']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
