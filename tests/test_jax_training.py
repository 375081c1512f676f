"""jax_impl's training: steps, schedule, device augmentation, epochs, CLI, checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_impl.train
from common.batching import plan_epoch
from common.cli import DRY_RUN_TRAIN_BATCHES
from common.errors import CheckpointError
from common.metrics import read_metrics
from common.processes import SINGLE_PROCESS
from common.recipes import DEFAULT_RECIPE, SEED, get_recipe
from common.settings import RunSettings
from common.system import cpu_name, cpu_vector_extensions
from common.transforms import augment as core_augment
from common.transforms import normalize as core_normalize
from jax_impl import augment, data
from jax_impl.checkpoints import read_checkpoint, read_weights, restore
from jax_impl.distributed import data_mesh, replicated, split_along
from jax_impl.evaluate import predict_with_weights
from jax_impl.fast.choice import layers_for
from jax_impl.fast.heaps import CPU_HEAP_BYTES, CPU_HEAP_MAX_BATCH, step_compiler_options
from jax_impl.optim import learning_rate_schedule
from jax_impl.seeds import train_vmapped
from jax_impl.train import main
from jax_impl.training import (
    eval_step,
    evaluated_variables_of,
    predict,
    scan_epoch,
    train_epoch,
    train_step,
    variables_of,
)
from tests.float64_jax_train import float64_training, in_float64
from tests.frameworks import new_jax_state

REPO = Path(__file__).resolve().parent.parent
jit_train_step = jax.jit(train_step)
jit_eval_step = jax.jit(eval_step, static_argnums=0)


def small_batch(seed=0, count=32):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(count, 28, 28, 1)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 10, count).astype(np.int32))
    return images, labels


def test_jitted_step_lowers_the_loss_on_a_fixed_batch():
    # 32 noise images with random labels, the seed's lr: memorising them takes ~40 steps (loss
    # 2.32 -> 0.18, a factor 13); dropout stays on, and another CPU's rounding takes another
    # trajectory, so ask only for a 4x drop, which memorising does on any trajectory.
    state, _ = new_jax_state(SEED, 10)
    batch, key = small_batch(), jax.random.key(1)
    losses = []
    for _ in range(40):
        state, metrics = jit_train_step(state, batch, key)
        losses.append(float(metrics["loss_sum"]) / 32)
    assert int(state.step) == 40
    assert losses[-1] < 0.25 * losses[0]


# jaxlib cannot store a program of several heaps in the persistent compilation cache, and says so.
@pytest.mark.filterwarnings("ignore:Error writing persistent compilation cache entry")
def test_temporaries_cut_into_heaps_change_no_bit_of_the_step():
    # step_compiler_options moves the step's temporaries, not its arithmetic. At batch 32 they
    # take 6 MB; heaps of 2 MiB cut them in three (so the buffer assignment grows), as 24 MiB
    # heaps cut the 97 MB of batch 512 in four. Same kernels in the same order: equal bits.
    batch, key = small_batch(), jax.random.key(1)
    temporaries, ends = [], []
    for options in ({}, {"xla_multiheap_size_constraint_per_heap": 2 * 2**20}):
        state, _ = new_jax_state(SEED, 10, layers=layers_for("fast"))
        step = jax.jit(train_step, compiler_options=options)
        temporaries.append(step.lower(state, batch, key).compile().memory_analysis().temp_size_in_bytes)
        for _ in range(2):
            state, metrics = step(state, batch, key)
        ends.append(jax.tree_util.tree_leaves((state, metrics)))
    assert temporaries[1] > temporaries[0]
    for default, in_heaps in zip(*ends, strict=True):
        np.testing.assert_array_equal(default, in_heaps)


def test_step_compiler_options_only_where_they_help():
    options = step_compiler_options("cpu", CPU_HEAP_MAX_BATCH)
    assert options["xla_multiheap_size_constraint_per_heap"] < 32 * 2**20  # glibc reuses blocks up to 32 MiB
    assert step_compiler_options("cpu", CPU_HEAP_MAX_BATCH + 1) == {}  # a buffer would outgrow its heap
    assert step_compiler_options("gpu", 128) == step_compiler_options("tpu", 128) == {}


def test_the_epoch_loop_prepares_the_next_batch_before_it_waits_for_a_step():
    """train_epoch's order of work: batch i + 1 is drawn from the (host) iterator right after
    step i is queued and before any metrics are read, so the host's batch preparation overlaps
    the device's step; step i's metrics are read one step behind. A recording step stands in
    for the compiled one."""
    events = []

    def batches():
        for index in range(3):
            events.append(f"prepare {index}")
            yield np.zeros((2, 28, 28, 1), np.float32), np.full(2 + index, index)

    def step(state, batch, key):
        index = int(batch[1][0])
        events.append(f"step {index}")
        return state + 1, {"index": index}

    def report(count, metrics):
        events.append(f"read {metrics['index']} of {count}")

    final = train_epoch(step, 0, None, batches(), report)
    assert final == 3
    assert events == ["prepare 0", "step 0", "prepare 1", "step 1", "prepare 2", "read 0 of 2",
                      "step 2", "read 1 of 3", "read 2 of 4"]


def test_step_rejects_wrong_layouts_and_dtypes_at_trace_time():
    state, _ = new_jax_state(SEED, 10)
    images, labels = small_batch()
    with pytest.raises(AssertionError):
        jit_train_step(state, (images.transpose(0, 3, 1, 2), labels), jax.random.key(1))  # NCHW
    with pytest.raises(AssertionError):
        jit_train_step(state, (images, labels.astype(jnp.float32)), jax.random.key(1))


def test_eval_is_deterministic():
    state, _ = new_jax_state(SEED, 10)
    images, _ = small_batch()
    variables = variables_of(state)
    np.testing.assert_array_equal(jit_eval_step(state.apply_fn, variables, images),
                                  jit_eval_step(state.apply_fn, variables, images))


def test_step_schedule_is_steplr_per_epoch():
    schedule = learning_rate_schedule(SEED, steps_per_epoch=235)
    for step, expected in [(0, 0.04), (235 * 10 - 1, 0.04), (235 * 10, 0.004), (235 * 15 - 1, 0.004)]:
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-6)  # float32 schedule


def test_device_augmentation_is_bit_identical_to_the_core(synthetic_mnist):
    every_draw = dataclasses.replace(SEED.augmentation, max_translation=2, max_scale=0.2)  # shifts, zooms too
    plan = plan_epoch(0, 1, len(synthetic_mnist.train_labels), 512, every_draw)
    positions = slice(0, 512)
    images = synthetic_mnist.train_images[plan.order[positions]]
    # Force crops on half of the batch so both paths are exercised.
    crop = plan.crop[positions] | (np.arange(512) % 2 == 0)
    source = plan.source_index(positions)
    expected = core_augment(images, crop, source, 22)
    device = jax.jit(augment.augment, static_argnums=3)(images, crop, source.astype(np.int16), 22)
    np.testing.assert_array_equal(np.asarray(device), expected)
    np.testing.assert_array_equal(np.asarray(augment.normalize(device)), core_normalize(expected))


@pytest.mark.slow
def test_scan_epoch_and_step_loop_train_the_same(synthetic_mnist):
    """The two epoch functions see the same batches, draws and masks. In float64 (weights and
    statistics; the inputs are exact float32 values) they differ only by the order of float
    reductions inside and outside `scan`: 1e-9 relative after 4 steps leaves room for the
    growth of 1e-16 rounding differences through training, and catches any real difference.
    With an EMA (decay 0.5, so every step counts), the average taken inside the step too."""
    plan = plan_epoch(0, 1, len(synthetic_mnist.train_labels), 64, SEED.augmentation).head(64 * 3 + 40)
    recipe = SEED.with_overrides(average="ema", ema_decay=0.5)
    mesh = data_mesh(jax.devices("cpu")[:1])
    results = []
    jax.config.update("jax_enable_x64", True)
    try:
        for kind in ("loop", "scan"):
            state, key = new_jax_state(recipe, 4, layers_for("fast"))
            state, sums = in_float64(state), []
            if kind == "loop":
                batches = data.host_batches(plan, synthetic_mnist.train_images, synthetic_mnist.train_labels,
                                            split_along(mesh, 0))
                state = train_epoch(jax.jit(train_step), state, key, batches,
                                    lambda _, metrics, sums=sums: sums.append(metrics))
            else:
                images, labels = data.resident_data(replicated(mesh))(synthetic_mnist.train_images,
                                                                     synthetic_mnist.train_labels)
                for _, draws in data.scan_blocks(plan, split_along(mesh, 1)):
                    state, metrics = jax.jit(scan_epoch, static_argnames="crop_size")(
                        state, key, images, labels, *draws, crop_size=plan.crop_size)
                    sums.append(metrics)
            loss = sum(float(np.sum(metrics["loss_sum"])) for metrics in sums) / len(plan.order)
            results.append((state, loss, sum(int(np.sum(metrics["correct"])) for metrics in sums)))
    finally:
        jax.config.update("jax_enable_x64", False)
    (loop_state, loop_loss, loop_correct), (scan_state, scan_loss, scan_correct) = results
    assert int(loop_state.step) == int(scan_state.step) == 4
    assert scan_correct == loop_correct
    assert scan_loss == pytest.approx(loop_loss, rel=1e-9)
    assert int(loop_state.averaged.count) == int(scan_state.averaged.count) == 4

    def trained_and_averaged(state):
        return jax.tree_util.tree_leaves((state.params, state.batch_stats, state.averaged.variables))

    for a, b in zip(trained_and_averaged(loop_state), trained_and_averaged(scan_state), strict=True):
        assert a.dtype == jnp.float64
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def train(args, data_dir) -> int:
    return main([*args, "--data-dir", str(data_dir)])


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, synthetic_dir):
    out = tmp_path_factory.mktemp("runs") / "dry"
    assert train(["--dry-run", "--out", str(out), "--save-model"], synthetic_dir) == 0
    return out


def test_dry_run_writes_the_same_artefacts_as_torch_ref(dry_run):
    names = {p.name for p in dry_run.iterdir()}
    assert {"metrics.jsonl", "curves.png", "samples.png", "misclassified.png", "config.json",
            "checkpoint.msgpack", "model.msgpack"} <= names
    history = read_metrics(dry_run / "metrics.jsonl")
    assert [r.epoch for r in history] == [1, 2]
    # The default recipe's OneCycle starts at lr / div_factor and warms up from there.
    default = get_recipe(DEFAULT_RECIPE)
    assert history[0].lr == pytest.approx(default.lr / default.schedule.div_factor) and history[1].lr > history[0].lr
    assert history[0].compile_seconds > 0
    config = json.loads((dry_run / "config.json").read_text())
    assert config["framework"]["framework"] == "JAX" and config["recipe"]["name"] == DEFAULT_RECIPE
    assert config["ops"] == "auto" and config["framework"]["ops"] == "fast"  # auto on the CPU
    assert config["framework"]["xla_flags"] == os.environ.get("XLA_FLAGS", "")
    assert default.batch_size <= CPU_HEAP_MAX_BATCH  # so the CPU's step was compiled in heaps
    assert config["framework"]["step_compiler_options"] == {"xla_multiheap_size_constraint_per_heap": CPU_HEAP_BYTES}
    assert config["machine"]["cpu"] == cpu_name() and config["machine"]["vector_extensions"] == cpu_vector_extensions()


def test_ops_flag_picks_the_layers_and_config_records_them(tmp_path, synthetic_dir):
    out = tmp_path / "plain"
    assert train(["--dry-run", "--ops", "plain", "--out", str(out)], synthetic_dir) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["ops"] == "plain" and config["framework"]["ops"] == "plain"


@pytest.fixture
def without_affinity_calls(monkeypatch):
    """This OS as macOS and Windows are: no os.sched_getaffinity, no os.sched_setaffinity."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.delattr(os, "sched_setaffinity", raising=False)


def test_dry_run_works_without_linux_affinity_calls(without_affinity_calls, tmp_path, synthetic_dir):
    out = tmp_path / "portable"
    assert train(["--dry-run", "--out", str(out)], synthetic_dir) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["framework"]["threads"] == os.cpu_count()


def test_threads_says_where_it_cannot_work(without_affinity_calls, tmp_path, synthetic_dir, capsys):
    out = tmp_path / "threads"
    assert train(["--dry-run", "--threads", "1", "--out", str(out)], synthetic_dir) == 2
    assert "only Linux lets a program choose them" in capsys.readouterr().err
    assert not (out / "checkpoint.msgpack").exists()


def test_a_checkpoint_with_averaged_weights_does_not_restore_into_a_recipe_without(dry_run):
    """The default recipe's checkpoint holds an SWA average; flax's from_state_dict would keep it
    beside a state that has none, so the restore counts the arrays and says what differs."""
    _, payload = read_checkpoint(dry_run / "checkpoint.msgpack")
    state, _ = new_jax_state(get_recipe("best"), 3, layers_for("fast"), seed=5)
    with pytest.raises(CheckpointError, match="weight averaging"):
        restore(state, payload)


def test_checkpoint_restores_the_run_into_a_state_seeded_otherwise(dry_run, synthetic_mnist):
    """A state created from another seed holds other weights until it restores the checkpoint;
    then it holds the run's: its predictions equal those of the run's model.msgpack (written by
    --save-model) evaluated without a training state, its step counts the run's steps, and its
    momentum buffers are the checkpoint's."""
    meta, payload = read_checkpoint(dry_run / "checkpoint.msgpack")
    assert meta["epoch"] == 2
    state, _ = new_jax_state(get_recipe(DEFAULT_RECIPE), 3, layers_for("fast"), seed=5)
    images = core_normalize(synthetic_mnist.test_images[:100])
    evaluate = jax.jit(functools.partial(eval_step, state.apply_fn))
    cpu = jax.devices("cpu")[0]
    before = predict(evaluate, evaluated_variables_of(state), images, 50, cpu)
    state = restore(state, payload)
    restored = predict(evaluate, evaluated_variables_of(state), images, 50, cpu)
    assert not np.allclose(before, restored, atol=1e-3)
    np.testing.assert_array_equal(restored, predict_with_weights(read_weights(dry_run / "model.msgpack"), images, 50,
                                                                 device="cpu"))
    assert int(state.step) == 2 * DRY_RUN_TRAIN_BATCHES  # two dry-run epochs (4 x 128 of the 640 images)
    saved_momentum = jax.tree_util.tree_leaves(payload["state"]["opt_state"])
    assert saved_momentum and all(np.abs(leaf).sum() > 0 for leaf in saved_momentum if np.ndim(leaf))
    for ours, saved in zip(jax.tree_util.tree_leaves(state.opt_state), saved_momentum, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(saved))


def test_resume_continues_exactly_where_an_interrupted_run_stopped(tmp_path, synthetic_dir, dry_run, monkeypatch):
    epochs_run = []

    def stops_after_one_epoch(*args):
        if epochs_run:
            raise KeyboardInterrupt
        epochs_run.append(1)
        return train_epoch(*args)

    out = tmp_path / "interrupted"
    monkeypatch.setattr(jax_impl.train, "train_epoch", stops_after_one_epoch)
    assert train(["--dry-run", "--out", str(out)], synthetic_dir) == 130
    monkeypatch.undo()
    assert train(["--dry-run", "--resume", str(out)], synthetic_dir) == 0
    resumed, uninterrupted = read_metrics(out / "metrics.jsonl"), read_metrics(dry_run / "metrics.jsonl")
    assert [(r.train_loss, r.test_loss, r.test_accuracy) for r in resumed] == \
        [(r.train_loss, r.test_loss, r.test_accuracy) for r in uninterrupted]


def test_truncated_checkpoint_is_reported_and_left_alone(dry_run, tmp_path, synthetic_dir, capsys):
    broken = tmp_path / "checkpoint.msgpack"
    broken.write_bytes((dry_run / "checkpoint.msgpack").read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(broken)
    assert train(["--resume", str(broken)], synthetic_dir) == 2
    assert "cannot be read as a JAX checkpoint" in capsys.readouterr().err
    assert len(broken.read_bytes()) == 3000


def test_a_torch_checkpoint_is_not_taken_for_a_jax_one(tmp_path, synthetic_dir, capsys):
    (tmp_path / "checkpoint.msgpack").write_bytes(b"PK\x03\x04 not msgpack")
    assert train(["--resume", str(tmp_path)], synthetic_dir) == 2
    assert "cannot be read as a JAX checkpoint" in capsys.readouterr().err


def help_text(module: str) -> str:
    """What a user sees for `python -m <module> --help`, with whitespace normalised (line
    wrapping depends on the length of the program's name)."""
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "100"}, timeout=120)
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())


def test_help_equals_torch_ref_word_for_word():
    """The two trainers' --help may differ only in the program's and the framework's names and
    in the framework's own notes (common.cli.FrameworkHelp), which each names in its train.py."""
    import torch_ref.train

    def general(text: str, module) -> str:
        for note in dataclasses.astuple(module.HELP):
            text = text.replace(" ".join(note.split()), "<note>")
        return text.replace(module.__name__, "<module>").replace(f" with {module.NAMES.title}.", " with <framework>.")

    ours = help_text("jax_impl.train")
    assert "--ops {auto,plain,fast}" in ours and "--resume PATH" in ours
    assert general(ours, jax_impl.train) == general(help_text("torch_ref.train"), torch_ref.train)


@pytest.mark.slow
def test_vmapped_seeds_follow_each_single_run(synthetic_dir, tmp_path):
    """The seeds as one vmapped program (what --seeds does on an accelerator; here forced on the
    CPU) against each seed's run alone: a dry run of two seeds, float64, so that only the
    batching of the vmapped convolutions can reorder sums: 1e-9 relative, as for the two epoch
    functions. Each seed's run directory and checkpoint are written as a run alone writes them."""
    settings = RunSettings(recipe=SEED.with_overrides(batch_size=64), data_dir=synthetic_dir, dry_run=True,
                           device="cpu", out=tmp_path / "group")
    with float64_training():
        group = train_vmapped(settings, (3, 5), SINGLE_PROCESS)
        alone = [jax_impl.train.train(dataclasses.replace(settings, seed=seed, out=tmp_path / f"alone{seed}"))
                 for seed in (3, 5)]
    assert json.loads((tmp_path / "group" / "summary.json").read_text())["seeds"] == [3, 5]
    for seed, history, single in zip((3, 5), group, alone, strict=True):
        assert len(history) == len(single) == 2
        for ours, theirs in zip(history, single, strict=True):
            assert ours.train_loss == pytest.approx(theirs.train_loss, rel=1e-9)
            assert ours.test_loss == pytest.approx(theirs.test_loss, rel=1e-9)
            assert ours.test_accuracy == theirs.test_accuracy
        ours = read_checkpoint(tmp_path / "group" / f"seed{seed}" / "checkpoint.msgpack")[1]["state"]
        theirs = read_checkpoint(tmp_path / f"alone{seed}" / "checkpoint.msgpack")[1]["state"]
        assert ours["params"]["conv1"]["kernel"].dtype == np.float64
        for a, b in zip(jax.tree_util.tree_leaves((ours["params"], ours["batch_stats"])),
                        jax.tree_util.tree_leaves((theirs["params"], theirs["batch_stats"])), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_seeds_flag_writes_one_run_per_seed_and_a_summary(tmp_path, synthetic_dir):
    out = tmp_path / "group"
    assert train(["--dry-run", "--seeds", "0,2", "--out", str(out)], synthetic_dir) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 2] and len(summary["final_accuracy"]) == 2
    for seed in (0, 2):
        meta, _ = read_checkpoint(out / f"seed{seed}" / "checkpoint.msgpack")
        assert meta["settings"]["seed"] == seed and meta["epoch"] == 2
    assert "| JAX seed 0 | JAX seed 2 |" in (out / "summary.md").read_text()
