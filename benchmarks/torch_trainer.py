"""torch_ref.train's epoch as an object a benchmark can time, for one seed or several in turn.

The trainer runs whole runs: files, an evaluation after every epoch. A benchmark times epochs
of plans of its own choosing on states that live between them. This class builds each seed's
state and feeds its batches line for line as torch_ref.train.train does (torch_ref.seeds trains
several seeds by running that function once per seed), so that what is timed is what a run
spends; it writes nothing and decides nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from common.batching import EpochPlan, check_even_shards
from common.processes import SINGLE_PROCESS, Processes
from common.progress import EpochProgress
from common.recipes import Recipe
from common.settings import RunSettings
from torch_ref import data
from torch_ref.averaging import evaluated_model
from torch_ref.devices import describe, limit_threads, resolve_ops, select_device
from torch_ref.distributed import data_parallel, share_main_buffers, summed_over_processes, threads_per_process
from torch_ref.model import Net
from torch_ref.optim import make_optimizer, make_scheduler
from torch_ref.recalibration import recalibrate_batchnorm
from torch_ref.training import TrainState, create_train_state, predict, train_epoch


class TorchTrainer:
    """`seeds` (default settings.seed) trained one after another, each with its own model,
    optimiser, scheduler and random stream; across processes, each trains its part of every
    batch under DistributedDataParallel."""

    def __init__(self, settings: RunSettings, first_plan: EpochPlan, seeds: tuple[int, ...] | None = None,
                 processes: Processes = SINGLE_PROCESS):
        recipe = settings.recipe
        limit_threads(threads_per_process(settings.threads, processes))
        self.device = select_device(settings.device)
        self.ops = resolve_ops(settings.ops)
        self.processes = processes
        self.resident = data.resident_data(self.device)
        steps_per_epoch = len(first_plan.batch_slices())
        self.states = [_seed_state(seed, recipe, steps_per_epoch, self.device, self.ops)
                       for seed in seeds or (settings.seed,)]
        if processes.count > 1:
            check_even_shards(recipe.batch_size, len(first_plan.order), processes.count)
            for state in self.states:
                state.network = data_parallel(state.model, self.device)

    def describe(self) -> dict:
        """The facts the trainer records in config.json."""
        return {**describe(self.device, self.ops), "processes": self.processes.count}

    def train_epoch(self, plan: EpochPlan, images: np.ndarray, labels: np.ndarray) -> None:
        """Every batch of `plan` (this process's part of each) for each seed in turn, each step's
        metrics read as the trainer reads them."""
        processes = self.processes
        own_part = plan.shard(processes.index, processes.count) if processes.count > 1 else plan
        for index, state in enumerate(self.states):
            progress = EpochProgress(1, 1, len(plan.order), enabled=False)

            def report(count: int, metrics: dict, progress: EpochProgress = progress) -> None:
                progress.update(count, float(metrics["loss_sum"]), int(metrics["correct"]))

            if processes.count > 1:
                report = summed_over_processes(report, self.device)
            if self.device.type == "cuda":
                batches = data.resident_batches(own_part, *self.resident(images, labels))
            else:
                batches = data.host_batches(own_part, images, labels, self.device)
            self.states[index] = train_epoch(state, batches, report)
            if processes.count > 1:
                share_main_buffers(state.model, state.averaged)

    def synchronize(self) -> None:
        """Wait for queued CUDA work, so that a clock read next comes after it (eager CPU work is done already)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def device_peak_mb(self) -> float | None:
        """CUDA's peak allocated memory so far (None on a CPU, whose memory is the process's)."""
        return torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else None

    def average_weights(self) -> None:
        """Each seed's weights taken into its SWA average (end of an epoch)."""
        for state in self.states:
            state.averaged.update_parameters(state.model)

    def recalibrate(self, images: np.ndarray, batch_size: int) -> None:
        """Each evaluated model's BatchNorm statistics recomputed over normalised `images`."""
        for state in self.states:
            recalibrate_batchnorm(evaluated_model(state.model, state.averaged), images, batch_size, self.device)

    def predict(self, images: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """Each seed's log-probabilities of normalised `images`."""
        return [predict(evaluated_model(state.model, state.averaged), images, batch_size, self.device)
                for state in self.states]


def _seed_state(seed: int, recipe: Recipe, steps_per_epoch: int, device: torch.device, ops: str) -> TrainState:
    """A seed's fresh model, optimiser and scheduler, built in torch_ref.train.train's order: the
    seed set first, so that it draws the initial weights and then the dropout masks."""
    torch.manual_seed(seed)
    model = Net(dropout=recipe.dropout).to(device)
    if ops == "fast":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch)
    return create_train_state(model, optimizer, scheduler, recipe, device)
