"""`python -m torch_ref.evaluate WEIGHTS`: test accuracy of PyTorch weights (see --help)."""

import sys

from common.evaluation import main
from torch_ref.train import FRAMEWORK

if __name__ == "__main__":
    sys.exit(main(FRAMEWORK))
