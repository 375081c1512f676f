"""`python -m torch_ref.train`: train the Session 6 model with PyTorch (see --help).

Same flags, output and artefacts as `python -m jax_impl.train`. The training itself is
torch_ref.training, read top to bottom.
"""

from __future__ import annotations

import sys

from common.driver import main
from common.framework import Framework
from torch_ref.checkpoints import read_checkpoint, read_weights
from torch_ref.distributed import join_processes, launch_processes
from torch_ref.evaluate import predict_with_weights, recalibrate_weights
from torch_ref.seed_group import TorchSeedGroup

FRAMEWORK = Framework(
    name="torch",
    title="PyTorch",
    module="torch_ref.train",
    checkpoint_name="checkpoint.pt",
    model_name="model.pt",
    create_seed_group=TorchSeedGroup,
    read_checkpoint=read_checkpoint,
    read_weights=read_weights,
    predict=predict_with_weights,
    recalibrate=recalibrate_weights,
    join_processes=join_processes,
    launch_processes=launch_processes,
)

if __name__ == "__main__":
    sys.exit(main(FRAMEWORK))
