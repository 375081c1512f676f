"""Markdown tables of finished runs, for docs/results.md and issue reports.

    python -m common.report RUN_DIR [RUN_DIR ...]

prints per-epoch test accuracy side by side, then one line per run (final accuracy, median
seconds per training epoch after the first, compile seconds) and the mean, standard
deviation and minimum of the final accuracies. `--plot FILE.png` also draws every run's test
accuracy and loss against epoch into one figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common.metrics import EpochRecord, read_metrics
from common.plots import plot_runs


def run_label(run_dir: Path) -> str:
    """"<framework> seed <S>" from the run's config.json."""
    config = json.loads((run_dir / "config.json").read_text())
    return f"{config['framework']['framework']} seed {config['seed']}"


def markdown_report(run_dirs: list[Path]) -> str:
    """The tables described in the module docstring."""
    histories = [read_metrics(d / "metrics.jsonl") for d in run_dirs]
    labels = [run_label(d) for d in run_dirs]
    epochs = max(len(h) for h in histories)
    lines = ["| epoch | " + " | ".join(labels) + " |", "|---:|" + "---:|" * len(labels)]
    for index in range(epochs):
        cells = [f"{h[index].test_accuracy:.2f}" if index < len(h) else "" for h in histories]
        lines.append(f"| {index + 1} | " + " | ".join(cells) + " |")
    lines += ["", "| run | final test accuracy (%) | s per epoch (median, epochs 2+) | compile s |",
              "|---|---:|---:|---:|"]
    for label, history in zip(labels, histories, strict=True):
        lines.append(f"| {label} | {history[-1].test_accuracy:.2f} | {_steady_epoch_seconds(history):.1f} | "
                     f"{sum(r.compile_seconds for r in history):.1f} |")
    finals = [h[-1].test_accuracy for h in histories]
    if len(finals) > 1:
        lines += ["", f"final accuracy over {len(finals)} runs: mean {statistics.mean(finals):.2f}%, "
                      f"standard deviation {statistics.stdev(finals):.2f}, minimum {min(finals):.2f}%, "
                      f"maximum {max(finals):.2f}%"]
    return "\n".join(lines)


def _steady_epoch_seconds(history: list[EpochRecord]) -> float:
    steady = history[1:] or history
    return statistics.median(r.epoch_seconds for r in steady)


def main() -> None:
    parser = argparse.ArgumentParser(description="Markdown tables of finished runs.")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="also plot the runs' test curves here")
    parser.add_argument("--title", default="test curves", help="title of the plot")
    args = parser.parse_args()
    print(markdown_report(args.run_dirs))
    if args.plot:
        histories = [read_metrics(d / "metrics.jsonl") for d in args.run_dirs]
        plot_runs(histories, [run_label(d) for d in args.run_dirs], args.plot, args.title)


if __name__ == "__main__":
    main()
