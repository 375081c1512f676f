"""PyTorch training the plain PyTorch way, in the functions of jax_impl.training; read top to bottom.

1. `create_train_state`: a model, its `torch.optim.SGD` and scheduler, and a seed's random stream.
2. `train_step`: zero_grad, forward, loss, backward, optimizer.step() (and an EMA's
   update_parameters): the state is changed in place, where JAX returns a new one; both
   return (state, metrics), so the loops read alike.
3. `train_epoch`: every batch of one seed's epoch, in that seed's own random stream.
4. `is_finite`, `eval_step` and `predict`: the checks before saving, and eval-mode
   log-probabilities under `torch.inference_mode`.

Dropout draws from PyTorch's global generator, which a seed owns only while it trains: the
state keeps its generator between epochs (`seed_random_stream`), so a seed draws the same masks
whether it trains alone or in turn with others. JAX passes an explicit key instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from common.recipes import Recipe
from torch_ref.averaging import averaged_model
from torch_ref.data import to_tensor
from torch_ref.model import Net

Metrics = dict[str, Any]  # a batch's summed loss and correct count


@dataclass
class TrainState:
    """One seed's model, optimiser and scheduler, and its random stream between epochs."""

    model: Net
    network: torch.nn.Module  # what train_step calls: the model, or DDP(model) across processes
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    label_smoothing: float
    step_per_batch: bool  # OneCycleLR steps after every batch, StepLR after every epoch
    rng: torch.Tensor  # torch.get_rng_state() of this seed
    cuda_rng: torch.Tensor | None = None  # and of its CUDA generator, on a GPU
    averaged: AveragedModel | None = None  # the recipe's weight average (torch_ref.averaging), if any
    average_every_step: bool = False  # EMA: update `averaged` after every optimiser step


def create_train_state(model: Net, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                       recipe: Recipe, device: torch.device) -> TrainState:
    """`model` (its weights drawn from the seed just set, by torch.manual_seed) with its optimiser
    and scheduler, and the random stream the seed continues with: the dropout masks."""
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return TrainState(model, model, optimizer, scheduler, recipe.label_smoothing, recipe.schedule.per_step,
                      torch.get_rng_state(), cuda_rng, averaged_model(model, recipe), recipe.average == "ema")


def training_loss(log_probs: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The model returns log-probabilities, so the loss is NLL; with label smoothing it is
    cross_entropy, which takes logits but is unchanged by them being log-probabilities already
    (log_softmax of a log_softmax is the same log_softmax)."""
    if label_smoothing:
        return F.cross_entropy(log_probs, targets, label_smoothing=label_smoothing)
    return F.nll_loss(log_probs, targets)


def train_step(state: TrainState, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[TrainState, Metrics]:
    """One SGD step on (images NCHW float32, labels int64), in place; returns the state and the
    batch's summed loss and correct count."""
    inputs, targets = batch
    state.optimizer.zero_grad(set_to_none=True)
    log_probs = state.network(inputs)
    loss = training_loss(log_probs, targets, state.label_smoothing)
    loss.backward()  # under DDP, also averages the gradients over the processes
    state.optimizer.step()
    if state.step_per_batch:
        state.scheduler.step()
    if state.average_every_step:
        state.averaged.update_parameters(state.model)
    return state, {"loss_sum": loss.item() * len(targets), "correct": (log_probs.argmax(dim=1) == targets).sum().item()}


@contextlib.contextmanager
def seed_random_stream(state: TrainState) -> Iterator[None]:
    """PyTorch's global generators set to this seed's stream, and the stream saved afterwards."""
    torch.set_rng_state(state.rng)
    if state.cuda_rng is not None:
        torch.cuda.set_rng_state(state.cuda_rng)
    try:
        yield
    finally:
        state.rng = torch.get_rng_state()
        if state.cuda_rng is not None:
            state.cuda_rng = torch.cuda.get_rng_state()


def train_epoch(state: TrainState, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                report: Callable[[int, Metrics], None]) -> TrainState:
    """Every batch through `train_step`; `report(images, metrics)` after each."""
    state.network.train()
    with seed_random_stream(state):
        for inputs, targets in batches:
            state, metrics = train_step(state, (inputs, targets))
            report(len(targets), metrics)
    if not state.step_per_batch:
        state.scheduler.step()
    return state


def is_finite(state: TrainState) -> bool:
    """Whether every weight and BatchNorm statistic, trained and averaged, is finite (checked
    before a checkpoint is written)."""
    models = [state.model] if state.averaged is None else [state.model, state.averaged]
    return all(bool(torch.isfinite(value).all()) for model in models for value in model.state_dict().values()
               if value.is_floating_point())


def eval_step(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Eval-mode log-probabilities (running BatchNorm statistics, no dropout)."""
    model.eval()
    with torch.inference_mode():
        return model(images)


def predict(model: torch.nn.Module, images: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """Log-probabilities of normalised images (N, 28, 28), `batch_size` at a time."""
    outputs = [eval_step(model, to_tensor(images[start : start + batch_size], device)).cpu()
               for start in range(0, len(images), batch_size)]
    return torch.cat(outputs).numpy()
