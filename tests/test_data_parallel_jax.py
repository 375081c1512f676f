"""JAX data parallelism (jax_impl.devices): N devices, or N processes, compute what one device
computes, because the step is the same program over a global batch that is only stored in parts.

Why float64 for the N-devices-against-one comparison: with the batch split, each device sums
its part and XLA adds the parts, so every batch mean (loss, gradients, BatchNorm statistics)
is summed in another order than on one device. In float32 that changes results by ~1e-7, and
such a change can flip a near-tie of a max-pool window or a ReLU, which moves a gradient by a
discrete amount (measured on the synthetic data with the fast layers: 1.5e-3 of bn4's bias
after the first step for one dropout key; after 20 steps the losses differ by 10%). The float32
trajectories of 1 and N devices are then not close, though neither is wrong, as the parity
suite found for PyTorch against JAX. In float64 the reordering changes results by ~1e-16 and
no tie flips: 20 steps on 1, 2 and 4 devices agree within 1e-10 of each tensor's norm (one step
measured: ~1e-15), while per-device BatchNorm statistics move the running means by percents
(tests/test_data_parallel_torch.py).
Where the programs are the same, float32 runs are compared closely: 2 processes and 2 devices
in one process run the same partitioned step (an all-reduce of two numbers is exact whichever
comes first); they were measured equal, or one float32 ulp apart where the processes' thread
pools split a computation differently, and are held to 1e-5.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from common.batching import plan_epoch
from common.driver import main
from common.errors import UserFacingError
from common.framework import TrainerConfig
from common.recipes import SEED
from jax_impl.checkpoints import read_checkpoint
from jax_impl.devices import put_replicated, replicated
from jax_impl.seed_group import JaxSeedGroup
from jax_impl.train import FRAMEWORK

REPO = Path(__file__).resolve().parent.parent
STEPS, BATCH = 20, 32
RELATIVE = 1e-10  # of a tensor's norm, in float64 (module docstring)


class StepLosses:
    """Stands in for EpochProgress: keeps every step's mean loss."""

    def __init__(self):
        self.losses = []

    def update(self, images: int, loss_sum: float, correct: int) -> None:
        self.losses.append(loss_sum / images)


@pytest.fixture
def float64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def train_20_steps(data, devices: int, ops: str, epoch: str = "loop") -> tuple[np.ndarray, dict]:
    """20 steps of the seed recipe through the trainer's own seed group, its state in float64
    (the float32 images and every computation on them follow the weights' dtype)."""
    recipe = SEED.with_overrides(batch_size=BATCH)
    plan = plan_epoch(0, 1, len(data.train_labels), BATCH, recipe.augmentation).head(STEPS * BATCH)
    config = TrainerConfig(recipe, "cpu", None, steps_per_epoch=STEPS, ops=ops, devices=devices,
                           epoch_images=STEPS * BATCH)
    group = JaxSeedGroup(config, [0], epoch=epoch)
    in_float64 = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf, np.float64) if leaf.dtype == np.float32 else leaf,
                                        jax.device_get(group.state))
    group.state = put_replicated(in_float64, replicated(group.mesh))
    progress = StepLosses()
    group.train_epoch([plan], data.train_images, data.train_labels, [progress])
    assert group.describe()["devices"] == devices
    return np.array(progress.losses), group._seed(0, group.state)


def assert_same_state(ours, theirs, relative: float = RELATIVE) -> None:
    for (path, mine), (_, other) in zip(jax.tree_util.tree_leaves_with_path(ours),
                                        jax.tree_util.tree_leaves_with_path(theirs), strict=True):
        difference = np.linalg.norm(np.asarray(mine, np.float64) - other) / max(np.linalg.norm(other), 1e-30)
        assert difference <= relative, (jax.tree_util.keystr(path), difference)


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


def test_batches_that_do_not_split_evenly_are_refused_before_training():
    config = TrainerConfig(SEED.with_overrides(batch_size=32), "cpu", None, steps_per_epoch=3, devices=4,
                           epoch_images=90)
    with pytest.raises(UserFacingError, match="--devices 4: .*the epoch's last batch of 26 images cannot be cut"):
        JaxSeedGroup(config, [0])
    config = dataclasses.replace(config, recipe=SEED.with_overrides(batch_size=30))
    with pytest.raises(UserFacingError, match="but batch size 30 cannot be cut into 4 equal parts"):
        JaxSeedGroup(config, [0])


def test_more_devices_than_jax_has_is_a_clear_error():
    config = TrainerConfig(SEED, "cpu", None, steps_per_epoch=1, devices=64, epoch_images=128)
    with pytest.raises(UserFacingError, match="jax_num_cpu_devices"):
        JaxSeedGroup(config, [0])


def dry_run_state(out: Path) -> dict:
    return read_checkpoint(out / "checkpoint.msgpack")[1]["state"]


def test_a_dry_run_on_2_processes_equals_one_on_2_devices(synthetic_dir, tmp_path):
    """Two processes joined by jax.distributed (CPU collectives over gloo), each feeding its
    half of every batch, against `--devices 2` in one process: the artefacts are written once,
    by process 0, and hold the same weights up to float32 rounding (module docstring)."""
    common = ["--dry-run", "--data-dir", str(synthetic_dir), "--device", "cpu"]
    assert main(FRAMEWORK, [*common, "--devices", "2", "--out", str(tmp_path / "two-devices")]) == 0

    port = 12000 + os.getpid() % 20000
    processes = [subprocess.Popen(
        [sys.executable, "-m", "jax_impl.train", *common, "--out", str(tmp_path / f"written-by-{index}")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
             "JAX_PROCESS_ID": str(index), "JAX_PLATFORMS": "cpu"}) for index in range(2)]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert "devices 2, processes 2" in outputs[0]
    assert not (tmp_path / "written-by-1").exists(), "process 1 wrote artefacts"

    two_devices, two_processes = dry_run_state(tmp_path / "two-devices"), dry_run_state(tmp_path / "written-by-0")
    # The same program per device; measured: at most one float32 ulp (1e-7 relative) apart.
    for part in ("params", "batch_stats", "opt_state"):
        assert_same_state(two_processes[part], two_devices[part], relative=1e-5)
    assert (tmp_path / "written-by-0" / "curves.png").exists()
