"""PyTorch data parallelism (torch_ref.distributed): DistributedDataParallel over gloo ranks,
started by `--devices 2` (the elastic launcher) or by torchrun, against a single-process
emulation of what two CPU ranks compute.

On CPU each rank normalises with the BatchNorm statistics of its own half of the batch (gloo
has no SyncBatchNorm), DDP averages the gradients, and the running statistics are rank 0's
(DDP broadcasts them before every forward pass, and the trainer after every epoch). The
emulation does exactly that in one process, with one thread as each rank has, so the two run
the same float32 operations: the only difference is the gradient all-reduce, which for two
ranks adds two numbers (exact in either order) and halves them (exact). They are held to 1e-6
of each tensor's norm (float32 rounding of a differently blocked kernel, were one to occur).
The same test shows that this is not what one process computes on the whole batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.batching import plan_epoch
from common.cli import DRY_RUN_EPOCHS, DRY_RUN_TRAIN_BATCHES
from common.recipes import get_recipe
from tests.frameworks import new_torch_state
from torch_ref.checkpoints import read_checkpoint
from torch_ref.data import host_batches
from torch_ref.train import main
from torch_ref.training import seed_random_stream, training_loss

pytestmark = pytest.mark.slow  # DDP ranks started as processes (launcher and torchrun)

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
# The runs here compare steps, so they train `best`: the default also recalibrates BatchNorm over
# the training images after the last epoch, which would overwrite the statistics the ranks kept.
RECIPE = "best"


def emulate_two_cpu_ranks(data) -> dict[str, torch.Tensor]:
    """A dry run's steps as two gloo ranks take them, in one process."""
    recipe = get_recipe(RECIPE)
    state = new_torch_state(recipe, DRY_RUN_TRAIN_BATCHES)
    state.model.train()
    parameters = list(state.model.parameters())
    for epoch in range(1, DRY_RUN_EPOCHS + 1):
        plan = plan_epoch(0, epoch, len(data.train_labels), recipe.batch_size, recipe.augmentation)
        plan = plan.head(DRY_RUN_TRAIN_BATCHES * recipe.batch_size)
        halves = [host_batches(plan.shard(rank, 2), data.train_images, data.train_labels, CPU) for rank in (0, 1)]
        with seed_random_stream(state):
            for rank0_batch, rank1_batch in zip(*halves, strict=True):
                shared_rng = torch.get_rng_state()  # every rank draws its masks from the seed's stream
                rank0_buffers = {name: value.clone() for name, value in state.model.named_buffers()}
                gradients = []
                for inputs, targets in (rank1_batch, rank0_batch):  # rank 0 last: its running statistics stay
                    state.model.load_state_dict(rank0_buffers, strict=False)
                    torch.set_rng_state(shared_rng)
                    state.optimizer.zero_grad(set_to_none=True)
                    training_loss(state.model(inputs), targets, state.label_smoothing).backward()
                    gradients.append([parameter.grad.clone() for parameter in parameters])
                for parameter, rank1_grad, rank0_grad in zip(parameters, *gradients, strict=True):
                    parameter.grad = (rank0_grad + rank1_grad) / 2
                state.optimizer.step()
                if state.step_per_batch:
                    state.scheduler.step()
        if not state.step_per_batch:
            state.scheduler.step()
    return state.model.state_dict()


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.double(), theirs.double()
    return float((ours - theirs).norm() / max(float(theirs.norm()), 1e-30))


def launched(command: list[str], out: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*command, "--dry-run", "--device", "cpu", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def two_ranks(synthetic_dir, tmp_path_factory) -> Path:
    """`python -m torch_ref.train --devices 2 --dry-run`: the launcher starts both ranks."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = launched([sys.executable, "-m", "torch_ref.train", "--recipe", RECIPE, "--devices", "2",
                       "--data-dir", str(synthetic_dir)], out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("final test accuracy") == 1  # rank 0 alone reports
    assert "processes 2" in result.stdout
    return out


def test_two_gloo_ranks_equal_their_single_process_emulation(two_ranks, synthetic_mnist, monkeypatch):
    ranks = read_checkpoint(two_ranks / "checkpoint.pt")[1]["model"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank
    try:
        emulated = emulate_two_cpu_ranks(synthetic_mnist)
    finally:
        torch.set_num_threads(threads)
    for name, value in emulated.items():
        if name.endswith("num_batches_tracked"):
            assert int(ranks[name]) == int(value) == DRY_RUN_EPOCHS * DRY_RUN_TRAIN_BATCHES
        else:
            assert relative_difference(ranks[name], value) < 1e-6, name


def test_two_cpu_ranks_differ_from_one_process_by_their_batchnorm_statistics(two_ranks, synthetic_dir, tmp_path):
    """Documented in torch_ref.distributed: per-rank BatchNorm statistics on CPU, not one device's."""
    assert main(["--recipe", RECIPE, "--dry-run", "--device", "cpu", "--data-dir", str(synthetic_dir),
                 "--out", str(tmp_path / "one")]) == 0
    one = read_checkpoint(tmp_path / "one" / "checkpoint.pt")[1]["model"]
    ranks = read_checkpoint(two_ranks / "checkpoint.pt")[1]["model"]
    # Half-batch statistics differ from the whole batch's by sampling, a property of the data that
    # moves the running means by percents (2.5-7.5% here), on any CPU far beyond float32 rounding (1e-7).
    assert max(relative_difference(ranks[name], one[name]) for name in one if name.endswith("running_mean")) > 1e-2


def test_torchrun_runs_the_same_ranks_and_writes_the_artefacts_once(two_ranks, synthetic_dir, tmp_path):
    """torchrun is the script of `python -m torch.distributed.run`; the module is used here so
    that the test does not depend on where the script was installed."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = launched([*torchrun, "-m", "torch_ref.train", "--recipe", RECIPE, "--data-dir", str(synthetic_dir)],
                      tmp_path / "run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("final test accuracy") == 1
    ours, theirs = (read_checkpoint(run / "checkpoint.pt")[1]["model"] for run in (tmp_path / "run", two_ranks))
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name  # the same processes, however started
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(p.name for p in two_ranks.iterdir())


def test_devices_must_match_the_processes_torchrun_started(synthetic_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["--dry-run", "--devices", "3", "--data-dir", str(synthetic_dir),
                 "--out", str(tmp_path / "run")]) == 2
    assert "one of 2 started by torchrun" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_error_in_one_process_stops_them_all_at_once(two_ranks, synthetic_dir):
    """Rank 0 refuses to overwrite a finished run; rank 1, already waiting for rank 0's data,
    must not be left at the barrier (whose own timeout is 30 minutes): the launcher stops it and
    reports the status. A hang ends in TimeoutExpired."""
    result = launched([sys.executable, "-m", "torch_ref.train", "--recipe", RECIPE, "--devices", "2",
                       "--data-dir", str(synthetic_dir)], two_ranks, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "already holds a run" in result.stderr
