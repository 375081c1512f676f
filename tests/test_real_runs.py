"""What a real run reaches on the official MNIST: one epoch of the `best` recipe, seed 0, in
each framework (the accuracy claims of the README come from full runs; this keeps their
first step honest on every CI run). `best` rather than the default, `best-swa-zoom`, which
averages from epoch 11 and so refuses a one-epoch run; the bound below was measured on `best`.

The bound is on a training outcome, so it must cover the spread of trajectories: another CPU's
rounding sends a float32 run down another trajectory, as another dropout draw or seed does.
Runs of either framework and seeds 0-2 end epoch 1 at 98.21-98.62%, mean 98.44%, standard
deviation 0.14 (docs/tolerances.md); 97.5% is six of those below the mean: an epoch that trains
the model at all clears it, and a broken pipeline (wrong labels, augmentation or schedule) does
not.
"""

from __future__ import annotations

import pytest

from common.metrics import read_metrics
from tests.frameworks import JAX, TORCH

pytestmark = pytest.mark.slow  # an epoch of real MNIST per framework


@pytest.mark.parametrize("framework", [TORCH, JAX], ids=["torch", "jax"])
def test_one_epoch_on_the_real_files_reaches_97_5_percent(framework, real_mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--recipe", "best", "--epochs", "1", "--seed", "0", "--data-dir", str(real_mnist_dir), "--out", str(out)]
    assert framework.main(flags) == 0
    (record,) = read_metrics(out / "metrics.jsonl")
    with capsys.disabled():
        print(f"\n{framework.title}, 1 epoch of the best recipe, seed 0: {record.test_accuracy:.2f}%")
    assert record.test_accuracy >= 97.5
