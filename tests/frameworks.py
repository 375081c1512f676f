"""The trainers as the tests see them: one record per framework, so that a test can be written
once and parametrised over them, and the fresh training state each trainer starts from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

import jax_impl.evaluate
import jax_impl.train
import nnx_impl.evaluate
import nnx_impl.train
import torch_ref.evaluate
import torch_ref.train
from common import evaluation
from common.recipes import Recipe
from jax_impl.checkpoints import read_checkpoint as read_jax_checkpoint
from jax_impl.model import PLAIN_LAYERS, Layers
from jax_impl.model import Net as JaxNet
from jax_impl.optim import learning_rate_schedule
from jax_impl.optim import make_optimizer as make_jax_optimizer
from jax_impl.training import create_train_state as create_jax_state
from nnx_impl.checkpoints import read_checkpoint as read_nnx_checkpoint
from torch_ref.checkpoints import read_checkpoint as read_torch_checkpoint
from torch_ref.model import Net as TorchNet
from torch_ref.optim import make_optimizer as make_torch_optimizer
from torch_ref.optim import make_scheduler
from torch_ref.training import create_train_state as create_torch_state


@dataclass(frozen=True)
class Trainer:
    """A framework's command-line module, its evaluate module and its checkpoint reader."""

    train_module: ModuleType
    evaluate_module: ModuleType
    read_checkpoint: Callable[[Any], tuple[dict, Any]]

    def __getattr__(self, name: str) -> Any:
        """name, title, checkpoint_name and model_name: the framework's `NAMES`."""
        return getattr(self.train_module.NAMES, name)

    def main(self, argv: list[str]) -> int:
        return self.train_module.main(argv)

    def evaluate_main(self, argv: list[str]) -> int:
        module = self.evaluate_module
        return evaluation.main(module.NAMES, module.__name__, module.WEIGHTS, argv)

    @property
    def weights(self) -> evaluation.WeightsFunctions:
        return self.evaluate_module.WEIGHTS

    def interrupt_after(self, epochs: int, monkeypatch) -> None:
        """Make the trainer's next epoch after `epochs` raise KeyboardInterrupt (Ctrl-C), until
        `monkeypatch.undo()`."""
        train_epoch = self.train_module.train_epoch
        done = []

        def stops(*args):
            if len(done) == epochs:
                raise KeyboardInterrupt
            done.append(1)
            return train_epoch(*args)

        monkeypatch.setattr(self.train_module, "train_epoch", stops)


JAX = Trainer(jax_impl.train, jax_impl.evaluate, read_jax_checkpoint)
TORCH = Trainer(torch_ref.train, torch_ref.evaluate, read_torch_checkpoint)
NNX = Trainer(nnx_impl.train, nnx_impl.evaluate, read_nnx_checkpoint)


def new_jax_state(recipe: Recipe, steps_per_epoch: int, layers: Layers = PLAIN_LAYERS,
                  seed: int = 0) -> tuple[Any, Any]:
    """(state, dropout key) of a fresh JAX run, built as jax_impl.train builds them."""
    tx = make_jax_optimizer(recipe, learning_rate_schedule(recipe, steps_per_epoch))
    return create_jax_state(JaxNet(dropout=recipe.dropout, layers=layers), tx, seed, recipe)


def new_torch_state(recipe: Recipe, steps_per_epoch: int, seed: int = 0, ops: str = "plain") -> Any:
    """The state of a fresh PyTorch run on the CPU, built as torch_ref.train builds it."""
    torch.manual_seed(seed)
    model = TorchNet(dropout=recipe.dropout)
    if ops == "fast":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_torch_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch)
    return create_torch_state(model, optimizer, scheduler, recipe, torch.device("cpu"))
