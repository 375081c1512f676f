"""PyTorch checkpoints and weights files: torch.save of tensors, numbers and strings only,
so that torch.load(weights_only=True) reads them without executing code from the file."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from common.checkpoints import checkpoint_meta, sealed_meta, unreadable
from common.errors import CheckpointError
from common.settings import FrameworkNames
from torch_ref.averaging import averaged_state_dict
from torch_ref.training import TrainState

NAMES = FrameworkNames(name="torch", title="PyTorch", checkpoint_name="checkpoint.pt", model_name="model.pt")
CHECKPOINT_KEYS = {"meta", "model", "optimizer", "scheduler", "rng"}


def tensor_to_array(value: Any) -> Any:
    """A tensor as a NumPy array (for the checkpoint digest); anything else as it is."""
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def checkpoint_bytes(state: TrainState, meta: dict) -> bytes:
    """One seed's whole training state and `meta`, sealed with the digest of its contents."""
    contents = {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "rng": state.rng,
    }
    if state.cuda_rng is not None:
        contents["cuda_rng"] = state.cuda_rng
    if state.averaged is not None:  # the trained weights above, the averaged ones here
        contents["averaged"] = state.averaged.state_dict()
    buffer = io.BytesIO()
    torch.save({"meta": sealed_meta(meta, contents, tensor_to_array), **contents}, buffer)
    return buffer.getvalue()


def model_bytes(model: torch.nn.Module) -> bytes:
    """The state_dict alone, for --save-model."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def restore(state: TrainState, payload: dict) -> None:
    """Load a checkpoint's payload into `state`, in place (the PyTorch way)."""
    try:
        state.model.load_state_dict(payload["model"])
        state.optimizer.load_state_dict(payload["optimizer"])
        state.scheduler.load_state_dict(payload["scheduler"])
        if state.averaged is not None:
            state.averaged.load_state_dict(payload["averaged"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"the checkpoint does not fit this model and recipe: {error}") from error
    state.rng = payload["rng"]
    if state.cuda_rng is not None and "cuda_rng" in payload:
        state.cuda_rng = payload["cuda_rng"]


def load_weights(model: torch.nn.Module, state_dict: dict) -> None:
    """Replace the weights of `model` by a state_dict of its keys and shapes."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"the weights file does not fit the model: {error}") from error


def _load(path: Path) -> object:
    """torch.load restricted to tensors and plain data: never executes code from the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise unreadable(path, "PyTorch", error) from error


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(meta, payload) of a training checkpoint."""
    payload = _load(path)
    return checkpoint_meta(payload, path, "torch", "torch_ref", CHECKPOINT_KEYS, tensor_to_array), payload


def read_weights(path: Path) -> dict:
    """The model's state_dict from a training checkpoint (checkpoint.pt: the averaged model, where
    its recipe keeps an average) or a weights file (model.pt from --save-model, or a converted
    JAX model)."""
    data = _load(path)
    if isinstance(data, dict) and "meta" in data:  # a training checkpoint: check its digest too
        checkpoint_meta(data, path, "torch", "torch_ref", CHECKPOINT_KEYS, tensor_to_array)
    state_dict = data["model"] if isinstance(data, dict) and "model" in data else data
    if isinstance(data, dict) and "averaged" in data and data["averaged"]["n_averaged"].item() > 0:
        state_dict = averaged_state_dict(data["averaged"])
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} holds no PyTorch state_dict")
    return state_dict
