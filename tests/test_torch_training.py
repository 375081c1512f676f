"""torch_ref.train end to end on the real data: dry run, artefacts, checkpoints, resume, errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from common.batching import plan_epoch, train_batches
from common.cli import build_parser
from common.errors import CheckpointError, TrainingDivergedError
from common.metrics import read_metrics
from common.progress import EpochProgress
from common.recipes import BEST, DEFAULT_RECIPE, SEED, get_recipe
from common.system import cpu_name, usable_cpu_count
from tests.frameworks import TORCH, new_torch_state
from torch_ref import data
from torch_ref.checkpoints import read_checkpoint, read_weights, restore
from torch_ref.evaluate import predict_with_weights
from torch_ref.train import HELP, main
from torch_ref.training import predict


def train(args, data_dir) -> int:
    return main([*args, "--data-dir", str(data_dir), "--threads", "1"])


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, synthetic_dir):
    out = tmp_path_factory.mktemp("runs") / "dry"
    assert train(["--dry-run", "--out", str(out), "--save-model"], synthetic_dir) == 0
    return out


def test_dry_run_writes_every_artefact(dry_run):
    names = {p.name for p in dry_run.iterdir()}
    assert {"metrics.jsonl", "curves.png", "samples.png", "misclassified.png", "config.json",
            "checkpoint.pt", "model.pt"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    history = read_metrics(dry_run / "metrics.jsonl")
    assert [r.epoch for r in history] == [1, 2]
    for record in history:
        values = dataclasses.asdict(record).values()
        assert all(np.isfinite(v) for v in values)
        assert 0 <= record.test_accuracy <= 100
    # The default recipe's OneCycle starts at lr / div_factor and warms up from there.
    default = get_recipe(DEFAULT_RECIPE)
    assert history[0].lr == pytest.approx(default.lr / default.schedule.div_factor) and history[1].lr > history[0].lr
    config = json.loads((dry_run / "config.json").read_text())
    assert config["recipe"]["name"] == DEFAULT_RECIPE and config["seed"] == 0 and config["dry_run"] is True
    assert config["machine"]["cpu"] == cpu_name() and config["machine"]["usable_cores"] == usable_cpu_count()


def test_checkpoint_restores_the_run_into_a_state_seeded_otherwise(dry_run, synthetic_mnist):
    """A state created from another seed holds other weights until it restores the checkpoint;
    then it holds the run's: its predictions equal those of the run's model.pt (written by
    --save-model) evaluated without a training state, its momentum buffers are the
    checkpoint's, and its schedule continues where the run stopped (still warming up, past the
    last logged epoch's lr), not at a fresh state's starting lr."""

    meta, payload = read_checkpoint(dry_run / "checkpoint.pt")
    assert meta["epoch"] == 2 and len(meta["history"]) == 2
    cpu = torch.device("cpu")
    images = (synthetic_mnist.test_images[:100] / 255.0).astype(np.float32)
    state = new_torch_state(BEST, 3, seed=5)
    before = predict(state.model, images, 50, cpu)
    restore(state, read_checkpoint(dry_run / "checkpoint.pt")[1])
    restored = predict(state.model, images, 50, cpu)
    assert not np.allclose(before, restored, atol=1e-3)
    np.testing.assert_array_equal(restored, predict_with_weights(read_weights(dry_run / "model.pt"), images, 50,
                                                                 device="cpu"))
    # One buffer per parameter: 6 convolution kernels, 5 BatchNorm weights and 5 biases.
    saved_buffers = [entry["momentum_buffer"] for entry in payload["optimizer"]["state"].values()]
    ours = [state.optimizer.state[p]["momentum_buffer"] for p in state.model.parameters()]
    assert len(ours) == len(saved_buffers) == 16 and all(buffer.abs().sum() > 0 for buffer in saved_buffers)
    for mine, saved in zip(ours, saved_buffers, strict=True):
        assert torch.equal(mine, saved)
    assert torch.equal(state.rng, payload["rng"])
    assert state.optimizer.param_groups[0]["lr"] > meta["history"][-1]["lr"] > BEST.lr / BEST.schedule.div_factor


def test_fast_ops_is_channels_last_with_the_same_predictions(dry_run, synthetic_mnist):
    """--ops fast: the same weights in channels_last memory; float64 so that the two layouts'
    different summation orders leave ~1e-15, and 1e-12 proves the same function."""

    _, payload = read_checkpoint(dry_run / "checkpoint.pt")
    images = (synthetic_mnist.test_images[:64] / 255.0).astype(np.float64)
    outputs = {}
    for ops in ("plain", "fast"):
        state = new_torch_state(BEST, 4, ops=ops)
        restore(state, payload)
        model = state.model
        assert model.conv2.weight.is_contiguous(memory_format=torch.channels_last) == (ops == "fast")
        model.double().eval()
        with torch.no_grad():
            outputs[ops] = model(torch.from_numpy(images[:, None])).numpy()
    np.testing.assert_allclose(outputs["fast"], outputs["plain"], rtol=1e-12, atol=1e-12)


def test_saved_model_loads_into_the_original_architecture(dry_run):

    from torch_ref.model import Net

    Net().load_state_dict(torch.load(dry_run / "model.pt", weights_only=True), strict=True)


def test_resume_continues_exactly_where_an_interrupted_run_stopped(tmp_path, synthetic_dir, dry_run, monkeypatch):
    out = tmp_path / "interrupted"
    TORCH.interrupt_after(1, monkeypatch)
    assert train(["--dry-run", "--out", str(out)], synthetic_dir) == 130
    monkeypatch.undo()
    assert [r.epoch for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert train(["--dry-run", "--resume", str(out)], synthetic_dir) == 0
    resumed, uninterrupted = read_metrics(out / "metrics.jsonl"), read_metrics(dry_run / "metrics.jsonl")
    # Same batches, weights, optimizer state and dropout RNG: the same numbers (timings aside).
    assert [(r.train_loss, r.test_loss, r.test_accuracy) for r in resumed] == \
        [(r.train_loss, r.test_loss, r.test_accuracy) for r in uninterrupted]


def test_resume_refuses_a_different_recipe(dry_run, synthetic_dir, capsys):
    assert train(["--resume", str(dry_run), "--lr", "0.1"], synthetic_dir) == 2
    assert "--lr 0.1 (checkpoint: 0.2)" in capsys.readouterr().err


def test_existing_checkpoint_is_never_overwritten(dry_run, synthetic_dir, capsys):
    before = (dry_run / "checkpoint.pt").read_bytes()
    assert train(["--dry-run", "--out", str(dry_run)], synthetic_dir) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (dry_run / "checkpoint.pt").read_bytes() == before


def test_truncated_checkpoint_gives_a_clear_error_and_stays_as_it_is(dry_run, tmp_path, synthetic_dir, capsys):
    broken = tmp_path / "checkpoint.pt"
    broken.write_bytes((dry_run / "checkpoint.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(broken)
    assert train(["--resume", str(broken)], synthetic_dir) == 2
    assert "cannot be read as a PyTorch checkpoint" in capsys.readouterr().err
    assert len(broken.read_bytes()) == 5000


def test_diverging_loss_stops_with_a_clear_error(tmp_path, synthetic_dir, capsys):
    out = tmp_path / "diverged"
    assert train(["--dry-run", "--lr", "1e30", "--out", str(out)], synthetic_dir) == 2
    assert "the training loss became nan" in capsys.readouterr().err.lower()
    assert not (out / "checkpoint.pt").exists()


def test_progress_rejects_non_finite_loss():
    progress = EpochProgress(1, 1, 100, enabled=False)
    progress.update(50, 10.0, 40)
    with pytest.raises(TrainingDivergedError, match="after 100 images"):
        progress.update(50, float("inf"), 0)


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "'-1' is not a positive number"),
    (["--epochs", "0"], "'0' is not a positive integer"),
    (["--momentum", "1.5"], "is not a number in [0, 1)"),
    (["--device", "tpu9"], "invalid choice"),
    (["--ops", "turbo"], "invalid choice"),
    (["--devices", "0"], "'0' is not a positive integer or 'all'"),
    (["--devices", "some"], "'some' is not a positive integer or 'all'"),
    (["--recipe", "nope"], "invalid choice"),
])
def test_bad_flags_are_rejected_by_the_parser(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser("PyTorch", "torch_ref.train", HELP).parse_args(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_explains_every_flag():
    parser = build_parser("PyTorch", "torch_ref.train", HELP)
    expected = {"--recipe", "--epochs", "--batch-size", "--test-batch-size", "--lr", "--momentum", "--recalibrate-bn",
                "--average", "--ema-decay", "--swa-start", "--seed",
                "--data-dir", "--data-source", "--out", "--dry-run", "--device", "--ops", "--devices", "--threads",
                "--save-model", "--resume", "--seeds", "--validation"}
    options = {a.option_strings[-1]: a for a in parser._actions if a.option_strings and a.dest != "help"}
    assert set(options) == expected
    assert all(len(action.help) > 20 for action in options.values())


def test_device_augmentation_is_bit_identical_to_the_core(synthetic_mnist):
    """torch_ref.augment (used when MNIST is resident on a GPU), run here on CPU tensors."""

    from common.transforms import augment as core_augment
    from common.transforms import normalize
    from torch_ref import augment

    every_draw = dataclasses.replace(SEED.augmentation, max_translation=2, max_scale=0.2)  # shifts, zooms too
    plan = plan_epoch(0, 1, len(synthetic_mnist.train_labels), 512, every_draw)
    positions = slice(0, 512)
    images = synthetic_mnist.train_images[plan.order[positions]]
    crop = plan.crop[positions] | (np.arange(512) % 2 == 0)  # both paths exercised
    source = plan.source_index(positions)
    expected = core_augment(images, crop, source, 22)
    ours = augment.augment(torch.as_tensor(images), torch.as_tensor(crop), torch.as_tensor(source.astype(np.int16)), 22)
    np.testing.assert_array_equal(ours.numpy(), expected)
    np.testing.assert_array_equal(augment.normalize(ours).numpy(), normalize(expected))


def test_gpu_resident_batches_equal_host_batches(synthetic_mnist):
    """The GPU path's batches (device-resident data, device augmentation), run on CPU tensors,
    are exactly the host pipeline's."""


    plan = plan_epoch(0, 1, len(synthetic_mnist.train_labels), 100, SEED.augmentation).head(250)
    cpu = torch.device("cpu")
    host = list(data.host_batches(plan, synthetic_mnist.train_images, synthetic_mnist.train_labels, cpu))
    resident_data = data.resident_data(cpu)(synthetic_mnist.train_images, synthetic_mnist.train_labels)
    resident = list(data.resident_batches(plan, *resident_data))
    assert len(host) == len(resident) == 3
    for (host_x, host_y), (dev_x, dev_y) in zip(host, resident, strict=True):
        assert torch.equal(host_x, dev_x) and torch.equal(host_y, dev_y)


def test_host_batches_come_through_a_dataloader_and_leave_the_dropout_stream_alone(synthetic_mnist):
    """The DataLoader serves the plan's batches, and draws nothing from torch's global random
    stream, which the dropout masks come from."""
    plan = plan_epoch(0, 1, len(synthetic_mnist.train_labels), 64, SEED.augmentation).head(64 * 2 + 10)
    torch.manual_seed(0)
    served = list(data.host_batches(plan, synthetic_mnist.train_images, synthetic_mnist.train_labels,
                                    torch.device("cpu")))
    after_the_epoch = torch.rand(4)
    torch.manual_seed(0)
    np.testing.assert_array_equal(after_the_epoch.numpy(), torch.rand(4).numpy())
    assert isinstance(data.EpochBatches(plan, synthetic_mnist.train_images, synthetic_mnist.train_labels),
                      torch.utils.data.Dataset)
    expected = list(train_batches(plan, synthetic_mnist.train_images, synthetic_mnist.train_labels))
    assert [len(labels) for _, labels in served] == [64, 64, 10]
    for (inputs, labels), batch in zip(served, expected, strict=True):
        assert inputs.shape == (len(batch.labels), 1, 28, 28) and labels.dtype == torch.int64
        np.testing.assert_array_equal(inputs[:, 0].numpy(), batch.images)
        np.testing.assert_array_equal(labels.numpy(), batch.labels)


def test_seeds_train_in_turn_each_as_alone_with_a_summary(tmp_path, synthetic_dir):
    """--seeds 1,2: each seed's run is the run of that seed alone (its own seed and random
    stream), bit for bit, and the summary covers both."""
    out = tmp_path / "seeds"
    assert train(["--dry-run", "--seeds", "1,2", "--validation", "--out", str(out)], synthetic_dir) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [1, 2] and summary["evaluated_on"] == "validation"
    assert [read_checkpoint(out / f"seed{s}" / "checkpoint.pt")[0]["settings"]["seed"] for s in (1, 2)] == [1, 2]
    assert train(["--dry-run", "--seed", "2", "--validation", "--out", str(tmp_path / "alone")], synthetic_dir) == 0
    ours, theirs = (read_checkpoint(run / "checkpoint.pt")[1]["model"] for run in (out / "seed2", tmp_path / "alone"))
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_seeds_and_resume_do_not_mix(dry_run, synthetic_dir, capsys):
    assert train(["--seeds", "0,1", "--resume", str(dry_run)], synthetic_dir) == 2
    assert "cannot be combined" in capsys.readouterr().err


def test_validation_split_holds_out_the_last_twelfth_of_the_training_images(synthetic_mnist):
    from common.mnist import Mnist, validation_split

    split = validation_split(synthetic_mnist)
    assert len(split.train_labels) == 587 and len(split.test_labels) == 53  # 640 / 12 = 53.3
    np.testing.assert_array_equal(split.test_images, synthetic_mnist.train_images[587:])
    np.testing.assert_array_equal(split.train_labels, synthetic_mnist.train_labels[:587])
    mnist_sized = Mnist(*(np.zeros((count, 1, 1)) for count in (60000, 60000, 10000, 10000)))
    assert [len(part) for part in validation_split(mnist_sized)] == [55000, 55000, 5000, 5000]
