"""PyTorch's side of the training driver: the model, SGD, the schedule and checkpoints.

Written the plain PyTorch way (an eager loop, `torch.optim.SGD`, an `lr_scheduler` stepped
per epoch) because this package is the reference the JAX port is checked against.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.batching import EpochPlan, train_batches
from common.checkpoints import checkpoint_meta, sealed_meta, unreadable
from common.errors import CheckpointError, UserFacingError
from common.progress import EpochProgress
from common.recipes import Recipe
from common.training import TrainerConfig
from torch_ref import augment
from torch_ref.model import Net

CHECKPOINT_KEYS = {"meta", "model", "optimizer", "scheduler", "rng"}


def select_device(choice: str) -> torch.device:
    """--device: auto -> CUDA when available, else CPU; gpu insists on CUDA."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserFacingError("--device gpu: PyTorch sees no CUDA device here; use --device cpu or auto.")
    return torch.device("cuda")


def resolve_ops(choice: str) -> str:
    """--ops for PyTorch. fast is PyTorch's own tuning, the channels_last memory format (NHWC
    activations and weights, same maths). auto is plain (NCHW) on every device: channels_last
    was measured faster than NCHW on one 2-core CPU (AMD EPYC: 1.13x at batch 128, 1.38x at 512)
    and slower on another (Intel Xeon: 0.87x to 0.91x), and never on a GPU, so no default is
    right for every machine; `python benchmarks/compare.py` shows which wins on yours."""
    return "plain" if choice == "auto" else choice


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The recipe's schedule as a PyTorch scheduler; `recipe.schedule.per_step` says whether it
    is stepped after every batch or once per epoch."""
    schedule = recipe.schedule
    if schedule.kind == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=schedule.step_size, gamma=schedule.gamma)
    if schedule.kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch, pct_start=schedule.pct_start,
            anneal_strategy="cos", cycle_momentum=False, div_factor=schedule.div_factor,
            final_div_factor=schedule.final_div_factor,
        )
    raise ValueError(f"unknown schedule kind {schedule.kind!r}")


def to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, 28, 28) float32 NumPy images -> (N, 1, 28, 28) tensor, NCHW as the model expects."""
    return torch.from_numpy(images).unsqueeze(1).to(device)


def training_loss(log_probs: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The model returns log-probabilities, so the loss is NLL; with label smoothing it is
    cross_entropy, which takes logits but is unchanged by them being log-probabilities already
    (log_softmax of a log_softmax is the same log_softmax)."""
    if label_smoothing:
        return F.cross_entropy(log_probs, targets, label_smoothing=label_smoothing)
    return F.nll_loss(log_probs, targets)


class TorchTrainer:
    """Model, optimiser and scheduler of one run, seeded by `seed`."""

    def __init__(self, config: TrainerConfig):
        recipe = config.recipe
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = select_device(config.device)
        torch.manual_seed(config.seed)  # initial weights and the dropout masks that follow
        self.model = Net(dropout=recipe.dropout).to(self.device)
        self.ops = resolve_ops(config.ops)
        if self.ops == "fast":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
            nesterov=recipe.nesterov, weight_decay=recipe.weight_decay,
        )
        self.scheduler = make_scheduler(self.optimizer, recipe, config.steps_per_epoch)
        self.step_per_batch = recipe.schedule.per_step
        self.label_smoothing = recipe.label_smoothing
        self._resident: tuple[np.ndarray, torch.Tensor, torch.Tensor] | None = None

    def describe(self) -> dict[str, Any]:
        return {"framework": "PyTorch", "version": torch.__version__, "device": str(self.device), "ops": self.ops,
                "threads": torch.get_num_threads()}

    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def compile_seconds(self) -> float:
        return 0.0  # eager: nothing is compiled

    def train_epoch(self, plan: EpochPlan, images: np.ndarray, labels: np.ndarray, progress: EpochProgress) -> None:
        self.model.train()
        on_gpu = self.device.type == "cuda"
        batches = self._resident_batches(plan, images, labels) if on_gpu else self._host_batches(plan, images, labels)
        for inputs, targets in batches:
            self.optimizer.zero_grad(set_to_none=True)
            log_probs = self.model(inputs)
            loss = training_loss(log_probs, targets, self.label_smoothing)
            loss.backward()
            self.optimizer.step()
            if self.step_per_batch:
                self.scheduler.step()
            correct = (log_probs.argmax(dim=1) == targets).sum().item()
            progress.update(len(targets), loss.item() * len(targets), correct)
        if not self.step_per_batch:
            self.scheduler.step()

    def _host_batches(self, plan: EpochPlan, images: np.ndarray, labels: np.ndarray):
        """The core's NumPy pipeline, batch by batch (CPU training)."""
        for batch in train_batches(plan, images, labels):
            yield to_tensor(batch.images, self.device), torch.from_numpy(batch.labels).to(self.device)

    def _resident_batches(self, plan: EpochPlan, images: np.ndarray, labels: np.ndarray):
        """MNIST kept on the GPU as uint8 and augmented there (torch_ref.augment, bit-identical to
        the core), so that only the epoch's draws cross the bus."""
        if self._resident is None or self._resident[0] is not images:
            # torch.tensor copies: the loaded MNIST arrays are read-only, a tensor must not alias them.
            self._resident = (images, torch.tensor(images, device=self.device),
                              torch.tensor(labels, dtype=torch.int64, device=self.device))
        _, device_images, device_labels = self._resident
        order = torch.as_tensor(plan.order, device=self.device)
        crop = torch.as_tensor(plan.crop, device=self.device)
        source_index = torch.as_tensor(plan.source_index().astype(np.int16), device=self.device)
        for positions in plan.batch_slices():
            pixels = augment.augment(device_images[order[positions]], crop[positions], source_index[positions],
                                     plan.crop_size)
            yield augment.normalize(pixels).unsqueeze(1), device_labels[order[positions]]

    def predict(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        self.model.eval()
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                outputs.append(self.model(to_tensor(images[start : start + batch_size], self.device)).cpu())
        return torch.cat(outputs).numpy()

    def checkpoint_bytes(self, meta: dict) -> bytes:
        # Only tensors, numbers and strings, so that torch.load(weights_only=True) can read it.
        contents = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        }
        buffer = io.BytesIO()
        torch.save({"meta": sealed_meta(meta, contents, tensor_to_array), **contents}, buffer)
        return buffer.getvalue()

    def restore(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"the checkpoint's state does not fit this model and recipe: {error}") from error

    def state_is_finite(self) -> bool:
        """Whether every weight and BatchNorm statistic is a finite number."""
        return all(torch.isfinite(value).all() for value in self.model.state_dict().values()
                   if value.is_floating_point())

    def model_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(self.model.state_dict(), buffer)
        return buffer.getvalue()

    def load_weights(self, state_dict: dict) -> None:
        """Replace the weights (for evaluation) by a state_dict of this model's keys and shapes."""
        try:
            self.model.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"the weights do not fit the model: {error}") from error


def _load(path: Path) -> object:
    """torch.load restricted to tensors and plain data: never executes code from the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise unreadable(path, "PyTorch", error) from error


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(meta, state) of a checkpoint written by TorchTrainer."""
    state = _load(path)
    return checkpoint_meta(state, path, "torch", "torch_ref", CHECKPOINT_KEYS, tensor_to_array), state


def tensor_to_array(value: Any) -> Any:
    """A tensor as a NumPy array (for the checkpoint digest); anything else as it is."""
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def read_weights(path: Path) -> dict:
    """The model's state_dict from a training checkpoint (checkpoint.pt) or a weights file
    (model.pt from --save-model, or a converted JAX model)."""
    data = _load(path)
    if isinstance(data, dict) and "meta" in data:  # a training checkpoint: check its digest too
        checkpoint_meta(data, path, "torch", "torch_ref", CHECKPOINT_KEYS, tensor_to_array)
    state_dict = data["model"] if isinstance(data, dict) and "model" in data else data
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} holds no PyTorch state_dict")
    return state_dict
