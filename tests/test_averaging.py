"""Weight averaging in the trainers (--average ema|swa, Recipe.average): what a run evaluates,
saves and resumes. The averaging rules themselves are proven equal across the frameworks, and to
AveragedModel's, in tests/parity/test_averaging.py."""

from __future__ import annotations

import numpy as np
import pytest

from bridge.convert import flax_to_torch
from common.cli import DRY_RUN_TEST_IMAGES
from common.errors import UserFacingError
from common.metrics import evaluate_log_probs, read_metrics
from common.recipes import BEST, SWASchedule, recipe_from_dict
from common.transforms import normalize
from tests.frameworks import JAX, NNX, TORCH
from torch_ref.averaging import averaged_state_dict

AVERAGES = {"ema": ["--average", "ema"], "swa": ["--average", "swa", "--swa-start", "1"]}


def test_recipe_fields_are_checked():
    assert [BEST.with_overrides(average="swa", swa_start=2).averages_after(e) for e in (1, 2, 3)] == [False, True, True]
    assert not BEST.with_overrides(average="ema").averages_after(3)  # an EMA averages at every step instead
    for fields, message in (({"average": "mean"}, "average 'mean'"), ({"ema_decay": 1.0}, "ema_decay 1.0"),
                            ({"swa_start": 0}, "swa_start 0")):
        with pytest.raises(UserFacingError, match=message):
            BEST.with_overrides(**fields)


def test_the_swa_schedule_needs_the_average_it_is_made_for():
    """SWASchedule hands over to SWALR at swa_start: a recipe that could not do so is refused
    with what to change, and a valid one survives the round trip checkpoints make."""
    swa = BEST.with_overrides(schedule=SWASchedule(swa_lr=0.03, anneal_epochs=1), average="swa", swa_start=11)
    assert recipe_from_dict(swa.to_dict()) == swa
    for fields, message in (({"average": "ema"}, "made for average 'swa'"), ({"swa_start": 1}, "from 2 to 15"),
                            ({"swa_start": 16}, "from 2 to 15"), ({"epochs": 10}, "from 2 to 10"),
                            ({"schedule": SWASchedule(anneal_strategy="step")}, "anneal_strategy 'step'"),
                            ({"schedule": SWASchedule(swa_lr=0.0)}, "swa_lr 0.0")):
        with pytest.raises(UserFacingError, match=message):
            swa.with_overrides(**fields)


def as_arrays(framework, weights) -> dict[str, np.ndarray]:
    """A framework's weights (read_weights' result) as a PyTorch state_dict of NumPy arrays."""
    if framework is TORCH:
        return {key: value.numpy() for key, value in weights.items()}
    return flax_to_torch(weights)


def trained_and_averaged(framework, checkpoint) -> tuple[dict, dict]:
    """A checkpoint's trained and averaged weights, as PyTorch state_dicts of NumPy arrays."""
    _, payload = framework.read_checkpoint(checkpoint)
    if framework is TORCH:
        return as_arrays(TORCH, payload["model"]), as_arrays(TORCH, averaged_state_dict(payload["averaged"]))
    state = payload["state"]
    trained = state["variables"] if framework is NNX else {key: state[key] for key in ("params", "batch_stats")}
    return as_arrays(JAX, trained), as_arrays(JAX, state["averaged"]["variables"])


def train(framework, out, data_dir, *flags) -> int:
    return framework.main(["--dry-run", "--out", str(out), "--data-dir", str(data_dir), "--threads", "1", *flags])


@pytest.mark.slow
@pytest.mark.parametrize("average", AVERAGES)
@pytest.mark.parametrize("framework", [JAX, TORCH, NNX], ids=["jax", "torch", "nnx"])
def test_a_run_evaluates_saves_and_resumes_its_average(framework, average, tmp_path, synthetic_dir, synthetic_mnist,
                                                       monkeypatch):
    whole = tmp_path / "whole"
    assert train(framework, whole, synthetic_dir, "--save-model", *AVERAGES[average]) == 0
    checkpoint = whole / framework.checkpoint_name
    trained, averaged = trained_and_averaged(framework, checkpoint)
    assert max(np.abs(trained[key] - averaged[key]).max() for key in averaged if key.endswith("weight")) > 1e-3

    # What the run evaluated, what it saved and what the evaluate command reads: the average.
    weights = framework.weights.read(checkpoint)
    images = normalize(synthetic_mnist.test_images[:DRY_RUN_TEST_IMAGES])
    evaluated = evaluate_log_probs(framework.weights.predict(weights, images, 100, "cpu", "auto"),
                                   synthetic_mnist.test_labels[:DRY_RUN_TEST_IMAGES])
    last = read_metrics(whole / "metrics.jsonl")[-1]
    # Float32 log-probabilities of the same weights from another compiled program: ulps apart.
    assert evaluated.loss == pytest.approx(last.test_loss, rel=1e-5)
    assert evaluated.accuracy == last.test_accuracy
    saved = as_arrays(framework, framework.weights.read(whole / framework.model_name))
    for key, value in as_arrays(framework, weights).items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)
    for key in averaged:
        np.testing.assert_array_equal(saved[key], averaged[key], err_msg=key)

    # Interrupted after epoch 1 and resumed: the trained and the averaged weights are restored.
    framework.interrupt_after(1, monkeypatch)
    assert train(framework, tmp_path / "resumed", synthetic_dir, *AVERAGES[average]) == 130
    monkeypatch.undo()
    assert len(read_metrics(tmp_path / "resumed" / "metrics.jsonl")) == 1
    assert framework.main(["--dry-run", "--resume", str(tmp_path / "resumed"), "--data-dir", str(synthetic_dir),
                            "--threads", "1"]) == 0
    resumed = trained_and_averaged(framework, tmp_path / "resumed" / framework.checkpoint_name)
    for ours, uninterrupted in zip(resumed, (trained, averaged), strict=True):
        for key, value in uninterrupted.items():
            np.testing.assert_array_equal(ours[key], value, err_msg=key)
