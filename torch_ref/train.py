"""`python -m torch_ref.train`: train the Session 6 model with PyTorch (see --help)."""

from __future__ import annotations

import sys

from common.training import Framework, main
from torch_ref.trainer import TorchTrainer, read_checkpoint, read_weights

FRAMEWORK = Framework(
    name="torch",
    title="PyTorch",
    module="torch_ref.train",
    checkpoint_name="checkpoint.pt",
    model_name="model.pt",
    create_trainer=TorchTrainer,
    read_checkpoint=read_checkpoint,
    read_weights=read_weights,
)

if __name__ == "__main__":
    sys.exit(main(FRAMEWORK))
