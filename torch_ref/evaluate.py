"""`python -m torch_ref.evaluate WEIGHTS`: test accuracy of PyTorch weights (see --help).

Builds the model and loads its weights, nothing else: evaluation needs no optimiser state.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from common.evaluation import WeightsFunctions, main
from torch_ref.checkpoints import NAMES, load_weights, read_weights
from torch_ref.devices import resolve_ops, select_device
from torch_ref.model import Net
from torch_ref.recalibration import recalibrate_batchnorm
from torch_ref.training import predict


def placed(state_dict: dict, device: str, ops: str) -> tuple[Net, torch.device]:
    """The model holding `state_dict`, on its device and in its memory format."""
    torch_device = select_device(device)
    model = Net().to(torch_device)
    load_weights(model, state_dict)
    if resolve_ops(ops) == "fast":
        model = model.to(memory_format=torch.channels_last)
    return model, torch_device


def predict_with_weights(state_dict: dict, images: np.ndarray, batch_size: int, device: str = "auto",
                         ops: str = "auto") -> np.ndarray:
    """Eval-mode log-probabilities of normalised images (N, 28, 28) under `state_dict`."""
    model, torch_device = placed(state_dict, device, ops)
    return predict(model, images, batch_size, torch_device)


def recalibrate_weights(state_dict: dict, images: np.ndarray, batch_size: int, device: str = "auto",
                        ops: str = "auto") -> dict:
    """`state_dict` with its BatchNorm statistics recomputed over normalised `images`
    (torch_ref.recalibration), on the CPU."""
    model, torch_device = placed(state_dict, device, ops)
    recalibrate_batchnorm(model, images, batch_size, torch_device)
    return {name: value.cpu() for name, value in model.state_dict().items()}


WEIGHTS = WeightsFunctions(read=read_weights, predict=predict_with_weights, recalibrate=recalibrate_weights)

if __name__ == "__main__":
    sys.exit(main(NAMES, "torch_ref.evaluate", WEIGHTS))
