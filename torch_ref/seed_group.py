"""The imperative shell around torch_ref.training: what the driver (common.driver) calls.

It holds each seed's state, feeds its batches (torch_ref.data) and reports its results; the
training itself is torch_ref.training. Seeds train in turn, each in its own random stream, so
a run of one seed is a group of one and any seed follows the trajectory it follows alone.
In a run of several processes (torch_ref.distributed) each process trains its part of every
batch with DistributedDataParallel; every process draws the dropout masks of its part from the
seed's stream, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from common.batching import EpochPlan, check_even_shards
from common.framework import TrainerConfig
from common.progress import EpochProgress
from torch_ref import checkpoints, data
from torch_ref.averaging import evaluated_model
from torch_ref.devices import describe, limit_threads, resolve_ops, select_device
from torch_ref.distributed import data_parallel, share_main_buffers, summed_over_processes, threads_per_process
from torch_ref.recalibration import recalibrate_batchnorm
from torch_ref.training import create_train_state, predict, train_epoch


class TorchSeedGroup:
    """Seeds of one recipe, each with its own model, optimiser, scheduler and random stream."""

    def __init__(self, config: TrainerConfig, seeds: list[int]):
        self.processes = config.processes
        limit_threads(threads_per_process(config.threads, self.processes))
        self.device = select_device(config.device)
        self.ops = resolve_ops(config.ops)
        self.states = [create_train_state(seed, config.recipe, config.steps_per_epoch, self.device, self.ops)
                       for seed in seeds]
        if self.processes.count > 1:
            check_even_shards(config.recipe.batch_size, config.epoch_images, self.processes.count)
            for state in self.states:
                state.network = data_parallel(state.model, self.device)
        self.resident = data.resident_data(self.device)

    def describe(self) -> dict[str, Any]:
        return {**describe(self.device, self.ops), "processes": self.processes.count, "seeds in turn": len(self.states)}

    def learning_rate(self) -> float:
        return self.states[0].optimizer.param_groups[0]["lr"]

    def compile_seconds(self) -> float:
        return 0.0  # eager: nothing is compiled

    def train_epoch(self, plans: list[EpochPlan], images: np.ndarray, labels: np.ndarray,
                    progresses: list[EpochProgress]) -> None:
        processes = self.processes
        for state, plan, progress in zip(self.states, plans, progresses, strict=True):
            report = progress.update
            if processes.count > 1:
                plan = plan.shard(processes.index, processes.count)
                report = summed_over_processes(report, self.device)
            if self.device.type == "cuda":
                batches = data.resident_batches(plan, *self.resident(images, labels))
            else:
                batches = data.host_batches(plan, images, labels, self.device)
            train_epoch(state, batches, report)
            if processes.count > 1:
                share_main_buffers(state.model)
                if state.averaged is not None:
                    share_main_buffers(state.averaged)

    def average_weights(self) -> None:
        for state in self.states:
            state.averaged.update_parameters(state.model)

    def recalibrate_batchnorm(self, images: np.ndarray, batch_size: int) -> None:
        """Recompute the statistics of the model evaluated: the average, once it holds any."""
        for state in self.states:  # every process computes it all: the statistics come out the same
            recalibrate_batchnorm(evaluated_model(state.model, state.averaged), images, batch_size, self.device)

    def predict(self, images: np.ndarray, batch_size: int) -> list[np.ndarray]:
        return [predict(evaluated_model(state.model, state.averaged), images, batch_size, self.device)
                for state in self.states]

    def restore(self, index: int, payload: dict) -> None:
        checkpoints.restore(self.states[index], payload)

    def is_finite(self, index: int) -> bool:
        """Whether every weight and BatchNorm statistic of seed `index`, trained and averaged, is finite."""
        state = self.states[index]
        models = [state.model] if state.averaged is None else [state.model, state.averaged]
        return all(torch.isfinite(value).all() for model in models for value in model.state_dict().values()
                   if value.is_floating_point())

    def checkpoint_bytes(self, index: int, meta: dict) -> bytes:
        return checkpoints.checkpoint_bytes(self.states[index], meta)

    def model_bytes(self, index: int) -> bytes:
        state = self.states[index]
        return checkpoints.model_bytes(evaluated_model(state.model, state.averaged))
