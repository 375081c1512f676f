"""BatchNorm recalibration in both trainers (--recalibrate-bn final|epoch, Recipe.recalibrate_bn)
and evaluate commands (--recalibrate-bn [BATCH]). The pass itself is proven equal across the
frameworks, and to update_bn's rule, in tests/parity/test_recalibration.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common import evaluation
from common.cli import DRY_RUN_TRAIN_BATCHES
from common.errors import UserFacingError
from common.metrics import read_metrics
from common.recipes import BEST
from common.transforms import normalize
from tests.frameworks import JAX, TORCH

FRAMEWORKS = pytest.mark.parametrize("framework", [JAX, TORCH], ids=["jax", "torch"])


def dry_run(framework, out, data_dir, *flags) -> None:
    args = ["--dry-run", "--save-model", "--out", str(out), "--data-dir", str(data_dir), "--threads", "1", *flags]
    assert framework.main(args) == 0


def test_recipes_recalibrate_when_asked():
    assert not BEST.recalibrates_after(15, 15)
    final, every = BEST.with_overrides(recalibrate_bn="final"), BEST.with_overrides(recalibrate_bn="epoch")
    assert [final.recalibrates_after(e, 3) for e in (1, 2, 3)] == [False, False, True]
    assert [every.recalibrates_after(e, 3) for e in (1, 2, 3)] == [True, True, True]
    with pytest.raises(UserFacingError, match="recalibrate_bn 'always'"):
        BEST.with_overrides(recalibrate_bn="always")


@FRAMEWORKS
def test_final_recalibration_runs_after_the_last_epoch_and_is_what_the_run_saves(framework, tmp_path, synthetic_dir,
                                                                                  synthetic_mnist):
    """The saved model's statistics are those the pass computes from its weights: recomputing
    them again (the evaluate command's way) changes no prediction."""
    out = tmp_path / "run"
    dry_run(framework, out, synthetic_dir, "--recalibrate-bn", "final")
    history = read_metrics(out / "metrics.jsonl")
    assert history[0].recalibration_seconds == 0 < history[1].recalibration_seconds
    assert json.loads((out / "config.json").read_text())["recipe"]["recalibrate_bn"] == "final"
    weights = framework.weights.read(out / framework.model_name)
    trained_on = normalize(synthetic_mnist.train_images[: DRY_RUN_TRAIN_BATCHES * BEST.batch_size])
    again = framework.weights.recalibrate(weights, trained_on, BEST.batch_size, "cpu", "auto")
    test_images = normalize(synthetic_mnist.test_images)
    # float32 log-probabilities of the same weights, statistics computed once stacked over seeds and
    # once alone: a few ulps apart (see tests/parity/test_forward.py for the 1e-5 bound).
    np.testing.assert_allclose(framework.weights.predict(again, test_images, 100, "cpu", "auto"),
                               framework.weights.predict(weights, test_images, 100, "cpu", "auto"), rtol=0, atol=1e-5)


@FRAMEWORKS
def test_evaluate_recalibrates_on_request(framework, tmp_path, synthetic_dir, capsys):
    out = tmp_path / "run"
    dry_run(framework, out, synthetic_dir)
    model = out / framework.model_name
    plain = evaluation.evaluate_file(framework.weights, model, synthetic_dir, device="cpu")
    recalibrated = evaluation.evaluate_file(framework.weights, model, synthetic_dir, device="cpu",
                                            recalibration_batch_size=64)
    assert abs(plain.loss - recalibrated.loss) > 1e-4  # two epochs of 4 batches leave running averages far off
    assert framework.evaluate_main([str(model), "--data-dir", str(synthetic_dir), "--device", "cpu",
                                       "--recalibrate-bn"]) == 0
    assert "test loss" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        framework.evaluate_main([str(model), "--recalibrate-bn", "0"])
