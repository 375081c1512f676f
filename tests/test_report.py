"""common.report: the Markdown tables and the multi-run plot quoted in docs/results.md."""

from __future__ import annotations

import json
import sys

from common import report
from common.metrics import EpochRecord, write_metrics


def _fake_run(root, framework, seed, accuracies):
    run_dir = root / f"{framework}-{seed}"
    run_dir.mkdir()
    history = [EpochRecord(epoch=i + 1, lr=0.1, train_loss=0.1, train_accuracy=98.0, test_loss=0.05,
                           test_accuracy=accuracy, epoch_seconds=10.0 + i, eval_seconds=1.0,
                           compile_seconds=2.0 if i == 0 else 0.0) for i, accuracy in enumerate(accuracies)]
    write_metrics(run_dir / "metrics.jsonl", history)
    (run_dir / "config.json").write_text(json.dumps({"framework": {"framework": framework}, "seed": seed}))
    return run_dir


def test_report_tabulates_epochs_runs_and_their_spread(tmp_path, monkeypatch, capsys):
    runs = [_fake_run(tmp_path, "JAX", 0, [98.0, 99.0, 99.4]), _fake_run(tmp_path, "PyTorch", 1, [97.0, 99.2])]
    plot = tmp_path / "curves.png"
    monkeypatch.setattr(sys, "argv", ["report", *map(str, runs), "--plot", str(plot)])
    report.main()
    printed = capsys.readouterr().out
    assert "| epoch | JAX seed 0 | PyTorch seed 1 |" in printed and "| 3 | 99.40 |  |" in printed
    # Median of epochs 2+ (11 s, and 11 s for the two-epoch run), compile seconds summed.
    assert "| JAX seed 0 | 99.40 | 11.5 | 2.0 |" in printed and "| PyTorch seed 1 | 99.20 | 11.0 | 2.0 |" in printed
    assert "mean 99.30%, standard deviation 0.14, minimum 99.20%" in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
