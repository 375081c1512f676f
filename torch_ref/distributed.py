"""Several PyTorch processes training one model, the way DistributedDataParallel is used.

`python -m torch_ref.train --devices N` starts N copies of itself through torch.distributed's
elastic launcher (what `torchrun` runs), one per device; under `torchrun` each copy finds its
rank in the environment instead. Every process takes its part of each global batch, and DDP
averages the gradients in backward(), so the weights stay identical on every process.

BatchNorm: on CUDA, `torch.nn.SyncBatchNorm` takes the batch statistics over the global batch,
as one device would. gloo (the CPU backend) cannot run SyncBatchNorm, so on CPUs each process
normalises with its own part's statistics, and the running statistics are process 0's (DDP
broadcasts them before every forward pass). N CPU processes therefore do not compute what one
process computes; tests/test_data_parallel_torch.py pins down what they do compute. JAX's N
devices do compute what one does (jax_impl.distributed).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.nn.parallel import DistributedDataParallel

from common.errors import UserFacingError
from common.processes import SINGLE_PROCESS, DeviceCount, Processes
from common.system import usable_cpu_count

LAUNCHED_ENV = "WORLD_SIZE"  # set by torchrun and by the elastic launcher in every process they start


def requested_count(devices: DeviceCount) -> int:
    """--devices as a number of processes: one per CUDA device for all (one on a CPU)."""
    if devices is None:
        return 1
    if devices == "all":
        return torch.cuda.device_count() or 1
    return devices


def launch_processes(devices: DeviceCount, argv: list[str], main: Callable[[list[str]], int]) -> int | None:
    """Start one process per device running `main(argv)` (the trainer's, importable), and wait
    for them; returns the exit status of the first that failed, else 0. None when this process
    should train itself: one device, or already started by torchrun or by this launcher."""
    count = requested_count(devices)
    if LAUNCHED_ENV in os.environ or count == 1:
        return None
    if torch.cuda.is_available() and count > torch.cuda.device_count():
        raise UserFacingError(f"--devices {count}: PyTorch sees {torch.cuda.device_count()} CUDA device(s).")
    # What `torchrun --standalone --nproc-per-node N` configures: a rendezvous on a free local port.
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=count, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, _train_in_process)(main, argv)
    except ChildFailedError as error:  # the launcher has stopped the other processes
        failure = next(iter(error.failures.values()))
        print(f"error: training process {failure.local_rank} stopped with exit status {failure.exitcode}; "
              "its message is above.", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def _train_in_process(main: Callable[[list[str]], int], argv: list[str]) -> None:
    """What each launched process runs (the launcher spawns fresh interpreters, which import
    `main` by name). A failure must end the process with its status, so that the launcher stops
    the others rather than leave them waiting at the next collective."""
    status = main(argv)
    if status:
        sys.exit(status)


def join_processes(device: str, devices: DeviceCount) -> Processes:
    """Join the process group this process was started into (torchrun or launch_processes):
    nccl between CUDA devices, one per process, else gloo."""
    if LAUNCHED_ENV not in os.environ:
        return SINGLE_PROCESS
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if devices is not None and requested_count(devices) != world:
        raise UserFacingError(f"--devices {devices}: this process is one of {world} started by torchrun; "
                              f"leave --devices out (or give {world}).")
    if world == 1:
        return SINGLE_PROCESS
    on_cuda = device != "cpu" and torch.cuda.is_available()
    if on_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if on_cuda else "gloo")
    return Processes(rank, world, barrier=dist.barrier)


def threads_per_process(threads: int | None, processes: Processes) -> int | None:
    """--threads, else this machine's cores shared by the processes on it (each would take all)."""
    if threads or processes.count == 1:
        return threads
    return max(1, usable_cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", processes.count)))


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` as DDP trains it: its BatchNorms synchronised on CUDA (see the module docstring)."""
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def summed_over_processes(report: Callable[[int, dict], None], device: torch.device) -> Callable[[int, dict], None]:
    """`report(images, metrics)` of the global batch, from each process's part."""

    def report_global(images: int, metrics: dict) -> None:
        totals = torch.tensor([images, metrics["loss_sum"], metrics["correct"]], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        images, loss_sum, correct = totals.tolist()
        report(int(images), {"loss_sum": loss_sum, "correct": int(correct)})

    return report_global


def share_main_buffers(*models: torch.nn.Module | None) -> None:
    """Every process takes process 0's BatchNorm running statistics (those its checkpoint holds),
    so that all of them evaluate the same model; None (no average kept) is skipped."""
    for model in models:
        for buffer in model.buffers() if model is not None else ():
            dist.broadcast(buffer, src=0)
