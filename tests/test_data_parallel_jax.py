"""JAX data parallelism (jax_impl.distributed): N devices, or N processes, compute what one device
computes, because the step is the same program over a global batch that is only stored in parts.

Why every comparison here is in float64: with the batch split, each device sums its part and
XLA adds the parts, so every batch mean (loss, gradients, BatchNorm statistics) is summed in
another order than on one device; two processes also run their thread pools apart, and which
kernel XLA or oneDNN picks depends on the CPU's instruction set (AVX2, AVX-512). In float32 a
reordering changes a result by ~1e-7, and such a change can flip a near-tie of a max-pool window
or a ReLU, which moves a gradient by a discrete amount; a few steps later the float32 runs of
two set-ups are apart by an amount no bound derived from the rounding covers (measurements in
docs/tolerances.md), though neither is wrong, as the parity suite found for PyTorch against JAX.
In float64 a reordering changes a result by ~1e-16 relative, and a tie would have to lie within
that of flipping, which none of the few million comparisons of these runs comes near: the
differences stay at a few roundings amplified by the steps' growth. Bound: 1e-10 of each
tensor's norm, six orders above one step's reordering (~1e-16) and so room for 20 steps of
amplification, while a real difference, such as BatchNorm statistics of each device's or
process's part of the batch instead of the global batch, moves the running means by percents
(tests/test_data_parallel_torch.py; the mutation batchnorm_statistics_per_process).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from common.batching import plan_epoch
from common.errors import UserFacingError
from common.recipes import SEED
from jax_impl import data
from jax_impl.checkpoints import read_checkpoint
from jax_impl.devices import select_devices
from jax_impl.distributed import data_mesh, put_replicated, replicated, split_along
from jax_impl.fast.choice import layers_for
from jax_impl.train import main
from jax_impl.training import scan_epoch, train_epoch, train_step
from nnx_impl.checkpoints import read_checkpoint as read_nnx_checkpoint
from tests.float64_jax_train import in_float64
from tests.float64_jax_train import main as float64_main
from tests.frameworks import new_jax_state

REPO = Path(__file__).resolve().parent.parent
STEPS, BATCH = 20, 32
RELATIVE = 1e-10  # of a tensor's norm, in float64 (module docstring)


@pytest.fixture
def float64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def train_20_steps(mnist, devices: int, ops: str, epoch: str = "loop") -> tuple[np.ndarray, dict]:
    """20 steps of the seed recipe as jax_impl.train runs them on `devices` devices (a mesh, the
    state replicated, each batch split), the state in float64 (the float32 images and every
    computation on them follow the weights' dtype). Returns each step's mean loss and the state."""
    recipe = SEED.with_overrides(batch_size=BATCH)
    plan = plan_epoch(0, 1, len(mnist.train_labels), BATCH, recipe.augmentation).head(STEPS * BATCH)
    mesh = data_mesh(select_devices("cpu", devices))
    whole = replicated(mesh)
    state, key = new_jax_state(recipe, STEPS, layers_for(ops))
    state, key = put_replicated((in_float64(state), key), whole)
    assert len(state.params["conv1"]["kernel"].sharding.device_set) == devices
    losses = []
    if epoch == "loop":
        step = jax.jit(train_step, donate_argnums=0, out_shardings=whole)
        batches = data.host_batches(plan, mnist.train_images, mnist.train_labels, split_along(mesh, 0))
        state = train_epoch(step, state, key, batches,
                            lambda images, metrics: losses.append(float(metrics["loss_sum"]) / images))
    else:
        scan = jax.jit(scan_epoch, static_argnames="crop_size", donate_argnums=0, out_shardings=whole)
        images, labels = data.resident_data(whole)(mnist.train_images, mnist.train_labels)
        for _, draws in data.scan_blocks(plan, split_along(mesh, 1)):
            state, metrics = scan(state, key, images, labels, *draws, crop_size=plan.crop_size)
            losses.extend(np.asarray(metrics["loss_sum"]) / BATCH)
    return np.array(losses), jax.device_get(state)


def assert_same_state(ours, theirs, relative: float = RELATIVE) -> None:
    for (path, mine), (_, other) in zip(jax.tree_util.tree_leaves_with_path(ours),
                                        jax.tree_util.tree_leaves_with_path(theirs), strict=True):
        difference = np.linalg.norm(np.asarray(mine, np.float64) - other) / max(np.linalg.norm(other), 1e-30)
        assert difference <= relative, (jax.tree_util.keystr(path), difference)


@pytest.mark.slow
def test_2_and_4_devices_take_the_steps_of_one_device(synthetic_mnist, float64):
    """The CPU's path: the step loop with the fast layers (custom gradients included)."""
    losses, state = train_20_steps(synthetic_mnist, 1, "fast")
    assert state.params["conv1"]["kernel"].dtype == np.float64
    assert losses[-1] < 0.9 * losses[0]  # it trains
    for devices in (2, 4):
        split_losses, split_state = train_20_steps(synthetic_mnist, devices, "fast")
        np.testing.assert_allclose(split_losses, losses, rtol=RELATIVE)
        assert int(split_state.step) == STEPS
        assert_same_state(split_state.params, state.params)
        assert_same_state(split_state.batch_stats, state.batch_stats)  # global-batch BatchNorm
        assert_same_state(split_state.opt_state, state.opt_state)


def test_the_scan_epoch_splits_batches_too(synthetic_mnist, float64):
    """The accelerators' path: one lax.scan per epoch over device-resident data, plain layers."""
    losses, state = train_20_steps(synthetic_mnist, 1, "plain", epoch="scan")
    split_losses, split_state = train_20_steps(synthetic_mnist, 2, "plain", epoch="scan")
    np.testing.assert_allclose(split_losses, losses, rtol=RELATIVE)
    assert_same_state(split_state.params, state.params)
    assert_same_state(split_state.batch_stats, state.batch_stats)


def test_batches_that_do_not_split_evenly_are_refused_before_training(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "uneven"
    assert main(["--dry-run", "--devices", "4", "--batch-size", "30", "--data-dir", str(synthetic_dir),
                 "--out", str(out)]) == 2
    assert "but batch size 30 cannot be cut into 4 equal parts" in capsys.readouterr().err
    assert not out.exists()


def test_more_devices_than_jax_has_is_a_clear_error():
    with pytest.raises(UserFacingError, match="jax_num_cpu_devices"):
        select_devices("cpu", 64)


def dry_run_parts(out: Path, twin: str) -> dict:
    """The weights, statistics and optimiser state of a dry run's checkpoint, by the linen names."""
    if twin == "nnx":
        state = read_nnx_checkpoint(out / "checkpoint.msgpack")[1]["state"]
        return {**state["variables"], "opt_state": state["optimizer"]}
    state = read_checkpoint(out / "checkpoint.msgpack")[1]["state"]
    return {part: state[part] for part in ("params", "batch_stats", "opt_state")}


@pytest.mark.slow
@pytest.mark.parametrize("twin", ["jax", "nnx"])
def test_a_dry_run_on_2_processes_equals_one_on_one_device(synthetic_dir, tmp_path, twin):
    """Two processes joined by jax.distributed (CPU collectives over gloo), each feeding its
    half of every batch, against one process on one device: the artefacts are written once, by
    process 0, and hold the same weights. Both run the trainer (the linen or the NNX one) with
    its state in float64 (tests/float64_jax_train.py), held to the module's bound. With the plain
    layers, which `--ops auto` picks on the accelerators that multi-process runs are for (the fast
    layers' sharding is the same and is tested on several devices of one process above)."""
    common = ["--dry-run", "--ops", "plain", "--data-dir", str(synthetic_dir), "--device", "cpu"]
    assert float64_main([*common, "--out", str(tmp_path / "one-device")], twin) == 0

    port = 12000 + os.getpid() % 20000 + (1 if twin == "nnx" else 0)
    processes = [subprocess.Popen(
        [sys.executable, "-m", "tests.float64_jax_train", *(["--nnx"] if twin == "nnx" else []), *common,
         "--out", str(tmp_path / f"written-by-{index}")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
             "JAX_PROCESS_ID": str(index), "JAX_PLATFORMS": "cpu"}) for index in range(2)]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert "devices 2, processes 2" in outputs[0]
    assert not (tmp_path / "written-by-1").exists(), "process 1 wrote artefacts"

    one_device, two_processes = (dry_run_parts(tmp_path / name, twin) for name in ("one-device", "written-by-0"))
    assert two_processes["params"]["conv1"]["kernel"].dtype == np.float64
    for part in ("params", "batch_stats", "opt_state"):
        assert_same_state(two_processes[part], one_device[part])
    assert (tmp_path / "written-by-0" / "curves.png").exists()
