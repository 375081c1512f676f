"""`python -m nnx_impl.train`: the linen twin's flags word for word, its artefacts, its several
seeds and several devices. Its checkpoints, resumes and averages are tested with the other
trainers' (tests/test_averaging.py); its steps against PyTorch in tests/parity/test_nnx.py."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

import jax_impl.train
import nnx_impl.train
from common.batching import plan_epoch
from common.metrics import read_metrics
from common.recipes import BEST, DEFAULT_RECIPE, get_recipe
from common.settings import RunSettings
from nnx_impl.checkpoints import read_checkpoint, read_weights
from nnx_impl.model import variables_of
from tests.float64_jax_train import float64_training
from tests.test_data_parallel_jax import assert_same_state
from tests.test_jax_training import help_text


def train(args: list[str], data_dir) -> int:
    return nnx_impl.train.main([*args, "--data-dir", str(data_dir)])


def test_help_lists_exactly_the_flags_of_the_linen_twin():
    """The two Flax trainers' --help differ only in the program's and the framework's names and
    in the framework's own notes (common.cli.FrameworkHelp); test_jax_training.py holds the
    linen one to PyTorch's the same way."""

    def general(text: str, module) -> str:
        for note in dataclasses.astuple(module.HELP):
            text = text.replace(" ".join(note.split()), "<note>")
        return text.replace(module.__name__, "<module>").replace(f" with {module.NAMES.title}.", " with <framework>.")

    ours = help_text("nnx_impl.train")
    assert "--ops {auto,plain,fast}" in ours and "--resume PATH" in ours and "with Flax NNX." in ours
    assert general(ours, nnx_impl.train) == general(help_text("jax_impl.train"), jax_impl.train)


def test_a_dry_run_of_two_seeds_writes_every_artefact_and_a_summary(tmp_path, synthetic_dir):
    out = tmp_path / "group"
    assert train(["--dry-run", "--seeds", "0,2", "--save-model", "--out", str(out)], synthetic_dir) == 0
    assert json.loads((out / "summary.json").read_text())["seeds"] == [0, 2]
    assert "| Flax NNX seed 0 | Flax NNX seed 2 |" in (out / "summary.md").read_text()
    for seed in (0, 2):
        run = out / f"seed{seed}"
        assert {"metrics.jsonl", "curves.png", "samples.png", "misclassified.png", "config.json",
                "checkpoint.msgpack", "model.msgpack"} <= {path.name for path in run.iterdir()}
        history = read_metrics(run / "metrics.jsonl")
        assert [record.epoch for record in history] == [1, 2]
        default = get_recipe(DEFAULT_RECIPE)
        assert history[0].lr == pytest.approx(default.lr / default.schedule.div_factor)  # OneCycle's first step
        meta, _ = read_checkpoint(run / "checkpoint.msgpack")
        assert meta["settings"]["seed"] == seed and meta["epoch"] == 2
        config = json.loads((run / "config.json").read_text())
        assert config["framework"]["framework"] == "Flax NNX" and config["framework"]["ops"] == "fast"
        saved, checkpointed = read_weights(run / "model.msgpack"), read_weights(run / "checkpoint.msgpack")
        for ours, theirs in zip(jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(checkpointed), strict=True):
            np.testing.assert_array_equal(ours, theirs)
    first, second = (read_metrics(out / f"seed{seed}" / "metrics.jsonl")[-1] for seed in (0, 2))
    assert first.train_loss != second.train_loss  # each seed its own weights, batches and masks


@pytest.mark.slow
def test_2_devices_take_the_steps_of_one_device(tmp_path, synthetic_dir):
    """A dry run on 2 CPU devices (the model's state replicated, every batch split) against one
    on one device, the state in float64 (tests/float64_jax_train.py) so that only the order of
    the reductions differs, under test_data_parallel_jax.py's bound for the linen twin (1e-10 of
    each tensor's norm). Plain layers here; the fast ones are the linen twin's own, split there."""
    common = ["--dry-run", "--ops", "plain", "--device", "cpu"]
    with float64_training():
        assert train([*common, "--out", str(tmp_path / "one")], synthetic_dir) == 0
        assert train([*common, "--devices", "2", "--out", str(tmp_path / "two")], synthetic_dir) == 0
    one, two = (read_checkpoint(tmp_path / name / "checkpoint.msgpack")[1]["state"] for name in ("one", "two"))
    assert json.loads((tmp_path / "two" / "config.json").read_text())["framework"]["devices"] == 2
    assert two["variables"]["params"]["conv1"]["kernel"].dtype == np.float64
    assert_same_state(two["variables"], one["variables"])  # BatchNorm over the whole batch included
    assert_same_state(two["optimizer"], one["optimizer"])


def test_the_split_merge_form_compare_py_times_takes_the_same_steps(synthetic_mnist):
    """benchmarks/nnx_trainer.py's two forms of the step, `nnx.jit` (what nnx_impl.train runs) and
    Flax's functional split/merge: the same body compiled through either path, so 8 steps leave
    the same weights, statistics and step count to the bit; compare.py's rows time one computation."""
    from benchmarks.nnx_trainer import NnxTrainer

    plan = plan_epoch(0, 1, len(synthetic_mnist.train_labels), 128, BEST.augmentation).head(4 * 128)
    settings = RunSettings(BEST, device="cpu", ops="fast")
    trainers = [NnxTrainer(settings, plan, form) for form in ("nnx.jit", "split/merge")]
    for trainer in trainers:
        for _ in range(2):
            trainer.train_epoch(plan, synthetic_mnist.train_images, synthetic_mnist.train_labels)
    assert [int(trainer.optimizer.step[...]) for trainer in trainers] == [8, 8]
    for ours, theirs in zip(*(jax.tree_util.tree_leaves(variables_of(trainer.model)) for trainer in trainers),
                            strict=True):
        np.testing.assert_array_equal(ours, theirs)
