"""Measure what the shared data pipeline costs per 60,000-image training epoch.

Times `plan_epoch` (shuffle and draws) plus every batch of `train_batches` (crop/resize,
rotation, normalisation) on real MNIST, single-threaded NumPy, median of --repeats epochs.

    python benchmarks/augmentation_cost.py [--data-dir DIR] [--batch-size 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import cli  # noqa: E402
from common.batching import plan_epoch, train_batches  # noqa: E402
from common.recipes import SEED  # noqa: E402


def epoch_seconds(data, seed: int, batch_size: int) -> float:
    started = time.perf_counter()
    plan = plan_epoch(seed, 1, len(data.train_labels), batch_size, SEED.augmentation)
    for _ in train_batches(plan, data.train_images, data.train_labels):
        pass
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_data_flags(parser)
    parser.add_argument("--batch-size", type=int, default=SEED.batch_size)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = cli.load_data(args)
    times = [epoch_seconds(data, seed, args.batch_size) for seed in range(args.repeats)]
    median = statistics.median(times)
    print(f"data pipeline: {median:.2f} s per 60,000-image epoch at batch {args.batch_size} "
          f"(median of {args.repeats}: {', '.join(f'{t:.2f}' for t in times)}), "
          f"{len(data.train_labels) / median:,.0f} images/s")


if __name__ == "__main__":
    main()
